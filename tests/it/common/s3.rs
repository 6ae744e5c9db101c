//! A real S3 server for the tests: s3s-fs (`examples/s3s_fs.rs`, built by `cargo test`),
//! objects as files under a temp dir that outlives a stop and restart.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const ACCESS_KEY: &str = "tlb-test-access";
pub const SECRET_KEY: &str = "tlb-test-secret-key-0123456789";

pub struct S3 {
    pub root: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

/// The server binary, beside this test binary's folder (`target/debug/examples`).
fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let built = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples/s3s_fs");
    assert!(
        built.exists(),
        "{} is missing: `cargo test` builds it (or `cargo build --example s3s_fs`)",
        built.display()
    );
    built
}

impl S3 {
    /// A server holding one empty bucket, `bucket`, on a free port.
    pub fn start(bucket: &str) -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join(bucket)).unwrap();
        let mut s3 = Self {
            root,
            port: 0,
            child: None,
        };
        s3.run();
        s3
    }

    fn run(&mut self) {
        let mut child = Command::new(binary())
            .arg(self.root.path())
            .args([ACCESS_KEY, SECRET_KEY, &self.port.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the S3 server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("s3 listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        self.port = addr.rsplit(':').next().unwrap().parse().unwrap();
        self.child = Some(child);
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server (kill -9); its objects stay on disk.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the same objects.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// The bytes stored under `key` in `bucket`, read from the server's disk (not through S3).
    pub fn stored(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.root.path().join(bucket).join(key)).ok()
    }

    /// The names of the `.ckpt` objects directly under `prefix` in `bucket`, sorted, read
    /// from the server's disk.
    pub fn names(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.names_where(bucket, prefix, |n| n.ends_with(".ckpt"))
    }

    /// The TensorBoard event files stored under `prefix`, by name.
    pub fn event_files(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.names_where(bucket, prefix, |n| n.contains("tfevents"))
    }

    fn names_where(&self, bucket: &str, prefix: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let dir = self.root.path().join(bucket).join(prefix);
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| keep(n))
            .collect();
        names.sort();
        names
    }

    /// The credentials a client of this server uses, as the AWS environment variables.
    pub fn credentials(&self, command: &mut Command) {
        command
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_DEFAULT_REGION", "us-east-1");
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.stop();
    }
}

//! A throw-away PostgreSQL server for tests, from the Debian package's binaries: `initdb` and
//! `pg_ctl` in a temp dir, as the unprivileged `postgres` user when run as root (PostgreSQL
//! refuses to run as root), listening on 127.0.0.1 only.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::free_port;

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    /// `pg_ctl -o` options (port, socket dir, settings).
    options: String,
    pub url: String,
}

fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

impl Postgres {
    fn run(&self, tool: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(args).output().expect("running a PostgreSQL tool")
    }

    fn data(&self) -> String {
        self.dir.path().join("data").to_string_lossy().into_owned()
    }

    /// Starts a server, or says why not: skipped where PostgreSQL is not installed, a failure
    /// in CI (which installs it).
    pub fn start() -> Option<Self> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is missing: .ci/run installs the Debian package postgresql"
            );
            eprintln!("SKIPPED: PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("tlb-pg")
            .tempdir_in("/tmp")
            .unwrap();
        // SAFETY: geteuid has no preconditions.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(ok.success(), "chown to postgres");
        }
        let port = free_port();
        let mut pg = Self {
            dir,
            bin,
            as_postgres,
            options: String::new(),
            url: String::new(),
        };
        let data = pg.data();
        let out = pg.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sock = pg.dir.path().to_string_lossy().into_owned();
        pg.options = format!(
            "-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        );
        pg.resume();
        pg.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        Some(pg)
    }

    /// Starts the server (again, after [`Self::stop`]) on the same port and data.
    pub fn resume(&self) {
        let log = self.dir.path().join("log").to_string_lossy().into_owned();
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &self.options,
                "-l",
                &log,
                "-w",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server at once (an outage: open connections are cut).
    pub fn stop(&self) {
        let out = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self.run("pg_ctl", &["-D", &data, "-m", "immediate", "stop"]);
    }
}

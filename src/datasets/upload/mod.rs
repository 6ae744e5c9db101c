//! Dataset uploads. The bytes go to `<data-dir>/uploads/<sha256>.part` as they arrive, so an
//! upload cut short continues from what the server holds (its length is the committed offset).
//! Complete, they are checked against their SHA-256, extracted once per content into
//! `<data-dir>/uploads/<sha256>/` (atomically: a temp folder renamed into place) and inspected.
//! Partial uploads nobody continues are removed after the TTL.

mod archive;
mod args;
pub mod fetched;
mod inspect;
pub mod remote;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

pub use archive::Limits;
pub use args::UploadArgs;
pub use inspect::Inspected;

use crate::engine::data::DatasetFormat;
use crate::error::ApiError;

/// `dataset_path` prefix of a job that trains on an upload: `upload:<sha256>/<root>`.
pub const UPLOAD_PREFIX: &str = "upload:";

/// The server's uploads: where they live and what bounds them.
#[derive(Debug)]
pub struct Uploads {
    pub dir: PathBuf,
    pub limits: Limits,
    /// Archive bytes one token may keep stored (0: no quota).
    pub quota_bytes: u64,
    pub ttl: Duration,
    /// The S3 settings `s3://` dataset URIs are read with.
    pub s3: crate::artifacts::ArtifactArgs,
    /// Datasets fetched from object storage, kept as a bounded cache.
    pub fetched: fetched::Fetched,
    /// Digests and names being received now.
    busy: Mutex<HashSet<String>>,
}

/// An upload being received; its digest and name are free again when it is dropped.
pub struct Receiving {
    _busy: Busy,
    file: tokio::fs::File,
    pub sha256: String,
    pub received: u64,
    pub total: u64,
}

/// Keys (digest, name) of an upload being received, released when dropped.
struct Busy {
    uploads: Arc<Uploads>,
    keys: [String; 2],
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut busy = self.uploads.busy.lock().expect("uploads lock");
        for key in &self.keys {
            busy.remove(key);
        }
    }
}

fn io(what: &str) -> impl Fn(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::internal(anyhow::anyhow!("{what}: {e}"))
}

impl Uploads {
    pub fn new(data_dir: &Path, limits: Limits, quota_bytes: u64, ttl: Duration) -> Self {
        Self {
            dir: data_dir.join("uploads"),
            limits,
            quota_bytes,
            ttl,
            s3: crate::artifacts::ArtifactArgs::default(),
            fetched: fetched::Fetched::new(data_dir.join("cache/datasets"), 0),
            busy: Mutex::default(),
        }
    }

    /// Keeps datasets fetched from object storage under `dir`, `bound` bytes of them (0: no
    /// bound).
    pub fn with_cache(mut self, dir: PathBuf, bound: u64) -> Self {
        self.fetched = fetched::Fetched::new(dir, bound);
        self
    }

    /// Reads `s3://` dataset URIs with these settings.
    pub fn with_s3(mut self, s3: crate::artifacts::ArtifactArgs) -> Self {
        self.s3 = s3;
        self
    }

    fn part(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.part"))
    }

    /// The extracted tree of the upload with this digest.
    pub fn tree(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Bytes of an unfinished upload the server holds (0: none).
    pub fn committed(&self, sha256: &str) -> u64 {
        std::fs::metadata(self.part(sha256)).map_or(0, |m| m.len())
    }

    /// Starts (or continues, from `offset`) receiving the upload of `sha256` under `name`.
    pub async fn begin(
        self: &Arc<Self>,
        sha256: &str,
        name: &str,
        offset: u64,
        total: u64,
    ) -> Result<Receiving, ApiError> {
        let keys = [format!("sha256:{sha256}"), format!("name:{name}")];
        {
            let mut busy = self.busy.lock().expect("uploads lock");
            if keys.iter().any(|k| busy.contains(k)) {
                return Err(ApiError::FailedPrecondition(format!(
                    "an upload of '{name}' (or of the same bytes) is in progress; retry when it ends"
                )));
            }
            busy.extend(keys.iter().cloned());
        }
        let busy = Busy {
            uploads: self.clone(),
            keys,
        };
        let held = self.committed(sha256);
        if offset > held {
            return Err(ApiError::field(
                "offset",
                format!("is {offset}, but the server holds {held} bytes of this upload; continue from {held} (GetUpload)"),
            ));
        }
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(io("creating the uploads folder"))?;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.part(sha256))
            .await
            .map_err(io("opening the upload"))?;
        file.set_len(offset)
            .await
            .map_err(io("resuming the upload"))?;
        let mut file = file;
        tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(offset))
            .await
            .map_err(io("resuming the upload"))?;
        Ok(Receiving {
            _busy: busy,
            file,
            sha256: sha256.to_string(),
            received: offset,
            total,
        })
    }

    /// Drops what the server holds of an unfinished upload.
    pub fn discard(&self, sha256: &str) {
        let _ = std::fs::remove_file(self.part(sha256));
    }

    /// Removes partial uploads untouched for longer than the TTL (not those being received),
    /// and extraction folders and files a crash left behind (here and in the cache dir).
    pub fn sweep(&self) -> usize {
        let busy = self.busy.lock().expect("uploads lock").clone();
        let now = SystemTime::now();
        let stale = |p: &Path| {
            let sha = p.file_stem().map(|s| s.to_string_lossy().into_owned());
            let old = p
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > self.ttl);
            old && !sha.is_some_and(|s| busy.contains(&format!("sha256:{s}")))
        };
        // Extractions a crash cut short leave `.<sha256>.tmp-*` folders: removed alike.
        let temp = |p: &Path| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            name.starts_with('.') && name.contains(".tmp-")
        };
        let remove = |p: &Path| match p.extension() {
            Some(e) if e == "part" => std::fs::remove_file(p).is_ok(),
            _ if temp(p) && p.is_dir() => std::fs::remove_dir_all(p).is_ok(),
            _ => temp(p) && std::fs::remove_file(p).is_ok(),
        };
        [&self.dir, &self.fetched.dir]
            .into_iter()
            .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
            .map(|e| e.path())
            .filter(|p| stale(p) && remove(p))
            .count()
    }

    /// Checks a complete upload, extracts and inspects it (blocking). The tree is kept once
    /// per content: when it is there already, only the inspection runs.
    pub fn finish(
        &self,
        sha256: &str,
        format: DatasetFormat,
    ) -> Result<(Inspected, u64), ApiError> {
        let tree = self.tree(sha256);
        if tree.is_dir() {
            let inspected = inspect::inspect(&tree, format)?;
            return Ok((inspected, dir_bytes(&tree)));
        }
        let part = self.part(sha256);
        let unpacked = self.unpack(&part, sha256, format);
        match &unpacked {
            // Kept as the archive (for other replicas, through the artifact store).
            Ok(_) => {
                std::fs::rename(&part, self.archive(sha256)).map_err(io("keeping the upload"))?
            }
            Err(_) => {
                let _ = std::fs::remove_file(&part);
            }
        }
        unpacked
    }

    /// The archive an upload was extracted from (`<sha256>.archive`).
    pub fn archive(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.archive"))
    }

    /// Extracts the kept archive of an upload another replica received (blocking), unless
    /// its tree is here already.
    pub fn restore(&self, sha256: &str, format: DatasetFormat) -> Result<(), ApiError> {
        if !self.tree(sha256).is_dir() {
            self.unpack(&self.archive(sha256), sha256, format)?;
        }
        Ok(())
    }

    /// Checks `source` against its digest, extracts and inspects it into the upload's tree.
    fn unpack(
        &self,
        source: &Path,
        sha256: &str,
        format: DatasetFormat,
    ) -> Result<(Inspected, u64), ApiError> {
        let file = std::fs::File::open(source).map_err(io("reading the upload"))?;
        let digest = sha256_hex(file).map_err(io("reading the upload"))?;
        if digest != sha256 {
            return Err(ApiError::field(
                "sha256",
                format!(
                    "the bytes received hash to {digest}, not {sha256}; the upload was discarded"
                ),
            ));
        }
        self.extract_tree(source, sha256, format)
    }

    /// Extracts the archive `source` and makes it the tree `id` names (blocking).
    fn extract_tree(
        &self,
        source: &Path,
        id: &str,
        format: DatasetFormat,
    ) -> Result<(Inspected, u64), ApiError> {
        let temp = self.temp(id)?;
        archive::extract(source, temp.path(), self.limits)?;
        self.adopt(temp, id, format)
    }

    /// A folder to fill for the tree `id` names (removed on drop; a crash's are swept).
    fn temp(&self, id: &str) -> Result<tempfile::TempDir, ApiError> {
        fetched::temp_in(&self.dir, id)
    }

    /// Inspects a filled temp folder and makes it the tree `id` names (blocking).
    fn adopt(
        &self,
        temp: tempfile::TempDir,
        id: &str,
        format: DatasetFormat,
    ) -> Result<(Inspected, u64), ApiError> {
        let (inspected, bytes) = checked(temp.path(), format)?;
        std::fs::rename(temp.keep(), self.tree(id)).map_err(io("storing the upload"))?;
        Ok((inspected, bytes))
    }
}

/// A filled folder inspected as a dataset of `format`, and its bytes (blocking).
fn checked(dir: &Path, format: DatasetFormat) -> Result<(Inspected, u64), ApiError> {
    Ok((inspect::inspect(dir, format)?, dir_bytes(dir)))
}

impl Receiving {
    /// Appends a chunk; refuses bytes beyond the declared total.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), ApiError> {
        if self.received + chunk.len() as u64 > self.total {
            return Err(ApiError::field(
                "total_bytes",
                format!("is {}, but more bytes than that were sent", self.total),
            ));
        }
        self.file
            .write_all(chunk)
            .await
            .map_err(io("writing the upload"))?;
        self.received += chunk.len() as u64;
        Ok(())
    }

    /// Makes what was received durable (the committed offset a client resumes from).
    pub async fn sync(&mut self) -> Result<(), ApiError> {
        self.file.flush().await.map_err(io("writing the upload"))?;
        self.file
            .sync_data()
            .await
            .map_err(io("writing the upload"))
    }
}

/// The SHA-256 of what `bytes` reads, as 64 lowercase hex digits.
pub fn sha256_hex(mut bytes: impl std::io::Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut bytes, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                    _ => e.metadata().map_or(0, |m| m.len()),
                })
                .sum()
        })
        .unwrap_or(0)
}

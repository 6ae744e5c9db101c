//! The artifact store: where checkpoints live beyond one replica's disk.
//!
//! Without `--artifact-store` it is the data dir itself and nothing is copied (today's layout,
//! nothing to run). With `s3://BUCKET/PREFIX` (any S3-compatible service, through Apache
//! Arrow's `object_store`) every checkpoint is uploaded before the job store commits its row,
//! and a replica that lacks a committed file (another replica wrote it) downloads it into its
//! own data dir before reading it, where it stays as the local copy. Keys are the files' paths
//! relative to the data dir (`PREFIX/jobs/<id>/checkpoints/epoch-0001.a1.ckpt`), the same on
//! every replica; each attempt writes its own names, so a paused owner cannot overwrite what
//! the new owner committed. What is read is verified by the checkpoint's own checksum.

mod cache;
mod config;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::path::Path as Key;

use crate::engine::train::write_atomic;
use object_store::{ObjectStore, PutMode, PutPayload};
use std::sync::atomic::{AtomicBool, Ordering};

pub use cache::Held;
pub use config::{Addressing, ArtifactArgs};

/// A client of the bucket at `s3://BUCKET` with the server's S3 settings (endpoint,
/// addressing, credentials from the AWS environment): for datasets in users' buckets.
pub fn bucket(
    args: &ArtifactArgs,
    url: &str,
) -> anyhow::Result<(
    std::sync::Arc<dyn object_store::ObjectStore>,
    object_store::path::Path,
)> {
    config::s3(args, url)
}

/// Why the artifact store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// It refused this server's credentials, or the bucket does not exist: an operator's
    /// setting to change.
    #[error("the artifact store {url} refuses this server: {reason}")]
    Refused { url: String, reason: String },
    /// It could not be reached, or failed: retry later.
    #[error("the artifact store {url} is unavailable ({reason}); retry later")]
    Unavailable { url: String, reason: String },
    /// A local file to publish or fetch into could not be read or written.
    #[error("{0:#}")]
    Local(anyhow::Error),
}

/// Where artifacts are kept; cheap to clone.
#[derive(Clone)]
pub struct Artifacts {
    data_dir: PathBuf,
    remote: Option<Arc<Remote>>,
}

struct Remote {
    /// The data dir's copies of what the store holds, bounded.
    cache: cache::Cache,
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    /// `s3://bucket/prefix`, for messages (holds no secret).
    url: String,
    /// The store answered a conditional put with "not implemented": plain puts from then on.
    no_conditional: AtomicBool,
}

/// Whether `file` is written once under its name (not a run's rewritten `best`/`last` copy).
fn write_once(file: &Path) -> bool {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    !crate::engine::train::CheckpointDir::is_rewritten(&name) && !is_event_file(file)
}

/// A TensorBoard event file: rewritten as it grows, and small, so never evicted from disk.
fn is_event_file(file: &Path) -> bool {
    file.file_name().is_some_and(|n| {
        n.to_string_lossy()
            .contains(crate::engine::tensorboard::FILE_MARK)
    })
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Artifacts {
    /// The data dir itself: nothing is copied anywhere.
    pub fn local(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            remote: None,
        }
    }

    /// The store `args` name, for a server whose data dir is `data_dir`.
    pub fn open(args: &ArtifactArgs, data_dir: &Path) -> anyhow::Result<Self> {
        let Some(url) = args.artifact_store.as_deref() else {
            return Ok(Self::local(data_dir));
        };
        if let Some(path) = url.strip_prefix("file://") {
            let same = Path::new(path).canonicalize().ok() == data_dir.canonicalize().ok();
            anyhow::ensure!(
                same,
                "--artifact-store {url}: a file:// store is the data dir ({}); for a store \
                 that several replicas share, use s3://BUCKET/PREFIX",
                data_dir.display()
            );
            return Ok(Self::local(data_dir));
        }
        let (store, prefix) = config::s3(args, url)?;
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            remote: Some(Arc::new(Remote {
                cache: cache::Cache::new(args.cache_bytes, data_dir),
                store,
                prefix,
                url: url.trim_end_matches('/').to_string(),
                no_conditional: AtomicBool::new(false),
            })),
        })
    }

    /// A remote store given as an `ObjectStore` (the unit tests' in-memory one).
    #[cfg(test)]
    fn with_store(data_dir: &Path, store: Arc<dyn ObjectStore>, prefix: &str, limit: u64) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            remote: Some(Arc::new(Remote {
                cache: cache::Cache::new(limit, data_dir),
                store,
                prefix: Key::from(prefix),
                url: format!("test://{prefix}"),
                no_conditional: AtomicBool::new(false),
            })),
        }
    }

    /// `s3://bucket/prefix`, or `file://<data dir>`.
    pub fn describe(&self) -> String {
        match &self.remote {
            Some(r) => r.url.clone(),
            None => format!("file://{}", self.data_dir.display()),
        }
    }

    /// Whether files are copied to a store beyond the data dir.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Lists the prefix: wrong credentials or a missing bucket are `Refused`, an unreachable
    /// service `Unavailable`. The data dir alone always passes.
    pub async fn check(&self) -> Result<(), ArtifactError> {
        let Some(r) = &self.remote else {
            return Ok(());
        };
        r.store
            .list_with_delimiter(Some(&r.prefix))
            .await
            .map(|_| ())
            .map_err(|e| r.error(e, true))
    }

    /// Uploads `file` (under the data dir) to its key. Nothing to do without a remote store.
    ///
    /// Files written once (epoch checkpoints, uploads, imports) are put only if the key is
    /// free (`If-None-Match: *`, where the store has conditional puts): a stored object is
    /// never replaced. Finding the same bytes there (an earlier try that landed) is success;
    /// other bytes are an error. A run's `best` and `last` copies are rewritten by design.
    pub async fn publish(&self, file: &Path) -> Result<(), ArtifactError> {
        let Some(r) = &self.remote else {
            return Ok(());
        };
        let key = self.key(r, file)?;
        let bytes = tokio::fs::read(file)
            .await
            .map_err(|e| local(format!("reading {}", file.display()), e))?;
        let len = bytes.len() as u64;
        let once = write_once(file) && !r.no_conditional.load(Ordering::Relaxed);
        let mode = if once {
            PutMode::Create
        } else {
            PutMode::Overwrite
        };
        // Cloned by reference count: the checkpoint's bytes are not copied.
        let payload = PutPayload::from(bytes);
        let put = r.store.put_opts(&key, payload.clone(), mode.into());
        match put.await {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => {
                let stored = r.store.get(&key).await.map_err(|e| r.error(e, false))?;
                let stored = stored.bytes().await.map_err(|e| r.error(e, false))?;
                if !stored.iter().eq(payload.iter().flatten()) {
                    return Err(ArtifactError::Local(anyhow::anyhow!(
                        "{} already holds other bytes than {}; a stored object is never \
                         replaced",
                        key,
                        file.display()
                    )));
                }
            }
            Err(object_store::Error::NotImplemented) if once => {
                tracing::warn!(store = %r.url, "the store has no conditional puts: objects are overwritten");
                r.no_conditional.store(true, Ordering::Relaxed);
                r.store
                    .put(&key, payload)
                    .await
                    .map_err(|e| r.error(e, false))?;
            }
            Err(e) => return Err(r.error(e, false)),
        }
        if !is_event_file(file) {
            r.cache.stored(file, len);
            self.evict(r, file).await;
        }
        Ok(())
    }

    /// The names of the objects directly under the folder `dir` (under the data dir) in the
    /// store; without a remote store, the folder's files.
    pub async fn list(&self, dir: &Path) -> Result<Vec<String>, ArtifactError> {
        let Some(r) = &self.remote else {
            let names = std::fs::read_dir(dir).into_iter().flatten().flatten();
            return Ok(names
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect());
        };
        let key = self.key(r, dir)?;
        let listed = r
            .store
            .list_with_delimiter(Some(&key))
            .await
            .map_err(|e| r.error(e, true))?;
        Ok(listed
            .objects
            .into_iter()
            .filter_map(|o| o.location.filename().map(str::to_string))
            .collect())
    }

    /// Deletes the copies of `files` (under the data dir) in the store (a missing one is no
    /// error); the local files are the caller's. Nothing to do without a remote store.
    pub async fn delete(&self, files: &[PathBuf]) -> Result<(), ArtifactError> {
        let Some(r) = &self.remote else {
            return Ok(());
        };
        for file in files {
            match r.store.delete(&self.key(r, file)?).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(r.error(e, false)),
            }
            r.cache.removed(file);
        }
        Ok(())
    }

    /// Makes `file` (under the data dir) present locally: true when it is there already or was
    /// downloaded, false when the store does not hold it either.
    pub async fn fetch(&self, file: &Path) -> Result<bool, ArtifactError> {
        let Some(r) = &self.remote else {
            return Ok(file.exists());
        };
        if file.exists() {
            r.cache.touch(file);
            return Ok(true);
        }
        let key = self.key(r, file)?;
        let got = match r.store.get(&key).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(r.error(e, false)),
        };
        let bytes = got.bytes().await.map_err(|e| r.error(e, false))?;
        let len = bytes.len() as u64;
        let target = file.to_path_buf();
        tokio::task::spawn_blocking(move || write_atomic(&target, &bytes))
            .await
            .map_err(|e| ArtifactError::Local(e.into()))?
            .map_err(ArtifactError::Local)?;
        r.cache.stored(file, len);
        self.evict(r, file).await;
        Ok(true)
    }

    /// Keeps the job's run directory `dir` out of the cache's evictions while the guard lives
    /// (a job training here).
    pub fn hold(&self, dir: &Path) -> Option<Held<'_>> {
        self.remote.as_ref().map(|r| r.cache.hold(dir))
    }

    /// Removes the least recently used copies past `--cache-bytes` (never `keep`, a held run
    /// directory, or a copy the store does not hold: one found on disk at start is checked
    /// by its size in the store first). A copy removed is fetched again when next needed.
    async fn evict(&self, r: &Remote, keep: &Path) {
        let (mut excess, candidates) = r.cache.candidates(keep);
        for (file, bytes, stored) in candidates {
            if excess == 0 {
                break;
            }
            if !stored {
                let Ok(key) = self.key(r, &file) else {
                    continue;
                };
                match r.store.head(&key).await {
                    Ok(meta) if meta.size == bytes => {}
                    _ => continue,
                }
            }
            match std::fs::remove_file(&file) {
                Ok(()) => {
                    r.cache.removed(&file);
                    excess = excess.saturating_sub(bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => r.cache.removed(&file),
                Err(e) => {
                    tracing::warn!(error = %e, file = %file.display(), "evicting a cached checkpoint")
                }
            }
        }
    }

    /// The key of a file under the data dir.
    fn key(&self, r: &Remote, file: &Path) -> Result<Key, ArtifactError> {
        let rel = file.strip_prefix(&self.data_dir).map_err(|_| {
            ArtifactError::Local(anyhow::anyhow!(
                "{} is outside the data dir {}",
                file.display(),
                self.data_dir.display()
            ))
        })?;
        let mut key = r.prefix.clone();
        for part in rel.components() {
            let part = part.as_os_str().to_string_lossy();
            key = key.child(part.as_ref());
        }
        Ok(key)
    }
}

impl Remote {
    fn error(&self, e: object_store::Error, listing: bool) -> ArtifactError {
        use object_store::Error as E;
        let url = self.url.clone();
        let text = e.to_string();
        // object_store reports some HTTP statuses only in its message (a list request's 403).
        let refused = matches!(e, E::PermissionDenied { .. } | E::Unauthenticated { .. })
            || [
                "403 Forbidden",
                "401 Unauthorized",
                "SignatureDoesNotMatch",
                "InvalidAccessKeyId",
            ]
            .iter()
            .any(|s| text.contains(s));
        // Listing a prefix finds nothing rather than failing: there only a missing bucket is
        // "not found".
        let no_bucket =
            text.contains("NoSuchBucket") || (listing && matches!(e, E::NotFound { .. }));
        if refused {
            ArtifactError::Refused {
                url,
                reason: format!("credentials refused: {text}"),
            }
        } else if no_bucket {
            ArtifactError::Refused {
                url,
                reason: format!("no such bucket: {text}"),
            }
        } else {
            ArtifactError::Unavailable { url, reason: text }
        }
    }
}

fn local(what: String, e: std::io::Error) -> ArtifactError {
    ArtifactError::Local(anyhow::Error::new(e).context(what))
}

#[cfg(test)]
mod tests;

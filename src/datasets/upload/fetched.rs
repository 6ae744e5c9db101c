//! Datasets fetched from object storage (`s3://` URIs) are a cache: they live under
//! `--cache-dir` (`<cache-dir>/datasets/<id>/`), each with a stamp (`<id>.used`: its bytes,
//! and the time it was last used as the file's mtime), and past `--dataset-cache-bytes` the
//! least recently used are removed. A tree a job trains on is held ([`InUse`]) and never
//! removed; one removed is fetched again when a job next needs it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::{checked, dir_bytes, io, Inspected, Uploads};
use crate::engine::data::DatasetFormat;
use crate::error::ApiError;

/// `dataset_path` prefix of a tree fetched from object storage: `fetched:<id>/<root>`.
pub const FETCHED_PREFIX: &str = "fetched:";

/// The fetched trees: where they are, what bounds them, which are held.
#[derive(Debug, Default)]
pub struct Fetched {
    pub dir: PathBuf,
    /// Bytes of trees kept (0: no bound).
    pub bound: u64,
    /// Trees held by jobs, with how many hold each.
    held: Mutex<HashMap<String, usize>>,
}

/// A fetched tree a job uses: it is not removed while this lives.
#[must_use]
pub struct InUse {
    uploads: Arc<Uploads>,
    pub(super) id: String,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut held = self.uploads.fetched.lock();
        if let Some(n) = held.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.id);
            }
        }
    }
}

impl Fetched {
    pub fn new(dir: PathBuf, bound: u64) -> Self {
        Self {
            dir,
            bound,
            held: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.held.lock().expect("fetched trees lock")
    }

    /// The tree of the content `id` names.
    pub fn tree(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn stamp(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.used"))
    }

    /// Marks the tree used now (its stamp's mtime), recording its bytes.
    fn touch(&self, id: &str, bytes: Option<u64>) -> std::io::Result<()> {
        let stamp = self.stamp(id);
        match bytes {
            Some(bytes) => std::fs::write(&stamp, bytes.to_string()),
            None => std::fs::File::options()
                .append(true)
                .open(&stamp)?
                .set_modified(SystemTime::now()),
        }
    }

    /// Removes the least recently used trees past the bound that nobody holds and nobody
    /// used since `before` (blocking); how many went.
    pub fn sweep(&self, before: SystemTime) -> usize {
        if self.bound == 0 {
            return 0;
        }
        let mut trees: Vec<(SystemTime, u64, String)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|id| !id.starts_with('.'))
            .map(|id| {
                let stamp = self.stamp(&id);
                let used = stamp.metadata().and_then(|m| m.modified());
                let bytes = std::fs::read_to_string(&stamp)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or_else(|| dir_bytes(&self.tree(&id)));
                (used.unwrap_or(SystemTime::UNIX_EPOCH), bytes, id)
            })
            .collect();
        trees.sort();
        let mut total: u64 = trees.iter().map(|t| t.1).sum();
        let mut removed = 0;
        for (used, bytes, id) in trees {
            if total <= self.bound {
                break;
            }
            if used >= before {
                continue;
            }
            // Moved aside under the lock, so no job takes it meanwhile; deleted after.
            let aside = self.dir.join(format!(".{id}.tmp-evicted"));
            {
                let held = self.lock();
                if held.contains_key(&id) || std::fs::rename(self.tree(&id), &aside).is_err() {
                    continue;
                }
            }
            let _ = std::fs::remove_file(self.stamp(&id));
            let _ = std::fs::remove_dir_all(&aside);
            total = total.saturating_sub(bytes);
            removed += 1;
        }
        removed
    }
}

impl Uploads {
    /// Holds the fetched tree `id` when it is here (marking it used); `None` when it must
    /// be fetched.
    pub(super) fn hold_fetched(self: &Arc<Self>, id: &str) -> Option<InUse> {
        let mut held = self.fetched.lock();
        if !self.fetched.tree(id).is_dir() {
            return None;
        }
        *held.entry(id.to_string()).or_default() += 1;
        drop(held);
        let _ = self.fetched.touch(id, None);
        Some(InUse {
            uploads: self.clone(),
            id: id.to_string(),
        })
    }

    /// Inspects the filled folder `temp` and makes it the fetched tree `id`, held
    /// (blocking).
    pub(super) fn adopt_fetched(
        self: &Arc<Self>,
        temp: tempfile::TempDir,
        id: &str,
        format: DatasetFormat,
    ) -> Result<(Inspected, InUse), ApiError> {
        let (inspected, bytes) = checked(temp.path(), format)?;
        self.fetched
            .touch(id, Some(bytes))
            .map_err(io("stamping the dataset"))?;
        let mut held = self.fetched.lock();
        let tree = self.fetched.tree(id);
        if !tree.is_dir() {
            std::fs::rename(temp.keep(), &tree).map_err(io("storing the dataset"))?;
        }
        *held.entry(id.to_string()).or_default() += 1;
        let held = InUse {
            uploads: self.clone(),
            id: id.to_string(),
        };
        Ok((inspected, held))
    }

    /// A folder in the cache dir to fill for the fetched tree `id` (removed on drop; a
    /// crash's are swept).
    pub(super) fn fetched_temp(&self, id: &str) -> Result<tempfile::TempDir, ApiError> {
        temp_in(&self.fetched.dir, id)
    }
}

/// A folder `.<id>.tmp-*` in `dir` (created if needed).
pub(super) fn temp_in(dir: &Path, id: &str) -> Result<tempfile::TempDir, ApiError> {
    std::fs::create_dir_all(dir).map_err(io("creating the datasets folder"))?;
    tempfile::Builder::new()
        .prefix(&format!(".{id}.tmp-"))
        .tempdir_in(dir)
        .map_err(io("extracting the dataset"))
}

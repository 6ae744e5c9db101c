//! The data dir as a bounded cache of a remote store's checkpoints: past `--cache-bytes`, the
//! least recently used copies that the store is known to hold go first. A copy is known to be
//! stored once this process uploaded or downloaded it; copies found on disk at start are
//! checked against the store (same size) before one is removed. The checkpoints of a job this
//! replica runs are never removed, nor is anything the store does not hold.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// What the cache knows of one local copy.
#[derive(Clone, Copy, Debug)]
struct Copy {
    bytes: u64,
    last_use: SystemTime,
    /// Uploaded or downloaded by this process: the store holds these bytes.
    stored: bool,
}

#[derive(Debug, Default)]
pub(super) struct Cache {
    limit: u64,
    copies: Mutex<HashMap<PathBuf, Copy>>,
    /// Run directories of jobs training here: never evicted.
    held: Mutex<HashSet<PathBuf>>,
}

/// Holds a job's run directory out of eviction while it lives.
pub struct Held<'a> {
    cache: &'a Cache,
    dir: PathBuf,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        lock(&self.cache.held).remove(&self.dir);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Cache {
    /// A cache of `limit` bytes over the checkpoints already under `data_dir`.
    pub(super) fn new(limit: u64, data_dir: &Path) -> Self {
        let cache = Self {
            limit,
            ..Self::default()
        };
        let mut copies = lock(&cache.copies);
        for file in checkpoint_files(data_dir) {
            if let Ok(meta) = std::fs::metadata(&file) {
                let last_use = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let copy = Copy {
                    bytes: meta.len(),
                    last_use,
                    stored: false,
                };
                copies.insert(file, copy);
            }
        }
        drop(copies);
        cache
    }

    pub(super) fn hold(&self, dir: &Path) -> Held<'_> {
        lock(&self.held).insert(dir.to_path_buf());
        Held {
            cache: self,
            dir: dir.to_path_buf(),
        }
    }

    /// `file` (of `bytes`) is a copy of what the store holds, used now.
    pub(super) fn stored(&self, file: &Path, bytes: u64) {
        let copy = Copy {
            bytes,
            last_use: SystemTime::now(),
            stored: true,
        };
        lock(&self.copies).insert(file.to_path_buf(), copy);
    }

    /// `file` was read (or is about to be): the most recently used now.
    pub(super) fn touch(&self, file: &Path) {
        if let Some(c) = lock(&self.copies).get_mut(file) {
            c.last_use = SystemTime::now();
        }
    }

    /// How many bytes are over the limit, and the copies that may go, least recently used
    /// first: `(file, bytes, known to be stored)`; `keep` and held run directories are never
    /// among them.
    pub(super) fn candidates(&self, keep: &Path) -> (u64, Vec<(PathBuf, u64, bool)>) {
        let copies = lock(&self.copies).clone();
        let total: u64 = copies.values().map(|c| c.bytes).sum();
        let excess = total.saturating_sub(self.limit);
        if excess == 0 {
            return (0, Vec::new());
        }
        let held = lock(&self.held).clone();
        let mut order: Vec<(PathBuf, Copy)> = copies
            .into_iter()
            .filter(|(f, _)| f != keep && !held.iter().any(|d| f.starts_with(d)))
            .collect();
        order.sort_by_key(|(_, c)| c.last_use);
        let order = order.into_iter().map(|(f, c)| (f, c.bytes, c.stored));
        (excess, order.collect())
    }

    /// `file` is gone from the disk.
    pub(super) fn removed(&self, file: &Path) {
        lock(&self.copies).remove(file);
    }
}

/// `data_dir/jobs/*/checkpoints/*.ckpt`.
fn checkpoint_files(data_dir: &Path) -> Vec<PathBuf> {
    let Ok(jobs) = std::fs::read_dir(data_dir.join("jobs")) else {
        return Vec::new();
    };
    jobs.filter_map(Result::ok)
        .filter_map(|job| std::fs::read_dir(job.path().join("checkpoints")).ok())
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "ckpt"))
        .collect()
}

//! `tlb serve`'s flags for uploads and fetched datasets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Limits, Uploads};

/// `tlb serve`'s flags for uploads.
#[derive(clap::Args, Clone, Debug)]
pub struct UploadArgs {
    /// Bytes an uploaded archive may expand to; beyond it the upload is refused
    /// (RESOURCE_EXHAUSTED) before the disk fills.
    #[arg(long, env = "TLB_MAX_DATASET_BYTES", default_value_t = 20 << 30)]
    pub max_dataset_bytes: u64,
    /// Entries (files and folders) an uploaded archive may hold.
    #[arg(long, env = "TLB_MAX_DATASET_ENTRIES", default_value_t = 1_000_000)]
    pub max_dataset_entries: u64,
    /// Archive bytes of datasets one token may keep uploaded; 0: no quota.
    #[arg(long, env = "TLB_DATASET_QUOTA_BYTES", default_value_t = 50 << 30)]
    pub dataset_quota_bytes: u64,
    /// Seconds an unfinished upload is kept for its client to continue it.
    #[arg(long, env = "TLB_UPLOAD_TTL", default_value_t = 86_400)]
    pub upload_ttl: u64,
    /// Where datasets fetched from object storage (s3:// URIs) are kept; default
    /// <data-dir>/cache (a fast local disk is a good choice)
    #[arg(long, env = "TLB_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Bytes of fetched datasets the cache dir keeps: the least recently used beyond it are
    /// removed when no job on this server trains on them (fetched again when needed); 0: no
    /// bound
    #[arg(long, env = "TLB_DATASET_CACHE_BYTES", default_value_t = 50 << 30)]
    pub dataset_cache_bytes: u64,
}

impl UploadArgs {
    pub fn uploads(&self, data_dir: &Path) -> Uploads {
        let limits = Limits {
            bytes: self.max_dataset_bytes,
            entries: self.max_dataset_entries,
        };
        let ttl = Duration::from_secs(self.upload_ttl);
        let cache = self
            .cache_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("cache"));
        Uploads::new(data_dir, limits, self.dataset_quota_bytes, ttl)
            .with_cache(cache.join("datasets"), self.dataset_cache_bytes)
    }
}

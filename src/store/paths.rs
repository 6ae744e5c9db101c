//! File paths in the store are relative to the data dir (`jobs/<id>/checkpoints/…`), so that
//! replicas that mount a shared data dir at different places read the same rows. Rows written
//! with absolute paths (by tlb before this rule) are converted when a store is opened, and
//! read by their part from `jobs/<id>/` on in any case.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use sqlx::{AnyPool, Row};
use uuid::Uuid;

#[derive(Clone, Debug)]
pub(super) struct StoredPaths {
    data_dir: Arc<PathBuf>,
}

impl StoredPaths {
    pub(super) fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: Arc::new(data_dir.to_path_buf()),
        }
    }

    /// How `path` is stored: relative to the data dir.
    pub(super) fn stored(&self, path: &Path) -> String {
        let relative = path
            .strip_prefix(&*self.data_dir)
            .ok()
            .map(Path::to_path_buf)
            .or_else(|| from_job_dir(path));
        relative
            .as_deref()
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }

    /// Where a stored path is on this replica.
    pub(super) fn local(&self, stored: &str) -> PathBuf {
        let path = Path::new(stored);
        if path.is_relative() {
            return self.data_dir.join(path);
        }
        match from_job_dir(path) {
            Some(relative) => self.data_dir.join(relative),
            None => path.to_path_buf(),
        }
    }
}

/// The part of a path from its job directory on (`jobs/<uuid>/…`), if it has one.
fn from_job_dir(path: &Path) -> Option<PathBuf> {
    let parts: Vec<Component> = path.components().collect();
    let at = (0..parts.len().saturating_sub(2)).rev().find(|&i| {
        parts[i].as_os_str() == "jobs"
            && parts[i + 1]
                .as_os_str()
                .to_str()
                .is_some_and(|id| Uuid::parse_str(id).is_ok())
    })?;
    Some(parts[at..].iter().collect())
}

/// Rewrites absolute paths that older versions stored as relative ones (idempotent: replicas
/// opening the store at once write the same values).
pub(super) async fn make_relative(pool: &AnyPool) -> Result<u64> {
    let mut changed = 0;
    for (table, key, column) in [
        ("checkpoints", "id", "path"),
        ("checkpoints", "id", "copy_path"),
        ("jobs", "id", "resume_path"),
    ] {
        let rows = sqlx::query(&format!(
            "SELECT {key}, {column} FROM {table} WHERE {column} LIKE '/%'"
        ))
        .fetch_all(pool)
        .await?;
        for row in rows {
            let (id, path): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            let Some(relative) = from_job_dir(Path::new(&path)) else {
                continue;
            };
            sqlx::query(&format!(
                "UPDATE {table} SET {column} = $1 WHERE {key} = $2"
            ))
            .bind(relative.to_string_lossy().into_owned())
            .bind(id)
            .execute(pool)
            .await?;
            changed += 1;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn paths_are_stored_relative_and_read_under_any_mount_point() {
        let here = StoredPaths::new(Path::new("/mnt/a/tlb-data"));
        let file = format!("/mnt/a/tlb-data/jobs/{JOB}/checkpoints/a1/epoch-0002.ckpt");
        let stored = here.stored(Path::new(&file));
        assert_eq!(stored, format!("jobs/{JOB}/checkpoints/a1/epoch-0002.ckpt"));
        let there = StoredPaths::new(Path::new("/srv/share"));
        assert_eq!(
            there.local(&stored),
            PathBuf::from(format!(
                "/srv/share/jobs/{JOB}/checkpoints/a1/epoch-0002.ckpt"
            ))
        );
        // An absolute path another replica stored is read by its job-directory part.
        assert_eq!(there.local(&file), there.local(&stored));
        // A relative data dir works the same.
        let relative = StoredPaths::new(Path::new("./tlb-data"));
        let file = format!("./tlb-data/jobs/{JOB}/best.ckpt");
        assert_eq!(
            relative.stored(Path::new(&file)),
            format!("jobs/{JOB}/best.ckpt")
        );
        // Paths outside any job directory stay as they are.
        assert_eq!(
            there.local("/elsewhere/x.ckpt"),
            PathBuf::from("/elsewhere/x.ckpt")
        );
        assert_eq!(from_job_dir(Path::new("/a/jobs/not-a-uuid/x")), None);
    }
}

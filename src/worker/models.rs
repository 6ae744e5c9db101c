//! Which file a model request reads: a checkpoint row's file under this replica's data dir
//! (or its job's best copy when that file was pruned), fetched from the artifact store first
//! when another replica wrote it.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::artifacts::Artifacts;
use crate::engine::train::CheckpointDir;
use crate::error::ApiError;
use crate::store::CheckpointRow;

/// A checkpoint to run inference with.
#[derive(Clone, Debug)]
pub struct ModelRef {
    pub checkpoint_id: Uuid,
    pub path: PathBuf,
    /// Read instead when `path` was pruned (a job's `best.ckpt` holds its best epoch).
    pub fallback: Option<PathBuf>,
}

impl ModelRef {
    /// The model a checkpoint row stands for, under this replica's data dir.
    pub fn of(data_dir: &Path, row: &CheckpointRow) -> Self {
        Self {
            checkpoint_id: row.id,
            path: row.path.clone(),
            fallback: row.is_best.then(|| {
                row.copy_path.clone().unwrap_or_else(|| {
                    // Written before copies were recorded: the run's untagged best copy.
                    CheckpointDir::new(
                        crate::store::job_dir(data_dir, row.job_id).join("checkpoints"),
                    )
                    .best_path()
                })
            }),
        }
    }

    /// The file to read: `path`, or the fallback when `path` was pruned.
    pub fn file(&self) -> &Path {
        match (&self.fallback, self.path.exists()) {
            (Some(fallback), false) => fallback,
            _ => &self.path,
        }
    }
}

/// The model a checkpoint row stands for, with its file present in this replica's data dir:
/// fetched from the artifact store when another replica wrote it (UNAVAILABLE while the store
/// cannot be reached; models already here are served meanwhile).
pub async fn local_model(
    artifacts: &Artifacts,
    data_dir: &Path,
    row: &CheckpointRow,
) -> Result<ModelRef, ApiError> {
    let model = ModelRef::of(data_dir, row);
    if !artifacts.fetch(&model.path).await? {
        if let Some(fallback) = &model.fallback {
            artifacts.fetch(fallback).await?;
        }
    }
    Ok(model)
}

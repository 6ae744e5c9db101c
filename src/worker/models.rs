//! Which file a model request reads: a checkpoint row's file under this replica's data dir
//! (or its job's best copy when that file was pruned), fetched from the artifact store first
//! when another replica wrote it; and imported models, which become finished jobs.

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::artifacts::Artifacts;
use crate::engine::train::{write_atomic, Checkpoint, CheckpointDir};
use crate::error::ApiError;
use crate::store::{job_dir, CheckpointRow, JobRow, JobState, Store};

/// The preset and dataset format of an imported model's job.
pub const IMPORTED: &str = "imported";

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

/// Adds an imported model: a finished job (`preset` and dataset format `imported`, `name` as
/// its dataset path) whose one checkpoint is its best. The file is written under this
/// replica's data dir and published to the artifact store before the rows commit; when any
/// step fails, nothing is left behind (no rows, no local file).
pub async fn add_imported(
    store: &Store,
    artifacts: &Artifacts,
    data_dir: &Path,
    checkpoint: Checkpoint,
    name: &str,
    created_by: String,
) -> Result<(JobRow, CheckpointRow), ApiError> {
    let mut job = JobRow::queued(IMPORTED, checkpoint.meta.config.clone(), IMPORTED, name);
    job.state = JobState::Succeeded;
    job.epochs_total = 0;
    job.created_by = created_by;
    job.labels = checkpoint.meta.class_names.clone();
    let dir = job_dir(data_dir, job.id);
    let row = CheckpointRow {
        id: Uuid::new_v4(),
        job_id: job.id,
        epoch: 0,
        val_accuracy: None,
        path: CheckpointDir::new(dir.join("checkpoints")).best_path(),
        is_best: true,
        created_at_ms: job.created_at_ms,
        copy_path: None,
    };
    let stored = async {
        let path = row.path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(path.parent().expect("a checkpoint's folder"))?;
            write_atomic(&path, &checkpoint.encode()?)
        })
        .await
        .map_err(|e| anyhow::anyhow!("writing the imported checkpoint: {e}"))?
        .map_err(ApiError::internal)?;
        artifacts.publish(&row.path).await?;
        store.insert_imported(&job, &row).await?;
        Ok::<_, ApiError>(())
    };
    if let Err(e) = stored.await {
        let _ = tokio::fs::remove_dir_all(&dir).await;
        return Err(e);
    }
    Ok((job, row))
}

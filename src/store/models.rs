//! What the store knows of models beyond their checkpoints: class names, and imported models
//! (a finished job of one checkpoint, written in one transaction).

use super::{CheckpointRow, Fence, JobRow, Store, StoreResult, CHECKPOINT_COLUMNS};

/// The `labels_json` column: NULL when no names are known.
pub(super) fn labels_json(labels: &[String]) -> anyhow::Result<Option<String>> {
    Ok(if labels.is_empty() {
        None
    } else {
        Some(serde_json::to_string(labels)?)
    })
}

impl Store {
    /// Records the class names of a job's model (fenced: by the attempt that runs it).
    pub async fn set_labels(&self, fence: Fence, labels: &[String]) -> StoreResult<()> {
        let labels = labels_json(labels)?;
        self.write(async |c| {
            let done =
                sqlx::query("UPDATE jobs SET labels_json = $3 WHERE id = $1 AND attempt = $2")
                    .bind(fence.job.to_string())
                    .bind(fence.attempt as i64)
                    .bind(labels)
                    .execute(c)
                    .await?;
            fence.check(done.rows_affected())?;
            Ok(())
        })
        .await
    }

    /// Adds an imported model: its job (already finished, with its class names) and its one
    /// checkpoint, the job's best, together or not at all.
    pub async fn insert_imported(&self, job: &JobRow, ckpt: &CheckpointRow) -> StoreResult<()> {
        let (id, job_id) = (ckpt.id.to_string(), job.id.to_string());
        self.write(async |c| {
            super::insert_job_on(&mut *c, job).await?;
            sqlx::query(&format!(
                "INSERT INTO checkpoints ({CHECKPOINT_COLUMNS}) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ))
            .bind(&id)
            .bind(&job_id)
            .bind(ckpt.epoch as i64)
            .bind(ckpt.val_accuracy)
            .bind(self.paths.stored(&ckpt.path))
            .bind(true)
            .bind(ckpt.created_at_ms)
            .bind(None::<String>)
            .execute(&mut *c)
            .await?;
            sqlx::query(
                "UPDATE jobs SET best_checkpoint_id = $2, state = 'SUCCEEDED', \
                     started_at_ms = created_at_ms, finished_at_ms = created_at_ms \
                     WHERE id = $1",
            )
            .bind(&job_id)
            .bind(&id)
            .execute(&mut *c)
            .await?;
            Ok(())
        })
        .await
    }
}

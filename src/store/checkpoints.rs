//! Checkpoint rows: recorded by a job's run (fenced), read for resumes and inference; and a
//! job's recorded epochs (its curves).

use uuid::Uuid;

use crate::engine::train::EpochMetrics;

use super::{
    readable, CheckpointRow, Fence, Store, StoreResult, BEST_CHECKPOINTS, CHECKPOINT_COLUMNS,
    CHECKPOINT_SELECT, NEWEST_JOB_FIRST,
};

impl Store {
    /// The epochs a job recorded, in order (rows that no longer parse are skipped).
    pub async fn job_epochs(&self, job_id: Uuid) -> StoreResult<Vec<EpochMetrics>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT metrics_json FROM job_epochs WHERE job_id = $1 ORDER BY epoch")
                .bind(job_id.to_string())
                .fetch_all(self.pool()?)
                .await?;
        Ok(rows
            .iter()
            .filter_map(|(json,)| serde_json::from_str(json).ok())
            .collect())
    }

    /// Records an epoch checkpoint (fenced): the job resumes from it from now on, and a new
    /// best takes the best flag from the older ones. Rows whose files were pruned are dropped
    /// (the best one stays: its copy). A saved checkpoint is progress: the job's unclean exits
    /// start counting again.
    pub async fn record_checkpoint(&self, fence: Fence, ckpt: &CheckpointRow) -> StoreResult<()> {
        let job = ckpt.job_id.to_string();
        self.write(async |c| {
            // First, as it locks the job's row until the commit: no claim comes between.
            let done = sqlx::query(
                "UPDATE jobs SET unclean_exits = 0, resume_path = $3 \
                 WHERE id = $1 AND attempt = $2",
            )
            .bind(&job)
            .bind(fence.attempt as i64)
            .bind(self.paths.stored(&ckpt.path))
            .execute(&mut *c)
            .await?;
            fence.check(done.rows_affected())?;
            if ckpt.is_best {
                sqlx::query("UPDATE checkpoints SET is_best = FALSE WHERE job_id = $1")
                    .bind(&job)
                    .execute(&mut *c)
                    .await?;
                sqlx::query("UPDATE jobs SET best_checkpoint_id = $2 WHERE id = $1")
                    .bind(&job)
                    .bind(ckpt.id.to_string())
                    .execute(&mut *c)
                    .await?;
            }
            // A resumed job may write an epoch again: the newer file replaces the row.
            sqlx::query("DELETE FROM checkpoints WHERE job_id = $1 AND epoch = $2")
                .bind(&job)
                .bind(ckpt.epoch as i64)
                .execute(&mut *c)
                .await?;
            sqlx::query(&format!(
                "INSERT INTO checkpoints ({CHECKPOINT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            ))
            .bind(ckpt.id.to_string())
            .bind(&job)
            .bind(ckpt.epoch as i64)
            .bind(ckpt.val_accuracy)
            .bind(self.paths.stored(&ckpt.path))
            .bind(ckpt.is_best)
            .bind(ckpt.created_at_ms)
            .bind(
                ckpt.copy_path.as_deref().map(|p| self.paths.stored(p)),
            )
            .execute(&mut *c)
            .await?;
            let rows = sqlx::query(&format!(
                "SELECT {CHECKPOINT_SELECT} FROM checkpoints c WHERE c.job_id = $1 AND NOT c.is_best"
            ))
            .bind(&job)
            .fetch_all(&mut *c)
            .await?;
            for row in readable(&rows, |r| CheckpointRow::from_row(r, &self.paths)) {
                if !row.path.exists() {
                    sqlx::query("DELETE FROM checkpoints WHERE id = $1")
                        .bind(row.id.to_string())
                        .execute(&mut *c)
                        .await?;
                }
            }
            Ok(())
        })
        .await
    }

    /// A job's checkpoints, oldest first.
    pub async fn list_checkpoints(&self, job_id: Uuid) -> StoreResult<Vec<CheckpointRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {CHECKPOINT_SELECT} FROM checkpoints c WHERE c.job_id = $1 ORDER BY c.epoch"
        ))
        .bind(job_id.to_string())
        .fetch_all(self.pool()?)
        .await?;
        Ok(readable(&rows, |r| CheckpointRow::from_row(r, &self.paths)))
    }

    pub async fn get_checkpoint(&self, id: Uuid) -> StoreResult<Option<CheckpointRow>> {
        let row = sqlx::query(&format!(
            "SELECT {CHECKPOINT_SELECT} FROM checkpoints c WHERE c.id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(self.pool()?)
        .await?;
        Ok(row
            .map(|r| CheckpointRow::from_row(&r, &self.paths))
            .transpose()?)
    }

    /// Best checkpoints of every job that has one, newest job first.
    pub async fn best_checkpoints(&self) -> StoreResult<Vec<CheckpointRow>> {
        let rows = sqlx::query(&format!("{BEST_CHECKPOINTS} {NEWEST_JOB_FIRST}"))
            .fetch_all(self.pool()?)
            .await?;
        Ok(readable(&rows, |r| CheckpointRow::from_row(r, &self.paths)))
    }

    /// The default model: the best checkpoint of the newest job that succeeded.
    pub async fn default_checkpoint(&self) -> StoreResult<Option<CheckpointRow>> {
        let row = sqlx::query(&format!(
            "{BEST_CHECKPOINTS} AND j.state = 'SUCCEEDED' {NEWEST_JOB_FIRST} LIMIT 1"
        ))
        .fetch_optional(self.pool()?)
        .await?;
        Ok(row
            .map(|r| CheckpointRow::from_row(&r, &self.paths))
            .transpose()?)
    }
}

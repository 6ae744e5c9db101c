//! The job store: training jobs and their checkpoints in SQL (SQLite embedded), schema in
//! `migrations/`. Every state change is one transaction; timestamps are UTC milliseconds.

mod rows;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use uuid::Uuid;

pub use rows::{now_ms, CheckpointRow, JobRow, JobState};

use crate::engine::train::EpochMetrics;

/// Handle to the job database (cheap to clone).
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

/// Columns of `jobs`, in the order [`JobRow::from_row`] reads them.
const JOB_COLUMNS: &str = "id, state, preset, config_json, dataset_format, dataset_path, \
    created_at_ms, started_at_ms, finished_at_ms, epochs_completed, epochs_total, \
    latest_metrics_json, best_checkpoint_id, test_accuracy, error, restarts, cancel_requested";
const CHECKPOINT_COLUMNS: &str = "id, job_id, epoch, val_accuracy, path, is_best, created_at_ms";
/// Best checkpoints joined to their jobs (`WHERE` open for more conditions).
const BEST_CHECKPOINTS: &str = "SELECT c.id, c.job_id, c.epoch, c.val_accuracy, c.path, \
    c.is_best, c.created_at_ms FROM checkpoints c JOIN jobs j ON j.id = c.job_id WHERE c.is_best";
const NEWEST_JOB_FIRST: &str = "ORDER BY j.created_at_ms DESC, j.id DESC";

impl Store {
    /// Opens (creating if needed) `<data_dir>/tlb.db` and applies the migrations.
    pub async fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let path = data_dir.join("tlb.db");
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // WAL + FULL: a committed state change survives a power cut.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .context("applying migrations")?;
        Ok(Self { pool })
    }

    pub async fn insert_job(&self, job: &JobRow) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO jobs (id, state, preset, config_json, dataset_format, dataset_path, \
             created_at_ms, epochs_total) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(job.id.to_string())
        .bind(job.state.as_str())
        .bind(&job.preset)
        .bind(serde_json::to_string(&job.config)?)
        .bind(&job.dataset_format)
        .bind(&job.dataset_path)
        .bind(job.created_at_ms)
        .bind(job.epochs_total as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_job(&self, id: Uuid) -> Result<Option<JobRow>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| JobRow::from_row(&r)).transpose()
    }

    /// Jobs newest first, optionally of one state, after the `(created_at_ms, id)` cursor.
    pub async fn list_jobs(
        &self,
        state: Option<JobState>,
        limit: usize,
        after: Option<(i64, String)>,
    ) -> Result<Vec<JobRow>> {
        let (cursor_ms, cursor_id) = after.unwrap_or((i64::MAX, String::new()));
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs \
             WHERE ($1 = '' OR state = $1) \
               AND (created_at_ms < $2 OR (created_at_ms = $2 AND ($3 = '' OR id < $3))) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $4"
        ))
        .bind(state.map_or("", JobState::as_str))
        .bind(cursor_ms)
        .bind(cursor_id)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(JobRow::from_row).collect()
    }

    /// The job the worker should run next: one that was running when the server stopped
    /// (to resume it), else the oldest queued one.
    pub async fn next_runnable(&self) -> Result<Option<JobRow>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('RUNNING', 'QUEUED') \
             ORDER BY CASE state WHEN 'RUNNING' THEN 0 ELSE 1 END, created_at_ms, id LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| JobRow::from_row(&r)).transpose()
    }

    /// QUEUED/RUNNING → RUNNING; counts a restart when the job was already running. False
    /// when the job was cancelled or finished in the meantime.
    pub async fn mark_running(&self, id: Uuid, resumed: bool) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE jobs SET state = 'RUNNING', started_at_ms = COALESCE(started_at_ms, $2), \
             restarts = restarts + $3 WHERE id = $1 AND state IN ('QUEUED', 'RUNNING')",
        )
        .bind(id.to_string())
        .bind(now_ms())
        .bind(i64::from(resumed))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn record_epoch(&self, id: Uuid, metrics: &EpochMetrics) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE jobs SET epochs_completed = $2, latest_metrics_json = $3 WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(metrics.epoch as i64)
        .bind(serde_json::to_string(metrics)?)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records an epoch checkpoint; a new best takes the best flag from the older ones.
    /// Rows whose files the trainer pruned are dropped (the best one stays: `best.ckpt`).
    pub async fn record_checkpoint(&self, ckpt: &CheckpointRow) -> Result<()> {
        let job = ckpt.job_id.to_string();
        let mut tx = self.pool.begin().await?;
        if ckpt.is_best {
            sqlx::query("UPDATE checkpoints SET is_best = FALSE WHERE job_id = $1")
                .bind(&job)
                .execute(&mut *tx)
                .await?;
            sqlx::query("UPDATE jobs SET best_checkpoint_id = $2 WHERE id = $1")
                .bind(&job)
                .bind(ckpt.id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        // A resumed job may write an epoch again: the newer file replaces the row.
        sqlx::query("DELETE FROM checkpoints WHERE job_id = $1 AND epoch = $2")
            .bind(&job)
            .bind(ckpt.epoch as i64)
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!(
            "INSERT INTO checkpoints ({CHECKPOINT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(ckpt.id.to_string())
        .bind(&job)
        .bind(ckpt.epoch as i64)
        .bind(ckpt.val_accuracy)
        .bind(ckpt.path.to_string_lossy().into_owned())
        .bind(ckpt.is_best)
        .bind(ckpt.created_at_ms)
        .execute(&mut *tx)
        .await?;
        let rows = sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE job_id = $1 AND NOT is_best"
        ))
        .bind(&job)
        .fetch_all(&mut *tx)
        .await?;
        for row in rows {
            let row = CheckpointRow::from_row(&row)?;
            if !row.path.exists() {
                sqlx::query("DELETE FROM checkpoints WHERE id = $1")
                    .bind(row.id.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Moves a queued or running job to a final state. False if it already was final.
    pub async fn finish(
        &self,
        id: Uuid,
        state: JobState,
        error: &str,
        test_accuracy: Option<f64>,
    ) -> Result<bool> {
        debug_assert!(state.is_terminal());
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE jobs SET state = $2, error = $3, test_accuracy = $4, finished_at_ms = $5 \
             WHERE id = $1 AND state IN ('QUEUED', 'RUNNING')",
        )
        .bind(id.to_string())
        .bind(state.as_str())
        .bind(error)
        .bind(test_accuracy)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// QUEUED → CANCELLED. False when the job was not queued (any more).
    pub async fn cancel_queued(&self, id: Uuid) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE jobs SET state = 'CANCELLED', finished_at_ms = $2, cancel_requested = TRUE \
             WHERE id = $1 AND state = 'QUEUED'",
        )
        .bind(id.to_string())
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Remembers a cancel request for a running job (it survives a restart).
    pub async fn request_cancel(&self, id: Uuid) -> Result<()> {
        sqlx::query("UPDATE jobs SET cancel_requested = TRUE WHERE id = $1 AND state = 'RUNNING'")
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A job's checkpoints, oldest first.
    pub async fn list_checkpoints(&self, job_id: Uuid) -> Result<Vec<CheckpointRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE job_id = $1 ORDER BY epoch"
        ))
        .bind(job_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(CheckpointRow::from_row).collect()
    }

    pub async fn get_checkpoint(&self, id: Uuid) -> Result<Option<CheckpointRow>> {
        let row = sqlx::query(&format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| CheckpointRow::from_row(&r)).transpose()
    }

    /// Best checkpoints of every job that has one, newest job first.
    pub async fn best_checkpoints(&self) -> Result<Vec<CheckpointRow>> {
        let rows = sqlx::query(&format!("{BEST_CHECKPOINTS} {NEWEST_JOB_FIRST}"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(CheckpointRow::from_row).collect()
    }

    /// The default model: the best checkpoint of the newest job that succeeded.
    pub async fn default_checkpoint(&self) -> Result<Option<CheckpointRow>> {
        let row = sqlx::query(&format!(
            "{BEST_CHECKPOINTS} AND j.state = 'SUCCEEDED' {NEWEST_JOB_FIRST} LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| CheckpointRow::from_row(&r)).transpose()
    }
}

/// Where a job's run directory lives under the data dir.
pub fn job_dir(data_dir: &Path, id: Uuid) -> PathBuf {
    data_dir.join("jobs").join(id.to_string())
}

//! The job store: training jobs and their checkpoints in SQL (SQLite embedded), schema in
//! `migrations/`. Every state change is one transaction; timestamps are UTC milliseconds.
//!
//! A write that fails (a full disk, say) rolls back and its connection is closed rather than
//! pooled again, so no connection is left inside a transaction holding a lock or an old
//! snapshot: the store answers from one truth and writes again as soon as space is back. A
//! row that cannot be read is logged and left out of lists; it fails only RPCs about itself.

mod rows;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor};
use uuid::Uuid;

pub use rows::{now_ms, CheckpointRow, JobRow, JobState};

use crate::engine::train::EpochMetrics;

/// Handle to the job database (cheap to clone).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
}

/// Columns of `jobs`, in the order [`JobRow::from_row`] reads them.
/// Columns of `jobs`, as [`JobRow::from_row`] reads them. Booleans are read as integers
/// (sqlx's Any driver cannot map SQLite's BOOLEAN declarations; both databases cast them).
const JOB_COLUMNS: &str = "id, state, preset, config_json, dataset_format, dataset_path, \
    created_at_ms, started_at_ms, finished_at_ms, epochs_completed, epochs_total, \
    latest_metrics_json, best_checkpoint_id, test_accuracy, error, restarts, \
    CAST(cancel_requested AS INTEGER) AS cancel_requested, unclean_exits, \
    CAST(run_open AS INTEGER) AS run_open, created_by";
/// Columns of `checkpoints`, to insert.
const CHECKPOINT_COLUMNS: &str = "id, job_id, epoch, val_accuracy, path, is_best, created_at_ms";
/// Columns of `checkpoints` (alias `c`), as [`CheckpointRow::from_row`] reads them.
const CHECKPOINT_SELECT: &str = "c.id, c.job_id, c.epoch, c.val_accuracy, c.path, \
    CAST(c.is_best AS INTEGER) AS is_best, c.created_at_ms";
/// Best checkpoints joined to their jobs (`WHERE` open for more conditions).
const BEST_CHECKPOINTS: &str = "SELECT c.id, c.job_id, c.epoch, c.val_accuracy, c.path, \
    CAST(c.is_best AS INTEGER) AS is_best, c.created_at_ms FROM checkpoints c \
    JOIN jobs j ON j.id = c.job_id WHERE c.is_best";
const NEWEST_JOB_FIRST: &str = "ORDER BY j.created_at_ms DESC, j.id DESC";

/// A pooled connection serving one write: closed instead of pooled again unless its
/// transaction committed (also when the write's future is dropped half-way).
struct WriteConn {
    conn: PoolConnection<Any>,
    committed: bool,
}

impl Drop for WriteConn {
    fn drop(&mut self) {
        if !self.committed {
            self.conn.close_on_drop();
        }
    }
}

/// Rows that parse; the others are logged and left out (one bad row must not fail a list).
fn readable<T>(rows: &[AnyRow], parse: impl Fn(&AnyRow) -> Result<T>) -> Vec<T> {
    rows.iter()
        .filter_map(|r| {
            parse(r)
                .map_err(|e| tracing::error!(error = %format!("{e:#}"), "unreadable row skipped"))
                .ok()
        })
        .collect()
}

impl Store {
    /// Runs `body` in one transaction and commits it; on any failure the transaction is
    /// rolled back and the connection closed.
    async fn write<T>(&self, body: impl AsyncFnOnce(&mut AnyConnection) -> Result<T>) -> Result<T> {
        let mut guard = WriteConn {
            conn: self.pool.acquire().await?,
            committed: false,
        };
        let mut tx = guard.conn.begin().await?;
        let value = body(&mut tx).await?;
        tx.commit().await?;
        guard.committed = true;
        Ok(value)
    }

    /// Opens (creating if needed) the SQLite store `<data_dir>/tlb.db`.
    pub async fn open(data_dir: &Path) -> Result<Self> {
        Self::connect(None, data_dir).await
    }

    /// Opens the store at `database_url` (`postgres://…`, PostgreSQL 13 or newer, or
    /// `sqlite://…`); without one, the SQLite file `<data_dir>/tlb.db`. Applies the
    /// migrations (the same portable SQL on both).
    pub async fn connect(database_url: Option<&str>, data_dir: &Path) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let url = match database_url {
            Some(url) => url.to_string(),
            None => {
                std::fs::create_dir_all(data_dir)
                    .with_context(|| format!("creating {}", data_dir.display()))?;
                format!("sqlite://{}?mode=rwc", data_dir.join("tlb.db").display())
            }
        };
        let shown = redact(&url);
        let pool = AnyPoolOptions::new()
            .max_connections(if url.starts_with("sqlite:") { 4 } else { 8 })
            .after_connect(|conn, _| {
                Box::pin(async move {
                    if conn.backend_name() == "SQLite" {
                        // WAL + FULL: a committed state change survives a power cut.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .with_context(|| format!("opening the job store {shown}"))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .with_context(|| format!("applying migrations to {shown}"))?;
        Ok(Self { pool })
    }

    pub async fn insert_job(&self, job: &JobRow) -> Result<()> {
        let config = serde_json::to_string(&job.config)?;
        self.write(async |c| {
            sqlx::query(
                "INSERT INTO jobs (id, state, preset, config_json, dataset_format, \
                 dataset_path, created_at_ms, epochs_total, created_by) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(job.id.to_string())
            .bind(job.state.as_str())
            .bind(&job.preset)
            .bind(config)
            .bind(&job.dataset_format)
            .bind(&job.dataset_path)
            .bind(job.created_at_ms)
            .bind(job.epochs_total as i64)
            .bind(&job.created_by)
            .execute(c)
            .await?;
            Ok(())
        })
        .await
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
        Ok(readable(&rows, JobRow::from_row))
    }

    /// How many jobs are in each state (states without jobs included, as 0).
    pub async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        Ok(JobState::ALL
            .into_iter()
            .map(|s| {
                let n = rows
                    .iter()
                    .find(|(name, _)| name == s.as_str())
                    .map_or(0, |r| r.1);
                (s, n)
            })
            .collect())
    }

    /// The job the worker should run next: one that was running when the server stopped
    /// (to resume it), else the oldest queued one. Unreadable rows are passed over.
    pub async fn next_runnable(&self) -> Result<Option<JobRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state IN ('RUNNING', 'QUEUED') \
             ORDER BY CASE state WHEN 'RUNNING' THEN 0 ELSE 1 END, created_at_ms, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(readable(&rows, JobRow::from_row).into_iter().next())
    }

    /// QUEUED/RUNNING → RUNNING; counts a restart when the job was already running, and an
    /// unclean exit when the server that ran it last died doing so. False when the job was
    /// cancelled or finished in the meantime.
    pub async fn mark_running(&self, id: Uuid, resumed: bool) -> Result<bool> {
        self.write(async |c| {
            let done = sqlx::query(
                "UPDATE jobs SET state = 'RUNNING', started_at_ms = COALESCE(started_at_ms, $2), \
                 restarts = restarts + $3, \
                 unclean_exits = unclean_exits + CASE WHEN run_open THEN 1 ELSE 0 END, \
                 run_open = TRUE WHERE id = $1 AND state IN ('QUEUED', 'RUNNING')",
            )
            .bind(id.to_string())
            .bind(now_ms())
            .bind(i64::from(resumed))
            .execute(c)
            .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    /// The running job was checkpointed and left cleanly (shutdown): not an unclean exit.
    pub async fn close_run(&self, id: Uuid) -> Result<()> {
        self.write(async |c| {
            sqlx::query("UPDATE jobs SET run_open = FALSE WHERE id = $1")
                .bind(id.to_string())
                .execute(c)
                .await?;
            Ok(())
        })
        .await
    }

    pub async fn record_epoch(&self, id: Uuid, metrics: &EpochMetrics) -> Result<()> {
        let json = serde_json::to_string(metrics)?;
        self.write(async |c| {
            sqlx::query(
                "UPDATE jobs SET epochs_completed = $2, latest_metrics_json = $3 WHERE id = $1",
            )
            .bind(id.to_string())
            .bind(metrics.epoch as i64)
            .bind(json)
            .execute(c)
            .await?;
            Ok(())
        })
        .await
    }

    /// Records an epoch checkpoint; a new best takes the best flag from the older ones.
    /// Rows whose files the trainer pruned are dropped (the best one stays: `best.ckpt`).
    /// A saved checkpoint is progress: the job's unclean exits start counting again.
    pub async fn record_checkpoint(&self, ckpt: &CheckpointRow) -> Result<()> {
        let job = ckpt.job_id.to_string();
        self.write(async |c| {
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
            sqlx::query("UPDATE jobs SET unclean_exits = 0 WHERE id = $1")
                .bind(&job)
                .execute(&mut *c)
                .await?;
            // A resumed job may write an epoch again: the newer file replaces the row.
            sqlx::query("DELETE FROM checkpoints WHERE job_id = $1 AND epoch = $2")
                .bind(&job)
                .bind(ckpt.epoch as i64)
                .execute(&mut *c)
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
            .execute(&mut *c)
            .await?;
            let rows = sqlx::query(&format!(
                "SELECT {CHECKPOINT_SELECT} FROM checkpoints c WHERE c.job_id = $1 AND NOT c.is_best"
            ))
            .bind(&job)
            .fetch_all(&mut *c)
            .await?;
            for row in readable(&rows, CheckpointRow::from_row) {
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

    /// Moves a queued or running job to a final state. False if it already was final.
    pub async fn finish(
        &self,
        id: Uuid,
        state: JobState,
        error: &str,
        test_accuracy: Option<f64>,
    ) -> Result<bool> {
        debug_assert!(state.is_terminal());
        self.write(async |c| {
            let done = sqlx::query(
                "UPDATE jobs SET state = $2, error = $3, test_accuracy = $4, finished_at_ms = $5, \
                 run_open = FALSE WHERE id = $1 AND state IN ('QUEUED', 'RUNNING')",
            )
            .bind(id.to_string())
            .bind(state.as_str())
            .bind(error)
            .bind(test_accuracy.filter(|a| a.is_finite()))
            .bind(now_ms())
            .execute(c)
            .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    /// QUEUED → CANCELLED. False when the job was not queued (any more).
    pub async fn cancel_queued(&self, id: Uuid) -> Result<bool> {
        self.write(async |c| {
            let done = sqlx::query(
                "UPDATE jobs SET state = 'CANCELLED', finished_at_ms = $2, \
                 cancel_requested = TRUE WHERE id = $1 AND state = 'QUEUED'",
            )
            .bind(id.to_string())
            .bind(now_ms())
            .execute(c)
            .await?;
            Ok(done.rows_affected() == 1)
        })
        .await
    }

    /// Remembers a cancel request for a running job (it survives a restart).
    pub async fn request_cancel(&self, id: Uuid) -> Result<()> {
        self.write(async |c| {
            sqlx::query(
                "UPDATE jobs SET cancel_requested = TRUE WHERE id = $1 AND state = 'RUNNING'",
            )
            .bind(id.to_string())
            .execute(c)
            .await?;
            Ok(())
        })
        .await
    }

    /// A job's checkpoints, oldest first.
    pub async fn list_checkpoints(&self, job_id: Uuid) -> Result<Vec<CheckpointRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {CHECKPOINT_SELECT} FROM checkpoints c WHERE c.job_id = $1 ORDER BY c.epoch"
        ))
        .bind(job_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(readable(&rows, CheckpointRow::from_row))
    }

    pub async fn get_checkpoint(&self, id: Uuid) -> Result<Option<CheckpointRow>> {
        let row = sqlx::query(&format!(
            "SELECT {CHECKPOINT_SELECT} FROM checkpoints c WHERE c.id = $1"
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
        Ok(readable(&rows, CheckpointRow::from_row))
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

/// A database URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Where a job's run directory lives under the data dir.
pub fn job_dir(data_dir: &Path, id: Uuid) -> PathBuf {
    data_dir.join("jobs").join(id.to_string())
}

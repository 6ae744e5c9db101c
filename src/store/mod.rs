//! The job store: training jobs and their checkpoints in SQL (SQLite embedded, or a shared
//! PostgreSQL), schema in `migrations/`. Every state change is one transaction; timestamps are
//! UTC milliseconds. Workers claim jobs under leases, and every write a run makes is fenced by
//! the attempt it was claimed with (`lease.rs`).
//!
//! A write that fails (a full disk, say) rolls back and its connection is closed rather than
//! pooled again, so no connection is left inside a transaction holding a lock or an old
//! snapshot: the store answers from one truth and writes again as soon as space is back. A
//! row that cannot be read is logged and left out of lists; it fails only RPCs about itself.

mod availability;
mod checkpoints;
mod datasets;
mod error;
mod last_known;
mod lease;
mod models;
mod paths;
mod rows;
mod searches;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor};
use uuid::Uuid;

pub use availability::{unavailable, StoreUnavailable};
pub use datasets::DatasetRow;
pub use error::{StoreError, StoreResult};
pub use last_known::LastKnown;
pub use lease::{Claimed, Fence, Heartbeat, LeaseLost};
pub use rows::{now_ms, CheckpointRow, JobRow, JobState};
pub use searches::{Advanced, Best, EventKind, SearchEvent, SearchReport, SearchRow, SearchState};

use crate::engine::train::EpochMetrics;
use crate::names::Named;
use strum::IntoEnumIterator;

/// Warnings a job keeps (the newest).
pub const MAX_WARNINGS: usize = 20;

/// Handle to the job database (cheap to clone).
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    /// The database's clock, in UTC milliseconds, as SQL (leases are timed by it).
    now: &'static str,
    /// Row locking for claims: PostgreSQL's `FOR UPDATE SKIP LOCKED`; nothing on SQLite,
    /// whose writes are serialised.
    skip_locked: &'static str,
    /// Whether the store answered its last probe (see `availability`).
    up: availability::Up,
    /// File paths in rows are relative to this replica's data dir (see `paths`).
    paths: paths::StoredPaths,
}

/// Columns of `jobs`, as [`JobRow::from_row`] reads them. Booleans are read as integers
/// (sqlx's Any driver cannot map SQLite's BOOLEAN declarations; both databases cast them).
pub(super) const JOB_COLUMNS: &str =
    "id, state, preset, config_json, dataset_format, dataset_path, \
    created_at_ms, started_at_ms, finished_at_ms, epochs_completed, epochs_total, \
    latest_metrics_json, best_checkpoint_id, test_accuracy, error, restarts, \
    CAST(cancel_requested AS INTEGER) AS cancel_requested, unclean_exits, \
    CAST(run_open AS INTEGER) AS run_open, created_by, attempt, worker, device, resume_path, \
    progress_json, warnings_json, labels_json, search_id, trial, rung, pause_at";
/// The validation accuracy of a job's best checkpoint, beside [`JOB_COLUMNS`] where jobs are
/// read (not in RETURNING clauses: a subquery there is not portable).
pub(super) const BEST_VAL_ACCURACY: &str = "(SELECT c.val_accuracy FROM checkpoints c \
     WHERE c.id = jobs.best_checkpoint_id) AS best_val_accuracy";
/// Columns of `checkpoints`, to insert.
pub(super) const CHECKPOINT_COLUMNS: &str =
    "id, job_id, epoch, val_accuracy, path, is_best, created_at_ms, copy_path";
/// Columns of `checkpoints` (alias `c`), as [`CheckpointRow::from_row`] reads them.
pub(super) const CHECKPOINT_SELECT: &str = "c.id, c.job_id, c.epoch, c.val_accuracy, c.path, \
    CAST(c.is_best AS INTEGER) AS is_best, c.created_at_ms, c.copy_path";
/// Best checkpoints joined to their jobs (`WHERE` open for more conditions).
pub(super) const BEST_CHECKPOINTS: &str =
    "SELECT c.id, c.job_id, c.epoch, c.val_accuracy, c.path, \
    CAST(c.is_best AS INTEGER) AS is_best, c.created_at_ms, c.copy_path FROM checkpoints c \
    JOIN jobs j ON j.id = c.job_id WHERE c.is_best";
pub(super) const NEWEST_JOB_FIRST: &str = "ORDER BY j.created_at_ms DESC, j.id DESC";

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
pub(super) fn readable<T>(rows: &[AnyRow], parse: impl Fn(&AnyRow) -> Result<T>) -> Vec<T> {
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
    async fn write<T>(
        &self,
        body: impl AsyncFnOnce(&mut AnyConnection) -> Result<T>,
    ) -> StoreResult<T> {
        let mut guard = WriteConn {
            conn: self.pool()?.acquire().await?,
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
        Self::connect_waiting(database_url, data_dir, std::time::Duration::ZERO).await
    }

    /// [`Self::connect`], retrying with backoff for up to `wait` while the store cannot be
    /// reached (a server started before its database).
    pub async fn connect_waiting(
        database_url: Option<&str>,
        data_dir: &Path,
        wait: std::time::Duration,
    ) -> Result<Self> {
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
        let options = AnyPoolOptions::new()
            .max_connections(if url.starts_with("sqlite:") { 4 } else { 8 })
            .acquire_timeout(availability::ACQUIRE_TIMEOUT)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    if conn.backend_name() == "PostgreSQL" {
                        // A replica paused mid-transaction (SIGSTOP, a VM freeze) must not
                        // keep a job's row locked, unclaimable, until it wakes up.
                        conn.execute(
                            "SET idle_in_transaction_session_timeout = 5000; \
                             SET lock_timeout = 10000",
                        )
                        .await?;
                    }
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
            });
        let pool = availability::connect_with_retry(options, &url, &shown, wait).await?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .with_context(|| format!("applying migrations to {shown}"))?;
        let converted = paths::make_relative(&pool)
            .await
            .with_context(|| format!("converting stored paths in {shown}"))?;
        if converted > 0 {
            tracing::info!(
                paths = converted,
                "stored paths made relative to the data dir"
            );
        }
        let postgres = !url.starts_with("sqlite:");
        Ok(Self {
            pool,
            now: if postgres {
                "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
            } else {
                "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
            },
            skip_locked: if postgres {
                "FOR UPDATE SKIP LOCKED"
            } else {
                ""
            },
            up: availability::Up::default(),
            paths: paths::StoredPaths::new(data_dir),
        })
    }

    pub async fn insert_job(&self, job: &JobRow) -> StoreResult<()> {
        self.write(async |c| insert_job_on(c, job).await).await
    }

    pub async fn get_job(&self, id: Uuid) -> StoreResult<Option<JobRow>> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, {BEST_VAL_ACCURACY} FROM jobs WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(self.pool()?)
        .await?;
        Ok(row.map(|r| JobRow::from_row(&r, &self.paths)).transpose()?)
    }

    /// Jobs newest first, optionally of one state, after the `(created_at_ms, id)` cursor.
    pub async fn list_jobs(
        &self,
        state: Option<JobState>,
        limit: usize,
        after: Option<(i64, String)>,
    ) -> StoreResult<Vec<JobRow>> {
        let (cursor_ms, cursor_id) = after.unwrap_or((i64::MAX, String::new()));
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, {BEST_VAL_ACCURACY} FROM jobs \
             WHERE ($1 = '' OR state = $1) \
               AND (created_at_ms < $2 OR (created_at_ms = $2 AND ($3 = '' OR id < $3))) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $4"
        ))
        .bind(state.map_or("", JobState::name))
        .bind(cursor_ms)
        .bind(cursor_id)
        .bind(limit as i64)
        .fetch_all(self.pool()?)
        .await?;
        Ok(readable(&rows, |r| JobRow::from_row(r, &self.paths)))
    }

    /// How many jobs are in each state (states without jobs included, as 0).
    pub async fn count_by_state(&self) -> StoreResult<Vec<(JobState, i64)>> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                .fetch_all(self.pool()?)
                .await?;
        Ok(every_state(&rows))
    }

    /// Records an epoch's metrics (fenced), and the epochs the run trains when it says (a
    /// time budget's plan replaces the configured count).
    pub async fn record_epoch(&self, fence: Fence, metrics: &EpochMetrics) -> StoreResult<()> {
        let json = serde_json::to_string(metrics)?;
        self.write(async |c| {
            let done = sqlx::query(
                "UPDATE jobs SET epochs_completed = $3, latest_metrics_json = $4, \
                 epochs_total = CASE WHEN $5 > 0 THEN $5 ELSE epochs_total END \
                 WHERE id = $1 AND attempt = $2",
            )
            .bind(fence.job.to_string())
            .bind(fence.attempt as i64)
            .bind(metrics.epoch as i64)
            .bind(&json)
            .bind(metrics.epochs_total as i64)
            .execute(&mut *c)
            .await?;
            fence.check(done.rows_affected())?;
            sqlx::query(
                "INSERT INTO job_epochs (job_id, epoch, metrics_json) VALUES ($1, $2, $3) \
                 ON CONFLICT (job_id, epoch) DO UPDATE SET metrics_json = excluded.metrics_json",
            )
            .bind(fence.job.to_string())
            .bind(metrics.epoch as i64)
            .bind(&json)
            .execute(&mut *c)
            .await?;
            Ok(())
        })
        .await
    }

    /// Makes `path` (a checkpoint written mid-epoch) the one the job resumes from (fenced).
    pub async fn commit_resume_point(&self, fence: Fence, path: &Path) -> StoreResult<()> {
        self.write(async |c| {
            let done =
                sqlx::query("UPDATE jobs SET resume_path = $3 WHERE id = $1 AND attempt = $2")
                    .bind(fence.job.to_string())
                    .bind(fence.attempt as i64)
                    .bind(self.paths.stored(path))
                    .execute(c)
                    .await?;
            fence.check(done.rows_affected())
        })
        .await
    }

    /// Moves a claimed job to a final state (fenced) and ends its lease. False if it already
    /// was final.
    pub async fn finish(
        &self,
        fence: Fence,
        state: JobState,
        error: &str,
        test_accuracy: Option<f64>,
    ) -> StoreResult<bool> {
        debug_assert!(state.is_terminal());
        self.write(async |c| {
            let done = sqlx::query(
                "UPDATE jobs SET state = $3, error = $4, test_accuracy = $5, finished_at_ms = $6, \
                 run_open = FALSE, lease_expires_at_ms = NULL, progress_json = NULL \
                 WHERE id = $1 AND attempt = $2 AND state IN ('QUEUED', 'RUNNING')",
            )
            .bind(fence.job.to_string())
            .bind(fence.attempt as i64)
            .bind(state.name())
            .bind(error)
            .bind(test_accuracy.filter(|a| a.is_finite()))
            .bind(now_ms())
            .execute(&mut *c)
            .await?;
            if done.rows_affected() == 1 {
                return Ok(true);
            }
            // Not changed: already final, or no longer this attempt's to write.
            let owned = sqlx::query("SELECT id FROM jobs WHERE id = $1 AND attempt = $2")
                .bind(fence.job.to_string())
                .bind(fence.attempt as i64)
                .fetch_optional(&mut *c)
                .await?;
            fence.check(u64::from(owned.is_some()))?;
            Ok(false)
        })
        .await
    }

    /// Adds a warning to the job's (fenced; the newest [`MAX_WARNINGS`] are kept).
    pub async fn add_warning(&self, fence: Fence, message: &str) -> StoreResult<()> {
        self.write(async |c| {
            let row = sqlx::query("SELECT warnings_json FROM jobs WHERE id = $1 AND attempt = $2")
                .bind(fence.job.to_string())
                .bind(fence.attempt as i64)
                .fetch_optional(&mut *c)
                .await?;
            let Some(row) = row else {
                return fence.check(0);
            };
            let mut warnings = rows::warnings(&row)?;
            warnings.push(message.to_string());
            let over = warnings.len().saturating_sub(MAX_WARNINGS);
            warnings.drain(..over);
            let done =
                sqlx::query("UPDATE jobs SET warnings_json = $3 WHERE id = $1 AND attempt = $2")
                    .bind(fence.job.to_string())
                    .bind(fence.attempt as i64)
                    .bind(serde_json::to_string(&warnings)?)
                    .execute(&mut *c)
                    .await?;
            fence.check(done.rows_affected())
        })
        .await
    }

    /// QUEUED or PAUSED → CANCELLED. False when the job was neither (any more).
    pub async fn cancel_queued(&self, id: Uuid) -> StoreResult<bool> {
        self.write(async |c| {
            let done = sqlx::query(
                "UPDATE jobs SET state = 'CANCELLED', finished_at_ms = $2, \
                 cancel_requested = TRUE WHERE id = $1 AND state IN ('QUEUED', 'PAUSED')",
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
    pub async fn request_cancel(&self, id: Uuid) -> StoreResult<()> {
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
}

/// Inserts `job` on `c` (within the caller's transaction).
pub(super) async fn insert_job_on(c: &mut AnyConnection, job: &JobRow) -> Result<()> {
    sqlx::query(
        "INSERT INTO jobs (id, state, preset, config_json, dataset_format, dataset_path, \
         created_at_ms, epochs_total, created_by, labels_json, search_id, trial, rung, \
         pause_at, error, finished_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(job.id.to_string())
    .bind(job.state.name())
    .bind(&job.preset)
    .bind(serde_json::to_string(&job.config)?)
    .bind(&job.dataset_format)
    .bind(&job.dataset_path)
    .bind(job.created_at_ms)
    .bind(job.epochs_total as i64)
    .bind(&job.created_by)
    .bind(models::labels_json(&job.labels)?)
    .bind(job.search_id.map(|s| s.to_string()))
    .bind(job.trial.map(i64::from))
    .bind(i64::from(job.rung))
    .bind(job.pause_at.map(i64::from))
    .bind(&job.error)
    .bind(job.finished_at_ms)
    .execute(c)
    .await?;
    Ok(())
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

/// A count for every job state, 0 where `(state name, count)` rows name none.
fn every_state(rows: &[(String, i64)]) -> Vec<(JobState, i64)> {
    JobState::iter()
        .map(|s| {
            let n = rows
                .iter()
                .find(|(name, _)| name == s.name())
                .map_or(0, |r| r.1);
            (s, n)
        })
        .collect()
}

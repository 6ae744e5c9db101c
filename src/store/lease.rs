//! Claims, leases and fencing: how many workers (threads of one server, or replicas on many
//! machines sharing a PostgreSQL store) share one job table.
//!
//! A worker *claims* the oldest runnable job (queued, or running under a lease that expired
//! or was released) in one statement that raises the job's `attempt`; on PostgreSQL the
//! candidate row is taken `FOR UPDATE SKIP LOCKED`, so concurrent claimers never get one job
//! twice, on SQLite writes are serialised. The claim holds a *lease* until
//! `lease_expires_at_ms`, timed by the database's clock, which the owner renews while it runs.
//! The attempt is the run's *fencing token*: every write it makes is conditional on
//! `attempt` still being its own, so once another worker claimed the job (the lease expired:
//! the owner was killed, paused, or cut off) the old owner's writes change nothing and fail
//! with [`LeaseLost`]; it then stops without writing more.

use anyhow::Result;
use sqlx::Row;
use uuid::Uuid;

use super::{now_ms, JobRow, Store, StoreResult, JOB_COLUMNS};
use crate::engine::train::Progress;

/// The job a run writes to and the attempt it was claimed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    pub job: Uuid,
    pub attempt: u32,
}

/// A fenced write found that its attempt no longer owns the job.
#[derive(Debug, thiserror::Error)]
#[error("job {job}: attempt {attempt} no longer owns it (another worker claimed it)")]
pub struct LeaseLost {
    pub job: Uuid,
    pub attempt: u32,
}

impl Fence {
    /// Ok when the fenced statement changed its row.
    pub(super) fn check(self, rows_affected: u64) -> Result<()> {
        if rows_affected == 0 {
            return Err(LeaseLost {
                job: self.job,
                attempt: self.attempt,
            }
            .into());
        }
        Ok(())
    }
}

/// A job a worker claimed.
#[derive(Debug)]
pub struct Claimed {
    pub fence: Fence,
    /// The job as claimed (state RUNNING), or why its row cannot be read.
    pub job: Result<JobRow>,
}

impl Claimed {
    /// The job was claimed before (its last owner stopped or lost it): it resumes. Every
    /// claim after the first takes a running job.
    pub fn resumed(&self) -> bool {
        self.fence.attempt > 1
    }
}

/// How a renewal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// Still ours; `cancel`: someone asked to cancel the job.
    Held { cancel: bool },
    /// Another attempt owns the job now.
    Lost,
}

impl Store {
    /// Claims the oldest runnable job for `worker` on `device`, under a lease of
    /// `lease_ms`: a running job whose lease ended (to resume it) before the oldest queued
    /// one. Counts a restart when the job was running, and an unclean exit when its last
    /// owner died running it.
    pub async fn claim(
        &self,
        worker: &str,
        device: &str,
        lease_ms: i64,
    ) -> StoreResult<Option<Claimed>> {
        let now = self.now;
        let sql = format!(
            "UPDATE jobs SET state = 'RUNNING', attempt = attempt + 1, worker = $1, device = $2, \
             lease_expires_at_ms = {now} + $3, started_at_ms = COALESCE(started_at_ms, $4), \
             restarts = restarts + CASE WHEN state = 'RUNNING' THEN 1 ELSE 0 END, \
             unclean_exits = unclean_exits + CASE WHEN run_open THEN 1 ELSE 0 END, \
             run_open = TRUE, progress_json = NULL \
             WHERE id = (SELECT id FROM jobs WHERE state = 'QUEUED' OR (state = 'RUNNING' \
               AND (lease_expires_at_ms IS NULL OR lease_expires_at_ms <= {now})) \
               ORDER BY CASE state WHEN 'RUNNING' THEN 0 ELSE 1 END, created_at_ms, id \
               LIMIT 1 {skip})
             RETURNING {JOB_COLUMNS}, CAST(restarts AS INTEGER) AS restarts_now",
            skip = self.skip_locked,
        );
        self.write(async |c| {
            let Some(row) = sqlx::query(&sql)
                .bind(worker)
                .bind(device)
                .bind(lease_ms)
                .bind(now_ms())
                .fetch_optional(&mut *c)
                .await?
            else {
                return Ok(None);
            };
            let fence = Fence {
                job: super::rows::uuid(row.try_get("id")?)?,
                attempt: row.try_get::<i64, _>("attempt")? as u32,
            };
            let job = JobRow::from_row(&row, &self.paths);
            Ok(Some(Claimed { fence, job }))
        })
        .await
    }

    /// Renews the lease (when `renew`) and publishes the run's latest step, if the job is
    /// still this attempt's; says whether a cancel was asked for.
    pub async fn heartbeat(
        &self,
        fence: Fence,
        renew_ms: Option<i64>,
        progress: Option<&Progress>,
    ) -> StoreResult<Heartbeat> {
        let progress = progress.map(serde_json::to_string).transpose()?;
        let now = self.now;
        let sql = format!(
            "UPDATE jobs SET lease_expires_at_ms = CASE WHEN $3 > 0 THEN {now} + $3 \
             ELSE lease_expires_at_ms END, progress_json = COALESCE($4, progress_json) \
             WHERE id = $1 AND attempt = $2 AND state = 'RUNNING' \
             RETURNING CAST(cancel_requested AS INTEGER) AS cancel_requested"
        );
        self.write(async |c| {
            let row = sqlx::query(&sql)
                .bind(fence.job.to_string())
                .bind(fence.attempt as i64)
                .bind(renew_ms.unwrap_or(0))
                .bind(progress)
                .fetch_optional(&mut *c)
                .await?;
            Ok(match row {
                Some(r) => Heartbeat::Held {
                    cancel: r.try_get::<i64, _>("cancel_requested")? != 0,
                },
                None => Heartbeat::Lost,
            })
        })
        .await
    }

    /// Whether `fence` still owns its job (checked right before a run writes files).
    pub async fn owns(&self, fence: Fence) -> StoreResult<bool> {
        let row = sqlx::query("SELECT id FROM jobs WHERE id = $1 AND attempt = $2")
            .bind(fence.job.to_string())
            .bind(fence.attempt as i64)
            .fetch_optional(self.pool()?)
            .await?;
        Ok(row.is_some())
    }

    /// The run stopped cleanly (shutdown) with its job still running: the lease ends now, so
    /// another worker resumes it at once, and the stop is not an unclean exit.
    pub async fn release(&self, fence: Fence) -> StoreResult<()> {
        self.write(async |c| {
            let done = sqlx::query(
                "UPDATE jobs SET run_open = FALSE, lease_expires_at_ms = NULL, \
                 progress_json = NULL WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'",
            )
            .bind(fence.job.to_string())
            .bind(fence.attempt as i64)
            .execute(c)
            .await?;
            fence.check(done.rows_affected())
        })
        .await
    }

    /// Ends the leases of running jobs whose worker is `worker` (a replica starting again
    /// under its old id: its last process is gone), or of every running job when `all` (a
    /// store only this process uses). Their jobs can be resumed at once. Returns how many.
    pub async fn expire_leases(&self, worker: &str, all: bool) -> StoreResult<u64> {
        self.write(async |c| {
            let done = sqlx::query(
                "UPDATE jobs SET lease_expires_at_ms = NULL \
                 WHERE state = 'RUNNING' AND (worker = $1 OR $2 > 0)",
            )
            .bind(worker)
            .bind(i64::from(all))
            .execute(c)
            .await?;
            Ok(done.rows_affected())
        })
        .await
    }

    /// A search's trial reached the epoch it waits at (fenced): RUNNING → PAUSED, its lease
    /// ended; its search promotes it (queued again, to resume) or stops it.
    pub async fn pause(&self, fence: Fence) -> StoreResult<()> {
        self.write(async |c| {
            let done = sqlx::query(
                "UPDATE jobs SET state = 'PAUSED', run_open = FALSE, lease_expires_at_ms = NULL, \
                 progress_json = NULL WHERE id = $1 AND attempt = $2 AND state = 'RUNNING'",
            )
            .bind(fence.job.to_string())
            .bind(fence.attempt as i64)
            .execute(c)
            .await?;
            fence.check(done.rows_affected())
        })
        .await
    }
}

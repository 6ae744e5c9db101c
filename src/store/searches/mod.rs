//! Hyper-parameter searches in the store: their rows, their trials' reports and their event
//! log, and advancing a search (`advance.rs`: one transaction decides and applies what the
//! search does next, whichever replica runs it).

mod advance;
mod log;

use std::collections::HashMap;

use anyhow::{Context, Result};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::rows::uuid;
use super::{
    now_ms, readable, JobRow, JobState, Store, StoreResult, BEST_VAL_ACCURACY, JOB_COLUMNS,
};
use crate::engine::search::SearchSpec;
use crate::engine::train::{EpochMetrics, TrainConfig};
use crate::names::Named;

pub use advance::Advanced;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    strum::Display,
    strum::EnumIter,
)]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE", parse_err_ty = String, parse_err_fn = unknown_search_state)]
pub enum SearchState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

fn unknown_search_state(name: &str) -> String {
    crate::names::unknown::<SearchState>("search state", name)
}

/// What happened in a search (`search_events.kind`).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    strum::Display,
)]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE", parse_err_ty = String, parse_err_fn = unknown_event)]
pub enum EventKind {
    TrialStarted,
    TrialReported,
    TrialPromoted,
    TrialStopped,
    SearchEnded,
}

fn unknown_event(name: &str) -> String {
    crate::names::unknown::<EventKind>("search event", name)
}

/// The search's best trial so far.
#[derive(Clone, Debug, PartialEq)]
pub struct Best {
    pub job_id: Uuid,
    pub trial: u32,
    pub rung: u32,
    pub metric: f64,
}

/// One search.
#[derive(Clone, Debug)]
pub struct SearchRow {
    pub id: Uuid,
    pub state: SearchState,
    pub preset: String,
    pub spec: SearchSpec,
    /// The preset with the request's overrides, which trials start from.
    pub base: TrainConfig,
    pub dataset_format: String,
    pub dataset_path: String,
    pub created_by: String,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub best: Option<Best>,
    pub error: String,
}

/// A trial's figure at a rung.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchReport {
    pub trial: u32,
    pub rung: u32,
    pub epoch: u32,
    pub metric: Option<f64>,
    pub job_id: Uuid,
}

/// One line of a search's event log.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchEvent {
    pub seq: i64,
    pub kind: EventKind,
    pub trial: Option<u32>,
    pub rung: Option<u32>,
    pub epoch: Option<u32>,
    pub metric: Option<f64>,
    pub job_id: Option<Uuid>,
    pub message: String,
    pub created_at_ms: i64,
}

const SEARCH_COLUMNS: &str = "id, state, preset, spec_json, base_config_json, dataset_format, \
    dataset_path, created_by, created_at_ms, finished_at_ms, best_job_id, best_trial, best_rung, \
    best_metric, error";

fn opt_u32(r: &AnyRow, column: &str) -> Result<Option<u32>> {
    Ok(r.try_get::<Option<i64>, _>(column)?.map(|v| v as u32))
}

impl SearchRow {
    fn from_row(r: &AnyRow) -> Result<Self> {
        let id = uuid(r.try_get("id")?)?;
        Self::parse(id, r).with_context(|| format!("search {id} in the store is unreadable"))
    }

    fn parse(id: Uuid, r: &AnyRow) -> Result<Self> {
        let best = match r.try_get::<Option<String>, _>("best_job_id")? {
            Some(job) => Some(Best {
                job_id: uuid(&job)?,
                trial: opt_u32(r, "best_trial")?.unwrap_or(0),
                rung: opt_u32(r, "best_rung")?.unwrap_or(0),
                metric: r
                    .try_get::<Option<f64>, _>("best_metric")?
                    .unwrap_or(f64::NAN),
            }),
            None => None,
        };
        Ok(Self {
            id,
            state: r
                .try_get::<String, _>("state")?
                .parse()
                .map_err(anyhow::Error::msg)?,
            preset: r.try_get("preset")?,
            spec: serde_json::from_str(r.try_get("spec_json")?).context("search spec")?,
            base: serde_json::from_str(r.try_get("base_config_json")?).context("base config")?,
            dataset_format: r.try_get("dataset_format")?,
            dataset_path: r.try_get("dataset_path")?,
            created_by: r.try_get("created_by")?,
            created_at_ms: r.try_get("created_at_ms")?,
            finished_at_ms: r.try_get("finished_at_ms")?,
            best,
            error: r.try_get("error")?,
        })
    }
}

impl SearchEvent {
    fn from_row(r: &AnyRow) -> Result<Self> {
        Ok(Self {
            seq: r.try_get("seq")?,
            kind: r
                .try_get::<String, _>("kind")?
                .parse()
                .map_err(anyhow::Error::msg)?,
            trial: opt_u32(r, "trial")?,
            rung: opt_u32(r, "rung")?,
            epoch: opt_u32(r, "epoch")?,
            metric: r.try_get("metric")?,
            job_id: r
                .try_get::<Option<String>, _>("job_id")?
                .as_deref()
                .map(uuid)
                .transpose()?,
            message: r.try_get("message")?,
            created_at_ms: r.try_get("created_at_ms")?,
        })
    }
}

impl Store {
    /// Stores a new search (RUNNING, no trials yet: [`Store::advance_search`] starts them).
    pub async fn insert_search(&self, s: &SearchRow) -> StoreResult<()> {
        let spec = serde_json::to_string(&s.spec)?;
        let base = serde_json::to_string(&s.base)?;
        self.write(async |c| {
            sqlx::query(&format!(
                "INSERT INTO searches ({SEARCH_COLUMNS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL, NULL, NULL, NULL, '')"
            ))
            .bind(s.id.to_string())
            .bind(s.state.name())
            .bind(&s.preset)
            .bind(spec)
            .bind(base)
            .bind(&s.dataset_format)
            .bind(&s.dataset_path)
            .bind(&s.created_by)
            .bind(s.created_at_ms)
            .execute(c)
            .await?;
            Ok(())
        })
        .await
    }

    pub async fn get_search(&self, id: Uuid) -> StoreResult<Option<SearchRow>> {
        let row = sqlx::query(&format!(
            "SELECT {SEARCH_COLUMNS} FROM searches WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(self.pool()?)
        .await?;
        Ok(row.map(|r| SearchRow::from_row(&r)).transpose()?)
    }

    /// Searches newest first, after the `(created_at_ms, id)` cursor.
    pub async fn list_searches(
        &self,
        limit: usize,
        after: Option<(i64, String)>,
    ) -> StoreResult<Vec<SearchRow>> {
        let (cursor_ms, cursor_id) = after.unwrap_or((i64::MAX, String::new()));
        let rows = sqlx::query(&format!(
            "SELECT {SEARCH_COLUMNS} FROM searches \
             WHERE created_at_ms < $1 OR (created_at_ms = $1 AND ($2 = '' OR id < $2)) \
             ORDER BY created_at_ms DESC, id DESC LIMIT $3"
        ))
        .bind(cursor_ms)
        .bind(cursor_id)
        .bind(limit as i64)
        .fetch_all(self.pool()?)
        .await?;
        Ok(readable(&rows, SearchRow::from_row))
    }

    /// Ids of the searches still running (each replica advances them now and then).
    pub async fn running_searches(&self) -> StoreResult<Vec<Uuid>> {
        let ids: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM searches WHERE state = 'RUNNING' ORDER BY created_at_ms",
        )
        .fetch_all(self.pool()?)
        .await?;
        Ok(ids.iter().filter_map(|(id,)| uuid(id).ok()).collect())
    }

    /// A search's trials, by number.
    pub async fn search_trials(&self, id: Uuid) -> StoreResult<Vec<JobRow>> {
        Ok(self.trials_of(&[id]).await?.remove(&id).unwrap_or_default())
    }

    /// The trials of several searches (a page of ListSearches), by search, each by number.
    pub async fn trials_of(&self, ids: &[Uuid]) -> StoreResult<HashMap<Uuid, Vec<JobRow>>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let marks: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT {JOB_COLUMNS}, {BEST_VAL_ACCURACY} FROM jobs WHERE search_id IN ({}) \
             ORDER BY trial",
            marks.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for id in ids {
            query = query.bind(id.to_string());
        }
        let rows = query.fetch_all(self.pool()?).await?;
        let mut by_search: HashMap<Uuid, Vec<JobRow>> = HashMap::new();
        for job in readable(&rows, |r| JobRow::from_row(r, &self.paths)) {
            if let Some(search) = job.search_id {
                by_search.entry(search).or_default().push(job);
            }
        }
        Ok(by_search)
    }

    /// The epochs each trial of a search recorded (their curves), by job, each in order.
    pub async fn search_epochs(&self, id: Uuid) -> StoreResult<HashMap<Uuid, Vec<EpochMetrics>>> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT e.job_id, e.metrics_json FROM job_epochs e JOIN jobs j ON j.id = e.job_id \
             WHERE j.search_id = $1 ORDER BY e.job_id, e.epoch",
        )
        .bind(id.to_string())
        .fetch_all(self.pool()?)
        .await?;
        let mut by_job: HashMap<Uuid, Vec<EpochMetrics>> = HashMap::new();
        for (job, metrics) in &rows {
            if let (Ok(job), Ok(m)) = (uuid(job), serde_json::from_str(metrics)) {
                by_job.entry(job).or_default().push(m);
            }
        }
        Ok(by_job)
    }

    /// A search's reports, by trial and rung.
    pub async fn search_reports(&self, id: Uuid) -> StoreResult<Vec<SearchReport>> {
        let rows = sqlx::query(
            "SELECT trial, rung, epoch, metric, job_id FROM search_reports \
             WHERE search_id = $1 ORDER BY trial, rung",
        )
        .bind(id.to_string())
        .fetch_all(self.pool()?)
        .await?;
        Ok(readable(&rows, |r| {
            Ok(SearchReport {
                trial: r.try_get::<i64, _>("trial")? as u32,
                rung: r.try_get::<i64, _>("rung")? as u32,
                epoch: r.try_get::<i64, _>("epoch")? as u32,
                metric: r.try_get("metric")?,
                job_id: uuid(r.try_get("job_id")?)?,
            })
        }))
    }

    /// A search's events after `seq`, oldest first.
    pub async fn search_events(&self, id: Uuid, after: i64) -> StoreResult<Vec<SearchEvent>> {
        let rows = sqlx::query(
            "SELECT seq, kind, trial, rung, epoch, metric, job_id, message, created_at_ms \
             FROM search_events WHERE search_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(id.to_string())
        .bind(after)
        .fetch_all(self.pool()?)
        .await?;
        Ok(readable(&rows, SearchEvent::from_row))
    }

    /// How many trials of all searches are in each job state.
    pub async fn trials_by_state(&self) -> StoreResult<Vec<(JobState, i64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, COUNT(*) FROM jobs WHERE search_id IS NOT NULL GROUP BY state",
        )
        .fetch_all(self.pool()?)
        .await?;
        Ok(super::every_state(&rows))
    }

    /// RUNNING → CANCELLED, with its queued and waiting trials; its running trials are asked
    /// to cancel (returned, to be told here at once). None when the search was not running.
    pub async fn cancel_search(&self, id: Uuid) -> StoreResult<Option<Vec<Uuid>>> {
        self.write(async |c| {
            let sid = id.to_string();
            let now = now_ms();
            let done = sqlx::query(
                "UPDATE searches SET state = 'CANCELLED', finished_at_ms = $2, \
                 version = version + 1 WHERE id = $1 AND state = 'RUNNING'",
            )
            .bind(&sid)
            .bind(now)
            .execute(&mut *c)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(None);
            }
            sqlx::query(
                "UPDATE jobs SET state = 'CANCELLED', finished_at_ms = $2, cancel_requested = TRUE \
                 WHERE search_id = $1 AND state IN ('QUEUED', 'PAUSED')",
            )
            .bind(&sid)
            .bind(now)
            .execute(&mut *c)
            .await?;
            let running: Vec<(String,)> = sqlx::query_as(
                "UPDATE jobs SET cancel_requested = TRUE \
                 WHERE search_id = $1 AND state = 'RUNNING' RETURNING id",
            )
            .bind(&sid)
            .fetch_all(&mut *c)
            .await?;
            let mut log = log::Log::open(c, id).await?;
            log.push(c, log::ended(SearchState::Cancelled, "cancelled"))
                .await?;
            Ok(Some(
                running.iter().filter_map(|(r,)| uuid(r).ok()).collect(),
            ))
        })
        .await
    }

    /// Advances a running search in one transaction (see `advance.rs`); None when it is not
    /// running (any more).
    pub async fn advance_search(&self, id: Uuid) -> StoreResult<Option<Advanced>> {
        self.write(async |c| advance::advance(c, id).await).await
    }
}

//! A search's event log (`search_events`), appended to under the search's lock: numbered
//! from 1 without gaps, each change of the search logged in the transaction that made it.

use anyhow::Result;
use sqlx::AnyConnection;
use uuid::Uuid;

use super::{EventKind, SearchState};
use crate::names::Named;
use crate::store::now_ms;

/// An event to log.
pub(crate) struct Ev {
    kind: EventKind,
    trial: Option<u32>,
    rung: Option<u32>,
    pub epoch: Option<u32>,
    pub metric: Option<f64>,
    job_id: Option<Uuid>,
    message: String,
}

impl Ev {
    /// About trial number `trial` (job `job`) at `rung`.
    pub fn trial(
        kind: EventKind,
        trial: u32,
        rung: u32,
        job: Uuid,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            trial: Some(trial),
            rung: Some(rung),
            epoch: None,
            metric: None,
            job_id: Some(job),
            message: message.into(),
        }
    }
}

pub(crate) fn ended(state: SearchState, message: &str) -> Ev {
    Ev {
        kind: EventKind::SearchEnded,
        trial: None,
        rung: None,
        epoch: None,
        metric: None,
        job_id: None,
        message: format!("{}: {message}", state.name()),
    }
}

/// A search's event log, appended to under the search's lock.
pub(crate) struct Log {
    search: String,
    seq: i64,
}

impl Log {
    pub async fn open(c: &mut AnyConnection, id: Uuid) -> Result<Self> {
        let search = id.to_string();
        let (seq,): (i64,) =
            sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM search_events WHERE search_id = $1")
                .bind(&search)
                .fetch_one(&mut *c)
                .await?;
        Ok(Self { search, seq })
    }

    pub async fn push(&mut self, c: &mut AnyConnection, e: Ev) -> Result<()> {
        self.seq += 1;
        sqlx::query(
            "INSERT INTO search_events (search_id, seq, kind, trial, rung, epoch, metric, job_id, \
             message, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&self.search)
        .bind(self.seq)
        .bind(e.kind.name())
        .bind(e.trial.map(i64::from))
        .bind(e.rung.map(i64::from))
        .bind(e.epoch.map(i64::from))
        .bind(e.metric.filter(|m| m.is_finite()))
        .bind(e.job_id.map(|j| j.to_string()))
        .bind(e.message)
        .bind(now_ms())
        .execute(c)
        .await?;
        Ok(())
    }
}

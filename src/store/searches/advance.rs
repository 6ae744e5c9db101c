//! Advancing a search: one transaction that first raises the search's `version` (which locks
//! its row: a second replica advancing the same search waits, then sees this one's writes),
//! records the reports of trials that reached their rung, asks the rule
//! ([`crate::engine::search::decide`]) what to do, and applies it: promotions (a waiting
//! trial queued again, to resume from its checkpoints), new trials (numbered: the unique
//! `(search_id, trial)` refuses a second start), stops, the best trial, the end. Every change
//! goes into the search's event log in the same transaction, so each happens exactly once.

use std::collections::{HashMap, HashSet};

use anyhow::Result;
use sqlx::{AnyConnection, Row};
use uuid::Uuid;

use super::log::{ended, Ev, Log};
use super::{EventKind, SearchRow, SearchState, SEARCH_COLUMNS};
use crate::engine::search::{best, decide, describe, SearchSpec, Status, TrialView};
use crate::engine::train::EpochMetrics;
use crate::names::Named;
use crate::store::rows::uuid;
use crate::store::{insert_job_on, now_ms, JobRow, JobState};

/// What one advance did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Advanced {
    pub started: usize,
    pub promoted: usize,
    pub stopped: usize,
    /// The search ended, in this state.
    pub ended: Option<SearchState>,
}

/// A trial as the advance reads it.
struct Trial {
    id: Uuid,
    trial: u32,
    rung: u32,
    state: JobState,
    metrics: Option<EpochMetrics>,
    error: String,
}

impl Trial {
    fn event(&self, kind: EventKind, message: impl Into<String>) -> Ev {
        Ev::trial(kind, self.trial, self.rung, self.id, message)
    }
}

async fn trials(c: &mut AnyConnection, id: Uuid) -> Result<Vec<Trial>> {
    let rows = sqlx::query(
        "SELECT id, trial, rung, state, latest_metrics_json, error FROM jobs \
         WHERE search_id = $1 ORDER BY trial",
    )
    .bind(id.to_string())
    .fetch_all(&mut *c)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Trial {
                id: uuid(r.try_get("id")?)?,
                trial: r.try_get::<i64, _>("trial")? as u32,
                rung: r.try_get::<i64, _>("rung")? as u32,
                state: r
                    .try_get::<String, _>("state")?
                    .parse()
                    .map_err(anyhow::Error::msg)?,
                metrics: r
                    .try_get::<Option<String>, _>("latest_metrics_json")?
                    .and_then(|m| serde_json::from_str(&m).ok()),
                error: r.try_get("error")?,
            })
        })
        .collect()
}

/// The epoch a trial at `rung` waits at (None: its rung is its last).
fn pause_at(spec: &SearchSpec, trial: u32, rung: u32, epochs: usize) -> Option<u32> {
    let rungs = spec.rungs(spec.bracket_of(trial), epochs as u32);
    ((rung as usize) + 1 < rungs.len()).then(|| rungs[rung as usize])
}

/// Sets a job's state, if it is still `from`; whether it was.
async fn move_job(c: &mut AnyConnection, job: Uuid, from: JobState, to: JobState) -> Result<bool> {
    let done =
        sqlx::query("UPDATE jobs SET state = $3, finished_at_ms = $4 WHERE id = $1 AND state = $2")
            .bind(job.to_string())
            .bind(from.name())
            .bind(to.name())
            .bind(to.is_terminal().then(now_ms))
            .execute(c)
            .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn advance(c: &mut AnyConnection, id: Uuid) -> Result<Option<Advanced>> {
    let locked = sqlx::query(
        "UPDATE searches SET version = version + 1 WHERE id = $1 AND state = 'RUNNING'",
    )
    .bind(id.to_string())
    .execute(&mut *c)
    .await?;
    if locked.rows_affected() == 0 {
        return Ok(None);
    }
    let row = sqlx::query(&format!(
        "SELECT {SEARCH_COLUMNS} FROM searches WHERE id = $1"
    ))
    .bind(id.to_string())
    .fetch_one(&mut *c)
    .await?;
    let search = SearchRow::from_row(&row)?;
    let mut trials = trials(c, id).await?;
    let mut step = Step {
        log: Log::open(c, id).await?,
        search: &search,
        out: Advanced::default(),
    };
    let views = step.observe(c, &mut trials).await?;
    let d = decide(&search.spec, &views);
    step.promote(c, &mut trials, &d.promote).await?;
    step.start(c, &mut trials, &d.start).await?;
    let leader = best(&search.spec, &views).and_then(|(trial, rung, metric)| {
        let t = trials.iter().find(|t| t.trial == trial)?;
        Some((t.id, trial, rung, metric))
    });
    if let Some((job, trial, rung, metric)) = leader {
        sqlx::query(
            "UPDATE searches SET best_job_id = $2, best_trial = $3, best_rung = $4, \
             best_metric = $5 WHERE id = $1",
        )
        .bind(id.to_string())
        .bind(job.to_string())
        .bind(i64::from(trial))
        .bind(i64::from(rung))
        .bind(Some(metric).filter(|m| m.is_finite()))
        .execute(&mut *c)
        .await?;
    }
    if d.finished {
        step.conclude(c, &trials, leader.map(|l| (l.1, l.3)))
            .await?;
    }
    Ok(Some(step.out))
}

/// One advance of a search, under its lock.
struct Step<'a> {
    log: Log,
    search: &'a SearchRow,
    out: Advanced,
}

impl Step<'_> {
    /// Records the reports of trials that reached their rung, stops a waiting trial without a
    /// figure, logs trials that ended on their own; the rule's view of every trial.
    async fn observe(
        &mut self,
        c: &mut AnyConnection,
        trials: &mut [Trial],
    ) -> Result<Vec<TrialView>> {
        let (id, spec) = (self.search.id, &self.search.spec);
        let mut reports: HashMap<(u32, u32), Option<f64>> = HashMap::new();
        for r in sqlx::query("SELECT trial, rung, metric FROM search_reports WHERE search_id = $1")
            .bind(id.to_string())
            .fetch_all(&mut *c)
            .await?
        {
            let key = (
                r.try_get::<i64, _>("trial")? as u32,
                r.try_get::<i64, _>("rung")? as u32,
            );
            reports.insert(key, r.try_get("metric")?);
        }
        let stopped: HashSet<u32> = sqlx::query_as::<_, (i64,)>(
            "SELECT trial FROM search_events WHERE search_id = $1 AND kind = 'TRIAL_STOPPED'",
        )
        .bind(id.to_string())
        .fetch_all(&mut *c)
        .await?
        .into_iter()
        .map(|(t,)| t as u32)
        .collect();
        let mut views = Vec::with_capacity(trials.len());
        for t in trials.iter_mut() {
            let reached = matches!(t.state, JobState::Paused | JobState::Succeeded);
            if reached && !reports.contains_key(&(t.trial, t.rung)) {
                report(c, &mut self.log, spec, id, t).await?;
                let metric = t.metrics.as_ref().map(|m| spec.metric_of(m));
                reports.insert((t.trial, t.rung), metric);
            }
            let measured = reports.get(&(t.trial, t.rung)).copied().flatten().is_some();
            // Nothing to rank it by: it cannot be promoted.
            if t.state == JobState::Paused
                && !measured
                && move_job(c, t.id, JobState::Paused, JobState::Stopped).await?
            {
                t.state = JobState::Stopped;
                t.error = "no validation metric at its rung".into();
            }
            let ended = t.state.is_terminal() && t.state != JobState::Succeeded;
            if ended && !stopped.contains(&t.trial) {
                let why = match t.state {
                    JobState::Failed => format!("failed: {}", t.error),
                    JobState::Cancelled => "cancelled".into(),
                    _ => t.error.clone(),
                };
                self.log
                    .push(c, t.event(EventKind::TrialStopped, why))
                    .await?;
                self.out.stopped += 1;
            }
            let mut mine: Vec<(u32, f64)> = reports
                .iter()
                .filter_map(|(&(trial, rung), m)| (trial == t.trial).then_some((rung, (*m)?)))
                .collect();
            mine.sort_by_key(|r| r.0);
            views.push(TrialView {
                trial: t.trial,
                rung: t.rung,
                status: match t.state {
                    JobState::Queued | JobState::Running => Status::Active,
                    JobState::Paused => Status::Paused,
                    JobState::Succeeded => Status::Done,
                    _ => Status::Ended,
                },
                reports: mine,
            });
        }
        Ok(views)
    }

    /// Queues waiting trials again towards their next rung (still waiting: a cancel did not
    /// come between).
    async fn promote(
        &mut self,
        c: &mut AnyConnection,
        trials: &mut [Trial],
        promote: &[(u32, u32)],
    ) -> Result<()> {
        let (spec, epochs) = (&self.search.spec, self.search.base.epochs);
        for &(trial, to) in promote {
            let t = trials
                .iter_mut()
                .find(|t| t.trial == trial)
                .expect("a trial");
            let done = sqlx::query(
                "UPDATE jobs SET state = 'QUEUED', rung = $2, pause_at = $3 \
                 WHERE id = $1 AND state = 'PAUSED'",
            )
            .bind(t.id.to_string())
            .bind(i64::from(to))
            .bind(pause_at(spec, trial, to, epochs).map(i64::from))
            .execute(&mut *c)
            .await?;
            if done.rows_affected() == 1 {
                t.rung = to;
                let target = spec.rungs(spec.bracket_of(trial), epochs as u32);
                let mut e = t.event(EventKind::TrialPromoted, "");
                e.epoch = target.get(to as usize).copied();
                self.log.push(c, e).await?;
                self.out.promoted += 1;
            }
        }
        Ok(())
    }

    /// Queues new trials.
    async fn start(
        &mut self,
        c: &mut AnyConnection,
        trials: &mut Vec<Trial>,
        start: &[u32],
    ) -> Result<()> {
        for &trial in start {
            let t = insert_trial(c, self.search, trial).await?;
            let values = describe(&self.search.spec.assignment(trial));
            self.log
                .push(c, t.event(EventKind::TrialStarted, values))
                .await?;
            if t.state == JobState::Failed {
                let why = format!("failed: {}", t.error);
                self.log
                    .push(c, t.event(EventKind::TrialStopped, why))
                    .await?;
            }
            trials.push(t);
            self.out.started += 1;
        }
        Ok(())
    }

    /// Ends the search: its waiting trials stop; it succeeded when some trial reported
    /// (`leader`: the best trial and its figure).
    async fn conclude(
        &mut self,
        c: &mut AnyConnection,
        trials: &[Trial],
        leader: Option<(u32, f64)>,
    ) -> Result<()> {
        for t in trials.iter().filter(|t| t.state == JobState::Paused) {
            if move_job(c, t.id, JobState::Paused, JobState::Stopped).await? {
                let e = t.event(EventKind::TrialStopped, "not promoted; the search ended");
                self.log.push(c, e).await?;
                self.out.stopped += 1;
            }
        }
        let (state, why) = match leader {
            Some(_) => (SearchState::Succeeded, String::new()),
            None => (
                SearchState::Failed,
                "no trial reported a validation metric (see the trials' errors)".to_string(),
            ),
        };
        sqlx::query(
            "UPDATE searches SET state = $2, finished_at_ms = $3, error = $4 WHERE id = $1",
        )
        .bind(self.search.id.to_string())
        .bind(state.name())
        .bind(now_ms())
        .bind(&why)
        .execute(&mut *c)
        .await?;
        let message = match leader {
            Some((trial, metric)) => format!("best trial {trial} ({metric:.4})"),
            None => why,
        };
        self.log.push(c, ended(state, &message)).await?;
        self.out.ended = Some(state);
        Ok(())
    }
}

/// Records trial `t`'s report at its rung.
async fn report(
    c: &mut AnyConnection,
    log: &mut Log,
    spec: &SearchSpec,
    id: Uuid,
    t: &Trial,
) -> Result<()> {
    let metric = t.metrics.as_ref().map(|m| spec.metric_of(m));
    let epoch = t.metrics.as_ref().map_or(0, |m| m.epoch as u32);
    sqlx::query(
        "INSERT INTO search_reports (search_id, trial, rung, epoch, metric, job_id, created_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id.to_string())
    .bind(i64::from(t.trial))
    .bind(i64::from(t.rung))
    .bind(i64::from(epoch))
    .bind(metric.filter(|m| m.is_finite()))
    .bind(t.id.to_string())
    .bind(now_ms())
    .execute(&mut *c)
    .await?;
    let mut e = t.event(EventKind::TrialReported, "");
    e.epoch = Some(epoch);
    e.metric = metric;
    log.push(c, e).await
}

/// Inserts trial `trial` of `search` as a queued job (failed at once when its values make
/// an invalid config).
async fn insert_trial(c: &mut AnyConnection, search: &SearchRow, trial: u32) -> Result<Trial> {
    let spec = &search.spec;
    let (config, error) = match spec.trial_config(&search.base, trial) {
        Ok(config) => (config, None),
        Err(e) => (search.base.clone(), Some(e)),
    };
    let mut job = JobRow::queued(
        &search.preset,
        config,
        &search.dataset_format,
        &search.dataset_path,
    );
    job.created_by = search.created_by.clone();
    job.search_id = Some(search.id);
    job.trial = Some(trial);
    job.pause_at = pause_at(spec, trial, 0, job.config.epochs);
    if let Some(e) = &error {
        job.state = JobState::Failed;
        job.error = format!("invalid trial config: {e}");
        job.finished_at_ms = Some(job.created_at_ms);
    }
    insert_job_on(c, &job).await?;
    Ok(Trial {
        id: job.id,
        trial,
        rung: 0,
        state: job.state,
        metrics: None,
        error: job.error,
    })
}

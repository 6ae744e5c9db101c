//! Search rows to protobuf messages, and a StartSearch request to a spec.

use std::collections::HashMap;

use uuid::Uuid;

use crate::engine::search::{
    describe, Algorithm, Asha, Metric, Mode, SearchSpec, Space, SpecError,
};
use crate::engine::train::{EpochMetrics, TrainConfig};
use crate::error::ApiError;
use crate::grpc::convert::{job_state, metrics, timestamp};
use crate::proto::v1 as pb;
use crate::store::{JobRow, SearchEvent, SearchReport, SearchRow, SearchState};

fn spec_error(e: SpecError) -> ApiError {
    ApiError::field(&e.field, e.message)
}

/// The request's spec, its defaults filled in and checked on `base` (every value a field
/// may take must make a valid config), and those configs.
pub fn spec_of(
    r: &pb::StartSearchRequest,
    base: &TrainConfig,
) -> Result<(SearchSpec, Vec<TrainConfig>), ApiError> {
    if r.space.trim().is_empty() {
        return Err(ApiError::field(
            "space",
            "is required: field=domain items, e.g. \"lr=log_uniform(1e-4,3e-3) r=[1,2]\"",
        ));
    }
    let space = Space::parse(&r.space).map_err(spec_error)?;
    let algorithm = pb::SearchAlgorithm::try_from(r.algorithm)
        .map_err(|_| ApiError::field("algorithm", format!("unknown algorithm {}", r.algorithm)))?;
    let or = |v: u32, default: u32| if v == 0 { default } else { v };
    let algorithm = match algorithm {
        pb::SearchAlgorithm::Unspecified | pb::SearchAlgorithm::Random => Algorithm::Random,
        pb::SearchAlgorithm::Grid => Algorithm::Grid,
        pb::SearchAlgorithm::Asha => {
            let a = r.asha.unwrap_or_default();
            Algorithm::Asha(Asha {
                min_epochs: or(a.min_epochs, 1),
                max_epochs: or(a.max_epochs, base.epochs as u32),
                eta: or(a.eta, 3),
                brackets: or(a.brackets, 1),
            })
        }
    };
    if r.asha.is_some() && !matches!(algorithm, Algorithm::Asha(_)) {
        return Err(ApiError::field(
            "asha",
            "settings for algorithm SEARCH_ALGORITHM_ASHA only",
        ));
    }
    let metric = match pb::SearchMetric::try_from(r.metric) {
        Ok(pb::SearchMetric::Unspecified | pb::SearchMetric::ValAccuracy) => Metric::ValAccuracy,
        Ok(pb::SearchMetric::ValLoss) => Metric::ValLoss,
        Err(_) => {
            return Err(ApiError::field(
                "metric",
                format!("unknown metric {}", r.metric),
            ))
        }
    };
    let mode = match pb::SearchMode::try_from(r.mode) {
        Ok(pb::SearchMode::Unspecified) if metric == Metric::ValLoss => Mode::Min,
        Ok(pb::SearchMode::Unspecified | pb::SearchMode::Max) => Mode::Max,
        Ok(pb::SearchMode::Min) => Mode::Min,
        Err(_) => return Err(ApiError::field("mode", format!("unknown mode {}", r.mode))),
    };
    let max_trials = match (r.max_trials, &algorithm, space.grid_size()) {
        (0, Algorithm::Grid, Some(n)) => {
            n.min(u64::from(crate::engine::search::MAX_TRIALS) + 1) as u32
        }
        (0, _, _) => 16,
        (n, _, _) => n,
    };
    let spec = SearchSpec {
        space,
        algorithm,
        max_trials,
        max_concurrent: or(r.max_concurrent, 2),
        metric,
        mode,
        seed: r.seed.unwrap_or(base.seed),
    };
    spec.validate().map_err(spec_error)?;
    let corners = spec.check_on(base).map_err(spec_error)?;
    Ok((spec, corners))
}

pub fn search_state(s: SearchState) -> pb::SearchState {
    match s {
        SearchState::Running => pb::SearchState::Running,
        SearchState::Succeeded => pb::SearchState::Succeeded,
        SearchState::Failed => pb::SearchState::Failed,
        SearchState::Cancelled => pb::SearchState::Cancelled,
    }
}

/// What GetSearch shows of each trial besides its job: its reports and its epochs.
pub struct Detail {
    pub reports: Vec<SearchReport>,
    pub epochs: HashMap<Uuid, Vec<EpochMetrics>>,
}

/// A search and, with `detail` (GetSearch), its trials, their reports and curves.
pub fn search(s: &SearchRow, trials: &[JobRow], detail: Option<&Detail>) -> pb::Search {
    let spec = &s.spec;
    let (algorithm, asha) = match spec.algorithm {
        Algorithm::Grid => (pb::SearchAlgorithm::Grid, None),
        Algorithm::Random => (pb::SearchAlgorithm::Random, None),
        Algorithm::Asha(a) => (
            pb::SearchAlgorithm::Asha,
            Some(pb::AshaSettings {
                min_epochs: a.min_epochs,
                max_epochs: a.max_epochs,
                eta: a.eta,
                brackets: a.brackets,
            }),
        ),
    };
    let epochs = s.base.epochs as u32;
    let rungs = spec.rungs(0, epochs);
    let best = s.best.as_ref();
    pb::Search {
        search_id: s.id.to_string(),
        state: search_state(s.state) as i32,
        preset: s.preset.clone(),
        dataset: Some(pb::Dataset {
            format: s.dataset_format.clone(),
            path: s.dataset_path.clone(),
            ..Default::default()
        }),
        space: spec.space.to_string(),
        algorithm: algorithm as i32,
        max_trials: spec.max_trials,
        max_concurrent: spec.max_concurrent,
        metric: match spec.metric {
            Metric::ValAccuracy => pb::SearchMetric::ValAccuracy,
            Metric::ValLoss => pb::SearchMetric::ValLoss,
        } as i32,
        mode: match spec.mode {
            Mode::Max => pb::SearchMode::Max,
            Mode::Min => pb::SearchMode::Min,
        } as i32,
        seed: spec.seed,
        asha,
        base_config_json: serde_json::to_string(&s.base).unwrap_or_default(),
        created_at: Some(timestamp(s.created_at_ms)),
        finished_at: s.finished_at_ms.map(timestamp),
        trials_total: spec.total_trials(),
        trials_started: trials.len() as u32,
        best_job_id: best.map(|b| b.job_id.to_string()).unwrap_or_default(),
        best_trial: best.map(|b| b.trial),
        best_metric: best.map(|b| b.metric).filter(|m| m.is_finite()),
        best_epochs: best.map_or(0, |b| {
            let r = spec.rungs(spec.bracket_of(b.trial), epochs);
            r.get(b.rung as usize).copied().unwrap_or(0)
        }),
        trials: match detail {
            Some(detail) => trials.iter().map(|t| trial(spec, t, detail)).collect(),
            None => Vec::new(),
        },
        epochs_trained: trials.iter().map(|t| t.epochs_completed).sum(),
        epochs_budget: spec.budget_epochs(epochs).min(u64::from(u32::MAX)) as u32,
        rungs,
        error: s.error.clone(),
        created_by: s.created_by.clone(),
    }
}

fn trial(spec: &SearchSpec, t: &JobRow, detail: &Detail) -> pb::Trial {
    let n = t.trial.unwrap_or(0);
    pb::Trial {
        trial: n,
        job_id: t.id.to_string(),
        state: job_state(t.state) as i32,
        rung: t.rung,
        values: describe(&spec.assignment(n)),
        reports: detail
            .reports
            .iter()
            .filter(|r| r.trial == n)
            .map(|r| pb::TrialReport {
                rung: r.rung,
                epoch: r.epoch,
                metric: r.metric,
            })
            .collect(),
        epochs_completed: t.epochs_completed,
        error: t.error.clone(),
        epochs: detail
            .epochs
            .get(&t.id)
            .map(|e| e.iter().map(metrics).collect())
            .unwrap_or_default(),
    }
}

pub fn event(e: &SearchEvent) -> pb::SearchEvent {
    use crate::store::EventKind as K;
    let kind = match e.kind {
        K::TrialStarted => pb::search_event::Kind::TrialStarted,
        K::TrialReported => pb::search_event::Kind::TrialReported,
        K::TrialPromoted => pb::search_event::Kind::TrialPromoted,
        K::TrialStopped => pb::search_event::Kind::TrialStopped,
        K::SearchEnded => pb::search_event::Kind::SearchEnded,
    };
    pb::SearchEvent {
        seq: e.seq as u64,
        kind: kind as i32,
        trial: e.trial,
        rung: e.rung,
        epoch: e.epoch,
        metric: e.metric,
        job_id: e.job_id.map(|j| j.to_string()).unwrap_or_default(),
        message: e.message.clone(),
        at: Some(timestamp(e.created_at_ms)),
        search: None,
    }
}

//! Which trials start, run on to the next rung, or stop: a pure function of the trials'
//! states and reports, so that whoever advances a search (any replica, in one store
//! transaction) decides the same.
//!
//! The ASHA rule (Li et al., "A System for Massively Parallel Hyperparameter Tuning", 2020):
//! a trial waiting at rung k is promoted to rung k+1 when its report is among the best
//! ⌊n/η⌋ of the n reports at rung k so far; deeper rungs first. Ties go to the lower trial
//! number. Promotions out of rung k are capped at the synchronous count ⌊N/η^(k+1)⌋ of the
//! bracket's N trials, so a search never trains more epochs than synchronous successive
//! halving would (with 27 trials and η = 3: 9 promoted from rung 0, 3 from rung 1, 1 to the
//! top). A free slot goes to a promotion before a new trial.

use super::{Algorithm, SearchSpec};

/// Where a trial stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Queued or running towards its rung.
    Active,
    /// Waiting at its rung, reported.
    Paused,
    /// Trained to its last epoch.
    Done,
    /// Failed, cancelled or stopped: never runs again.
    Ended,
}

/// A trial as the rule sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialView {
    pub trial: u32,
    /// The rung (index) it trains or trained towards.
    pub rung: u32,
    pub status: Status,
    /// `(rung, metric)` for each rung it reported at.
    pub reports: Vec<(u32, f64)>,
}

impl TrialView {
    fn report(&self, rung: u32) -> Option<f64> {
        self.reports.iter().find(|r| r.0 == rung).map(|r| r.1)
    }
}

/// What a search does now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// `(trial, to_rung)`.
    pub promote: Vec<(u32, u32)>,
    /// New trials, by number.
    pub start: Vec<u32>,
    /// Nothing runs, nothing can: the search is over (waiting trials stop).
    pub finished: bool,
}

/// Decides what the search does with its free slots, given its trials (numbered from 0 in
/// the order they started).
pub fn decide(spec: &SearchSpec, trials: &[TrialView]) -> Decision {
    let total = spec.total_trials();
    let mut views = trials.to_vec();
    let mut next = views.iter().map(|t| t.trial + 1).max().unwrap_or(0);
    let active = views.iter().filter(|t| t.status == Status::Active).count() as u32;
    let mut slots = spec.max_concurrent.saturating_sub(active);
    let mut d = Decision::default();
    while slots > 0 {
        if let Some((trial, to)) = promotable(spec, &views, total) {
            let v = views
                .iter_mut()
                .find(|v| v.trial == trial)
                .expect("a trial");
            v.rung = to;
            v.status = Status::Active;
            d.promote.push((trial, to));
        } else if next < total {
            views.push(TrialView {
                trial: next,
                rung: 0,
                status: Status::Active,
                reports: Vec::new(),
            });
            d.start.push(next);
            next += 1;
        } else {
            break;
        }
        slots -= 1;
    }
    d.finished = active == 0 && d.promote.is_empty() && d.start.is_empty() && next >= total;
    d
}

/// The next promotion: `(trial, to_rung)`.
fn promotable(spec: &SearchSpec, views: &[TrialView], total: u32) -> Option<(u32, u32)> {
    let Algorithm::Asha(a) = spec.algorithm else {
        return None;
    };
    let brackets = a.brackets.max(1);
    // (rung epochs, bracket, trial, to): the deepest rung first, then the first bracket.
    let mut pick: Option<(u32, u32, u32, u32)> = None;
    for b in 0..brackets {
        let rungs = a.rungs(b);
        let n = (0..total).filter(|i| i % brackets == b).count() as u64;
        let in_bracket: Vec<&TrialView> =
            views.iter().filter(|v| v.trial % brackets == b).collect();
        let mut cap = n;
        for k in 0..rungs.len().saturating_sub(1) as u32 {
            cap /= u64::from(a.eta);
            let promoted = in_bracket.iter().filter(|v| v.rung > k).count() as u64;
            if promoted >= cap {
                continue;
            }
            let mut reported: Vec<(f64, &TrialView)> = in_bracket
                .iter()
                .filter_map(|v| v.report(k).map(|m| (spec.score(m), *v)))
                .collect();
            reported.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.trial.cmp(&y.1.trial)));
            let top = reported.len() / a.eta as usize;
            let candidate = reported[..top]
                .iter()
                .find(|(_, v)| v.status == Status::Paused && v.rung == k);
            if let Some((_, v)) = candidate {
                let key = (rungs[k as usize], b, v.trial, k + 1);
                if pick.is_none_or(|p| key.0 > p.0) {
                    pick = Some(key);
                }
            }
        }
    }
    pick.map(|p| (p.2, p.3))
}

/// The search's result so far: `(trial, rung, metric)` of the best report at the most epochs
/// any trial reached (ASHA), or the best report (grid, random); ties to the lower trial.
pub fn best(spec: &SearchSpec, trials: &[TrialView]) -> Option<(u32, u32, f64)> {
    let depth = |t: &TrialView, k: u32| match spec.algorithm {
        Algorithm::Asha(a) => a
            .rungs(spec.bracket_of(t.trial))
            .get(k as usize)
            .copied()
            .unwrap_or(0),
        _ => 0,
    };
    trials
        .iter()
        .flat_map(|t| t.reports.iter().map(move |&(k, m)| (t, k, m)))
        .max_by(|x, y| {
            let kx = (depth(x.0, x.1), spec.score(x.2));
            let ky = (depth(y.0, y.1), spec.score(y.2));
            kx.0.cmp(&ky.0)
                .then(kx.1.total_cmp(&ky.1))
                .then(y.0.trial.cmp(&x.0.trial))
        })
        .map(|(t, k, m)| (t.trial, k, m))
}

//! Hyper-parameter search, independent of any server: the space trials draw their values
//! from (`space`), the config fields a search may set (`fields`), and the rule that decides
//! which trials start, run on or stop (`asha`: grid, random, and asynchronous successive
//! halving with a synchronous budget).

mod asha;
mod fields;
mod space;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use asha::{best, decide, Decision, Status, TrialView};
pub use space::{describe, Assignment, Domain, Param, Space, Value};

use crate::engine::train::TrainConfig;

/// A spec error, naming the request field it is about (`space.lr`, `asha.eta`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

impl SpecError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// How trials are chosen and stopped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Algorithm {
    /// Every point of the space's grid once, each trained to the end.
    Grid,
    /// `max_trials` draws, each trained to the end.
    Random,
    /// Asynchronous successive halving: random draws trained to rungs of `min_epochs · ηᵏ`
    /// epochs (the last at `max_epochs`); the best 1/η of a rung's reports run on to the
    /// next, the others wait (and stop when the search ends).
    Asha(Asha),
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Asha {
    pub min_epochs: u32,
    pub max_epochs: u32,
    /// The reduction factor η.
    pub eta: u32,
    /// Brackets (Hyperband's): trial n is in bracket n mod brackets, whose first rung is
    /// `min_epochs · η^bracket`.
    pub brackets: u32,
}

/// Which validation figure ranks trials.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Metric {
    ValAccuracy,
    ValLoss,
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Mode {
    Max,
    Min,
}

/// What a search runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchSpec {
    pub space: Space,
    pub algorithm: Algorithm,
    pub max_trials: u32,
    /// Trials queued or running at once, at most.
    pub max_concurrent: u32,
    pub metric: Metric,
    pub mode: Mode,
    pub seed: u64,
}

/// Most trials one search starts.
pub const MAX_TRIALS: u32 = 10_000;

impl SearchSpec {
    /// Checks what the space cannot check alone (the grid's size, ASHA's numbers).
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.max_trials == 0 || self.max_trials > MAX_TRIALS {
            return Err(SpecError::new(
                "max_trials",
                format!("{} is not in 1..={MAX_TRIALS}", self.max_trials),
            ));
        }
        if self.max_concurrent == 0 {
            return Err(SpecError::new("max_concurrent", "must be at least 1"));
        }
        match &self.algorithm {
            Algorithm::Grid => match self.space.grid_size() {
                None => {
                    let p =
                        self.space.params.iter().find(|p| {
                            matches!(p.domain, Domain::Uniform(..) | Domain::LogUniform(..))
                        });
                    let field = p.map_or("space".into(), |p| format!("space.{}", p.field));
                    return Err(SpecError::new(
                        &field,
                        "a grid needs discrete fields (a choice or int(lo, hi)); use random or \
                         asha for a continuous range",
                    ));
                }
                Some(n) if n > u64::from(self.max_trials) => {
                    return Err(SpecError::new(
                        "max_trials",
                        format!(
                            "the grid has {n} points, more than max_trials ({}): raise \
                             max_trials or narrow the space",
                            self.max_trials
                        ),
                    ));
                }
                Some(_) => {}
            },
            Algorithm::Random => {}
            Algorithm::Asha(a) => a.validate()?,
        }
        Ok(())
    }

    /// Trials the search starts in all: the grid's points, or `max_trials` (no more than a
    /// discrete space holds: its draws do not repeat).
    pub fn total_trials(&self) -> u32 {
        match (&self.algorithm, self.space.grid_size()) {
            (Algorithm::Grid, Some(n)) => n as u32,
            (_, Some(n)) => self.max_trials.min(n.min(u64::from(u32::MAX)) as u32),
            (_, None) => self.max_trials,
        }
    }

    /// Trial `trial`'s values.
    pub fn assignment(&self, trial: u32) -> Assignment {
        match self.algorithm {
            Algorithm::Grid => self.space.grid_point(u64::from(trial)),
            _ => self.space.sample(self.seed, trial),
        }
    }

    /// Trial `trial`'s config: the base with its values set; an ASHA trial's schedule spans
    /// `max_epochs` and has no time budget (its rungs count epochs).
    pub fn trial_config(&self, base: &TrainConfig, trial: u32) -> Result<TrainConfig, String> {
        let mut config = base.clone();
        let values = self.assignment(trial);
        for (field, value) in &values {
            fields::apply(&mut config, field, value)?;
        }
        if let Algorithm::Asha(a) = self.algorithm {
            config.epochs = a.max_epochs as usize;
            config.max_minutes = 0.0;
        }
        config.validate().map_err(|e| {
            let values: Vec<String> = values.iter().map(|(f, v)| format!("{f}={v}")).collect();
            format!("{} ({}): {}", values.join(" "), e.field, e.message)
        })?;
        Ok(config)
    }

    /// Checks every field's values (each choice, both ends of a range) on `base`, one field
    /// at a time, so that a value the config refuses is an argument error before anything
    /// is queued; returns those configs (the machine's limits are judged on them next).
    pub fn check_on(&self, base: &TrainConfig) -> Result<Vec<TrainConfig>, SpecError> {
        let mut configs = Vec::new();
        for p in &self.space.params {
            for v in p.domain.corners() {
                let mut config = base.clone();
                let at = format!("space.{}", p.field);
                fields::apply(&mut config, &p.field, &v).map_err(|m| SpecError::new(&at, m))?;
                config.validate().map_err(|e| {
                    SpecError::new(
                        &at,
                        format!("{v} makes an invalid config: {}: {}", e.field, e.message),
                    )
                })?;
                configs.push(config);
            }
        }
        Ok(configs)
    }

    /// The epochs of each rung of `bracket` (one rung at the config's epochs outside ASHA).
    pub fn rungs(&self, bracket: u32, epochs: u32) -> Vec<u32> {
        match self.algorithm {
            Algorithm::Asha(a) => a.rungs(bracket),
            _ => vec![epochs],
        }
    }

    pub fn bracket_of(&self, trial: u32) -> u32 {
        match self.algorithm {
            Algorithm::Asha(a) => trial % a.brackets.max(1),
            _ => 0,
        }
    }

    /// The metric as a score, higher better (NaN: the worst).
    pub fn score(&self, metric: f64) -> f64 {
        let s = match self.mode {
            Mode::Max => metric,
            Mode::Min => -metric,
        };
        if s.is_nan() {
            f64::NEG_INFINITY
        } else {
            s
        }
    }

    /// The figure of an epoch's metrics this search ranks by.
    pub fn metric_of(&self, m: &crate::engine::train::EpochMetrics) -> f64 {
        match self.metric {
            Metric::ValAccuracy => m.val_accuracy,
            Metric::ValLoss => m.val_loss,
        }
    }
}

impl Asha {
    fn validate(&self) -> Result<(), SpecError> {
        if self.min_epochs == 0 {
            return Err(SpecError::new("asha.min_epochs", "must be at least 1"));
        }
        if self.max_epochs <= self.min_epochs || self.max_epochs > 10_000 {
            return Err(SpecError::new(
                "asha.max_epochs",
                format!(
                    "{} must be above min_epochs ({}) and at most 10000",
                    self.max_epochs, self.min_epochs
                ),
            ));
        }
        if self.eta < 2 {
            return Err(SpecError::new(
                "asha.eta",
                "the reduction factor must be at least 2",
            ));
        }
        let most = self.rungs(0).len() as u32;
        if self.brackets == 0 || self.brackets > most {
            return Err(SpecError::new(
                "asha.brackets",
                format!(
                    "{} is not in 1..={most} (the rungs from min to max epochs)",
                    self.brackets
                ),
            ));
        }
        Ok(())
    }

    /// The epochs of bracket `b`'s rungs: `min · η^(b+k)` below `max_epochs`, then
    /// `max_epochs` (a rung closer to it than a factor η is merged into it).
    pub fn rungs(&self, bracket: u32) -> Vec<u32> {
        let (eta, max) = (u64::from(self.eta), u64::from(self.max_epochs));
        let mut r = u64::from(self.min_epochs);
        for _ in 0..bracket {
            r = r.saturating_mul(eta);
        }
        let mut rungs = Vec::new();
        while r.saturating_mul(eta) <= max {
            rungs.push(r as u32);
            r *= eta;
        }
        rungs.push(self.max_epochs);
        rungs
    }
}

impl SearchSpec {
    /// The most epochs the search trains: ASHA's synchronous successive halving (each
    /// bracket's N trials to its first rung, ⌊N/ηᵏ⌋ of them on to rung k), or every trial
    /// to `epochs` (grid, random).
    pub fn budget_epochs(&self, epochs: u32) -> u64 {
        let total = u64::from(self.total_trials());
        let Algorithm::Asha(a) = self.algorithm else {
            return total * u64::from(epochs);
        };
        let brackets = u64::from(a.brackets.max(1));
        let mut sum = 0;
        for b in 0..brackets {
            let mut n = (0..total).filter(|i| i % brackets == b).count() as u64;
            let mut before = 0;
            for r in a.rungs(b as u32) {
                sum += n * u64::from(r - before);
                before = r;
                n /= u64::from(a.eta);
            }
        }
        sum
    }
}

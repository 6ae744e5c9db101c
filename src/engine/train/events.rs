//! What a training run reports while it runs, and how it is told to stop.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use super::checkpoint::Skipped;

/// A figure that may be NaN or infinite: JSON has no such numbers, so it is written as `null`
/// and read back as NaN (a diverged run's metrics are stored and served, never an error).
pub mod non_finite_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Per-epoch figures (also one line of the metrics JSONL file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    #[serde(with = "non_finite_as_null")]
    pub train_loss: f64,
    #[serde(with = "non_finite_as_null")]
    pub train_accuracy: f64,
    #[serde(with = "non_finite_as_null")]
    pub val_loss: f64,
    #[serde(with = "non_finite_as_null")]
    pub val_accuracy: f64,
    #[serde(with = "non_finite_as_null")]
    pub lr: f64,
    #[serde(with = "non_finite_as_null")]
    pub seconds: f64,
    #[serde(with = "non_finite_as_null")]
    pub images_per_sec: f64,
    /// Share of the epoch the step waited for the data loader.
    #[serde(with = "non_finite_as_null")]
    pub data_wait_fraction: f64,
    /// The epochs this run trains: the configured count, or what a time budget planned from
    /// the first epoch. 0 in files written before it was recorded.
    #[serde(default)]
    pub epochs_total: usize,
}

/// Figures at the end of a run (the last line of the metrics JSONL file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FinalMetrics {
    pub epochs_completed: usize,
    pub best_epoch: Option<usize>,
    pub best_val_accuracy: Option<f64>,
    /// Test accuracy of the best-by-validation model; absent without a test split.
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub train_seconds: f64,
    pub stopped_early: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub steps_per_epoch: usize,
    pub global_step: usize,
    pub total_steps: usize,
    #[serde(with = "non_finite_as_null")]
    pub loss: f64,
    #[serde(with = "non_finite_as_null")]
    pub accuracy: f64,
    #[serde(with = "non_finite_as_null")]
    pub lr: f64,
    #[serde(with = "non_finite_as_null")]
    pub images_per_sec: f64,
    #[serde(with = "non_finite_as_null")]
    pub eta_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TrainEvent {
    Started {
        resumed_from_step: usize,
        total_steps: usize,
        /// This attempt's TensorBoard event file.
        event_file: Option<PathBuf>,
    },
    Progress(Progress),
    Epoch(EpochMetrics),
    CheckpointSaved {
        /// An epoch's checkpoint, or the position of a run stopped mid-epoch.
        kind: SavedKind,
        path: PathBuf,
        epoch: usize,
        val_accuracy: Option<f64>,
        best: bool,
        /// Where the best model's copy was written, when this checkpoint is the best so far.
        copy: Option<PathBuf>,
        /// Time to serialise and write the file (fsync and rename included).
        seconds: f64,
    },
    /// A checkpoint failed verification (renamed to `*.corrupt`) and was passed over.
    CheckpointSkipped(Skipped),
    Finished(FinalMetrics),
}

/// What a saved checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SavedKind {
    /// The end of an epoch (`epoch-NNNN`): a checkpoint row, a model to serve.
    Epoch,
    /// Where a run stopped mid-epoch (`last`): what the job resumes from.
    Position,
}

/// Why a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Stopped on request; the last checkpoint resumes it.
    Interrupted,
    /// Stopped because the run belongs to someone else now ([`TrainObserver::may_write`]
    /// said no): nothing more was written.
    Abandoned,
}

/// Receives a run's events, and can stop it (checked between steps).
pub trait TrainObserver<B: burn::tensor::backend::AutodiffBackend> {
    fn event(&mut self, event: &TrainEvent);
    /// True when the run should checkpoint and stop.
    fn should_stop(&mut self) -> bool {
        false
    }
    /// Asked right before the run writes its files (metrics, checkpoints): false when the run
    /// is no longer this process's to write (another worker took the job over). The run then
    /// stops at once, writing nothing more.
    fn may_write(&mut self) -> bool {
        true
    }
    /// Called between optimiser steps with the current weights: a place to serve inference.
    fn between_steps(&mut self, _model: &crate::engine::model::Tlb<B>) {}
    /// Called between the micro-batches of a step and between evaluation batches: a place to
    /// serve inference too (it must not draw from burn's RNG outside `with_rng_lock`).
    fn between_batches(&mut self) {}
}

/// An observer that passes events to a closure and never stops the run.
pub struct FnObserver<F>(pub F);

impl<B: burn::tensor::backend::AutodiffBackend, F: FnMut(&TrainEvent)> TrainObserver<B>
    for FnObserver<F>
{
    fn event(&mut self, event: &TrainEvent) {
        (self.0)(event)
    }
}

/// Sends every event down a channel and stops the run when its cancel flag is raised: for a
/// program that trains on a thread of its own and follows the run from another. (The
/// server's job runner observes runs itself: `worker::job`.)
pub struct ChannelObserver {
    pub events: crossbeam_channel::Sender<TrainEvent>,
    pub cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<B: burn::tensor::backend::AutodiffBackend> TrainObserver<B> for ChannelObserver {
    fn event(&mut self, event: &TrainEvent) {
        // A closed receiver only means nobody is watching; training goes on.
        let _ = self.events.send(event.clone());
    }
    fn should_stop(&mut self) -> bool {
        self.cancel.load(std::sync::atomic::Ordering::Relaxed)
    }
}

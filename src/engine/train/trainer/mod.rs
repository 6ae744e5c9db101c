//! The training loop: AdamW steps over prefetched batches, per-epoch validation, atomic
//! checkpoints, exact resume, and the test figure of the best-by-validation model.
//!
//! [`train_run`] reads as the loop it is; its phases live beside it: `start` (resume or
//! start afresh, open the run's files), `epoch` (train an epoch, close it, save the position,
//! finish). Every write the run makes goes through one [`Gate`].

mod epoch;
mod start;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use super::checkpoint::{record_bytes, Checkpoint, CheckpointMeta, Pending};
use super::ckpt_dir::Start;
use super::config::TrainConfig;
use super::events::{FinalMetrics, Outcome, TrainEvent, TrainObserver};
use crate::engine::data::{mix64, Splits};
use crate::engine::model::Tlb;
use epoch::EpochEnd;
use start::RunState;

/// Trains `config` on `splits`, writing into `out`. With `resume`, continues from the newest
/// checkpoint in `out` (its weights, optimiser moments, position and RNG state), so the
/// result equals that of an uninterrupted run. `config.epochs` may be raised on resume.
pub fn train<B: AutodiffBackend>(
    config: &TrainConfig,
    splits: &Splits,
    out: &Path,
    device: &B::Device,
    resume: bool,
    observer: &mut dyn TrainObserver<B>,
) -> Result<(Outcome, FinalMetrics)> {
    let run = Run {
        dir: out.to_path_buf(),
        attempt: None,
        start: if resume { Start::Newest } else { Start::Fresh },
    };
    train_run(config, splits, &run, device, observer)
}

/// One run of a training: its directory, the attempt it is (tagging its checkpoint files;
/// `None` for a local run) and where it starts.
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    pub attempt: Option<u32>,
    pub start: Start,
}

/// Trains `config` on `splits` as `run` says; see [`train`].
pub fn train_run<B: AutodiffBackend>(
    config: &TrainConfig,
    splits: &Splits,
    run: &Run,
    device: &B::Device,
    observer: &mut dyn TrainObserver<B>,
) -> Result<(Outcome, FinalMetrics)> {
    let mut gate = Gate { observer };
    let mut s = start::resume_or_start(config, splits, run, device, &mut gate)?;
    match epochs(&mut s, &mut gate) {
        // The job is another worker's now: nothing more was written.
        Err(e) if e.is::<Abandoned>() => Ok((Outcome::Abandoned, partial(&s.meta, s.started))),
        Err(e) => {
            if let Some(tb) = &mut s.tb {
                tb.failed();
            }
            Err(e)
        }
        ended => ended,
    }
}

/// The run from its first write to its end.
fn epochs<B: AutodiffBackend, O: Optimizer<Tlb<B>, B>>(
    s: &mut RunState<'_, B, O>,
    gate: &mut Gate<'_, B>,
) -> Result<(Outcome, FinalMetrics)> {
    s.open_files(gate)?;
    s.restore_best(gate)?;
    gate.event(&TrainEvent::Started {
        resumed_from_step: s.meta.global_step,
        total_steps: s.total_steps,
        event_file: s.tb.as_ref().map(|tb| tb.path().to_path_buf()),
    });
    s.started = Instant::now();
    while s.meta.epoch < s.epochs {
        match s.train_epoch(gate)? {
            EpochEnd::Trained(epoch) => s.close_epoch(*epoch, gate)?,
            // Cancelled or shutting down: the exact position is saved to resume from.
            EpochEnd::Stopped => {
                s.save_position(gate)?;
                return Ok((Outcome::Interrupted, partial(&s.meta, s.started)));
            }
            // Out of its time budget: saved (to extend later), then tested as it is.
            EpochEnd::OutOfTime => {
                s.save_position(gate)?;
                return s.finish(true, gate);
            }
        }
    }
    s.finish(false, gate)
}

/// The run lost its job ([`TrainObserver::may_write`] said no): it stops without writing.
#[derive(Debug, thiserror::Error)]
#[error("the run no longer owns its job")]
struct Abandoned;

/// The one way out of the run to disk, and to the observer. Before every write (a metrics
/// line, a checkpoint taking its name) it asks whether the run may still write; when not, the
/// run stops with [`Abandoned`]. Checkpoint files are written under temp names first and
/// renamed into place only past the gate, so a run that lost its job (paused mid-write, say)
/// never shows a complete file under a checkpoint's name.
struct Gate<'a, B: AutodiffBackend> {
    observer: &'a mut dyn TrainObserver<B>,
}

impl<B: AutodiffBackend> Gate<'_, B> {
    /// Passes when the run may still write.
    fn check(&mut self) -> Result<()> {
        if self.observer.may_write() {
            Ok(())
        } else {
            Err(Abandoned.into())
        }
    }

    /// Renames files written under temp names into place, once the gate passes.
    fn commit(&mut self, files: impl IntoIterator<Item = Pending>) -> Result<()> {
        self.check()?;
        files.into_iter().try_for_each(Pending::commit)
    }

    fn event(&mut self, event: &TrainEvent) {
        self.observer.event(event);
    }
}

/// The dropout stream of one step.
fn step_seed(seed: u64, step: usize) -> u64 {
    mix64(seed ^ mix64(step as u64))
}

/// How far a run got when it stopped before its end.
fn partial(meta: &CheckpointMeta, started: Instant) -> FinalMetrics {
    FinalMetrics {
        epochs_completed: meta.epoch,
        best_epoch: meta.best_epoch,
        best_val_accuracy: meta.best_val_accuracy,
        test_accuracy: None,
        test_loss: None,
        train_seconds: started.elapsed().as_secs_f64(),
        stopped_early: true,
    }
}

fn snapshot<B: AutodiffBackend, O: Optimizer<Tlb<B>, B>>(
    model: &Tlb<B>,
    optim: &O,
    meta: &CheckpointMeta,
) -> Result<Checkpoint> {
    Ok(Checkpoint {
        meta: meta.clone(),
        model: record_bytes::<B, _>(model.clone().into_record())?,
        optimizer: record_bytes::<B, _>(optim.to_record())?,
    })
}

/// The sum of every gradient element: finite exactly when every gradient is (one read-back).
fn grad_sum<B: AutodiffBackend>(model: &Tlb<B>, grads: &GradientsParams) -> f64 {
    struct Sum<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        total: Option<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Sum<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                let s = g.sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    let mut sum = Sum::<B> { grads, total: None };
    model.visit(&mut sum);
    sum.total.map_or(0.0, |t| t.into_scalar().elem::<f64>())
}

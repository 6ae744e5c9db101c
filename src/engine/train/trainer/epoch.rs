//! One epoch of a run: its optimiser steps, its validation and its checkpoint; and the ends of
//! a run (its position saved, its test figure).

use std::time::Instant;

use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;

use super::super::checkpoint::write_pending;
use super::super::eval::{batch_tensors, evaluate};
use super::super::events::{EpochMetrics, FinalMetrics, Outcome, Progress, SavedKind, TrainEvent};
use super::super::step::step_grads_with;
use super::start::RunState;
use super::{grad_sum, snapshot, step_seed, Gate};
use crate::engine::data::{Batch, EpochPlan, Loader};
use crate::engine::model::Tlb;
use crate::engine::tensorboard::{attention_png, STEP_EVERY};

/// How an epoch's training ended.
pub(super) enum EpochEnd<B: AutodiffBackend> {
    /// Every step ran and the model was validated.
    Trained(Box<TrainedEpoch<B>>),
    /// The observer asked the run to stop (cancel, shutdown, a lost job).
    Stopped,
    /// The run's time budget (`max_minutes`) ran out.
    OutOfTime,
}

pub(super) struct TrainedEpoch<B: AutodiffBackend> {
    metrics: EpochMetrics,
    /// The weights as validated, kept when they are the best so far.
    valid: Tlb<B::InnerBackend>,
}

impl<B: AutodiffBackend, O: Optimizer<Tlb<B>, B>> RunState<'_, B, O> {
    /// Evaluation keeps no graph, so it can take larger batches than training.
    fn eval_batch(&self) -> usize {
        self.config.micro_batch_size().max(256)
    }

    /// Trains the current epoch from the position in `meta`, then validates it.
    pub fn train_epoch(&mut self, gate: &mut Gate<'_, B>) -> Result<EpochEnd<B>> {
        let config = self.config;
        let epoch = self.meta.epoch;
        let plan = EpochPlan {
            batch_size: config.batch_size,
            image_size: config.model.image_size,
            train: true,
            seed: config.seed,
            epoch: epoch as u64,
        };
        let mut loader = Loader::new(
            self.splits.train.clone(),
            plan,
            self.meta.step_in_epoch,
            config.data_workers,
            4,
        );
        let epoch_start = Instant::now();
        let (mut loss_sum, mut correct, mut seen, mut wait) = (0.0f64, 0usize, 0usize, 0.0f64);
        let mut lr = config.lr_at(self.meta.global_step, self.steps_per_epoch, self.epochs);
        loop {
            let t_wait = Instant::now();
            let Some(batch) = loader.next() else { break };
            wait += t_wait.elapsed().as_secs_f64();
            if gate.observer.should_stop() {
                return Ok(EpochEnd::Stopped);
            }
            if self
                .budget
                .is_some_and(|b| self.started.elapsed().as_secs_f64() > b)
            {
                return Ok(EpochEnd::OutOfTime);
            }
            lr = config.lr_at(self.meta.global_step, self.steps_per_epoch, self.epochs);
            let n = batch.len();
            let (step_loss, step_correct) = self.step(batch, lr, gate)?;
            loss_sum += step_loss;
            correct += step_correct;
            seen += n;
            let ips = seen as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9);
            let remaining = self.total_steps.saturating_sub(self.meta.global_step) as f64;
            let global_step = self.meta.global_step;
            if let Some(tb) = self
                .tb
                .as_mut()
                .filter(|_| global_step.is_multiple_of(STEP_EVERY))
            {
                let (loss, accuracy) = (step_loss / n as f64, step_correct as f64 / n as f64);
                tb.step(global_step as u64, loss, accuracy, lr, ips)?;
            }
            gate.event(&TrainEvent::Progress(Progress {
                epoch,
                step_in_epoch: self.meta.step_in_epoch,
                steps_per_epoch: self.steps_per_epoch,
                global_step: self.meta.global_step,
                total_steps: self.total_steps,
                loss: step_loss / n as f64,
                accuracy: step_correct as f64 / n as f64,
                lr,
                images_per_sec: ips,
                eta_seconds: remaining * config.batch_size as f64 / ips.max(1e-9),
            }));
            gate.observer.between_steps(self.model());
        }
        drop(loader);

        let valid = self.model().valid();
        let (val_loss, val_accuracy) = evaluate(
            &valid,
            &self.splits.val,
            config.model.image_size,
            self.eval_batch(),
            config.replicas.max(1),
            self.device,
            &mut || gate.observer.between_batches(),
        );
        if let (Some(budget), None, 0) = (self.budget, self.meta.planned_epochs, self.meta.epoch) {
            // The first epoch's time says how many fit the budget; the cosine schedule is
            // stretched or shrunk to end there (resumes keep the plan: it is in the meta).
            // (Reached only when this run started in epoch 0, so the clock timed that epoch.)
            self.epochs = config.epochs_within(budget, self.started.elapsed().as_secs_f64());
            self.meta.planned_epochs = Some(self.epochs);
            self.total_steps = self.steps_per_epoch * self.epochs;
        }
        let seconds = epoch_start.elapsed().as_secs_f64();
        let metrics = EpochMetrics {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            val_loss,
            val_accuracy,
            lr,
            seconds,
            images_per_sec: seen as f64 / seconds.max(1e-9),
            data_wait_fraction: wait / seconds.max(1e-9),
            epochs_total: self.epochs,
        };
        Ok(EpochEnd::Trained(Box::new(TrainedEpoch { metrics, valid })))
    }

    /// One optimiser step on `batch`; its summed loss and correct count. A non-finite loss or
    /// gradient stops the run instead of training on it.
    fn step(&mut self, batch: Batch, lr: f64, gate: &mut Gate<'_, B>) -> Result<(f64, usize)> {
        let config = self.config;
        let (images, labels) = batch_tensors::<B>(batch, self.device);
        let step = step_grads_with(
            self.model(),
            images,
            labels,
            config.replicas.max(1),
            config.micro_batch_size(),
            config.label_smoothing,
            step_seed(config.seed, self.meta.global_step),
            &mut || gate.observer.between_batches(),
        );
        let diverged = if !step.loss_sum.is_finite() {
            Some(("loss", step.loss_sum))
        } else {
            Some(("gradient", grad_sum(self.model(), &step.grads))).filter(|(_, g)| !g.is_finite())
        };
        if let Some((what, value)) = diverged {
            bail!(
                "{what} became {} at epoch {}, step {} (global step {}); the run stops \
                 instead of training on it (lower the learning rate, or resume from an \
                 earlier checkpoint)",
                if value.is_nan() { "NaN" } else { "infinite" },
                self.meta.epoch + 1,
                self.meta.step_in_epoch + 1,
                self.meta.global_step + 1
            );
        }
        let (loss, correct) = (step.loss_sum, step.correct);
        // Moved through the optimiser, not cloned: it updates parameters it holds alone in
        // place.
        let model = self.model.take().expect("the run's model");
        self.model = Some(self.optim.step(lr, model, step.grads));
        self.meta.global_step += 1;
        self.meta.step_in_epoch += 1;
        Ok((loss, correct))
    }

    /// Records the epoch (its metrics line and event), keeps the best model, and writes the
    /// epoch's checkpoint (and the best copy) through the gate.
    pub fn close_epoch(&mut self, epoch: TrainedEpoch<B>, gate: &mut Gate<'_, B>) -> Result<()> {
        let TrainedEpoch { metrics, valid } = epoch;
        let val_accuracy = metrics.val_accuracy;
        gate.check()?;
        self.files.append_epoch(self.run.attempt, &metrics)?;
        if let Some(tb) = &mut self.tb {
            let picture = attention_png(&valid, &self.splits.val, &self.config.model, self.device);
            tb.epoch(self.meta.global_step as u64, &metrics, picture)?;
        }
        gate.event(&TrainEvent::Epoch(metrics));
        let meta = &mut self.meta;
        meta.epoch += 1;
        meta.step_in_epoch = 0;
        meta.val_accuracy = Some(val_accuracy);
        let is_best = meta.best_val_accuracy.is_none_or(|b| val_accuracy > b);
        if is_best {
            meta.best_val_accuracy = Some(val_accuracy);
            meta.best_epoch = Some(meta.epoch);
            self.best_model = Some(valid);
        }
        let written = Instant::now();
        let bytes = snapshot(self.model(), &self.optim, &self.meta)?.encode()?;
        let path = self.ckpts.epoch_path(self.meta.epoch);
        let copy = is_best.then(|| self.ckpts.best_path());
        let mut files = vec![write_pending(&path, &bytes)?];
        if let Some(copy) = &copy {
            files.push(write_pending(copy, &bytes)?);
        }
        gate.commit(files)?;
        let seconds = written.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(self.ckpts.interrupted_path());
        self.ckpts.prune(self.config.keep_last);
        gate.event(&TrainEvent::CheckpointSaved {
            kind: SavedKind::Epoch,
            path,
            epoch: self.meta.epoch,
            val_accuracy: Some(val_accuracy),
            best: is_best,
            copy,
            seconds,
        });
        Ok(())
    }

    /// Saves the exact position mid-epoch (`last.ckpt`), so that the run can be resumed or
    /// extended later.
    pub fn save_position(&mut self, gate: &mut Gate<'_, B>) -> Result<()> {
        gate.check()?;
        let path = self.ckpts.interrupted_path();
        let written = Instant::now();
        let file = write_pending(
            &path,
            &snapshot(self.model(), &self.optim, &self.meta)?.encode()?,
        )?;
        gate.commit([file])?;
        gate.event(&TrainEvent::CheckpointSaved {
            kind: SavedKind::Position,
            path,
            epoch: self.meta.epoch,
            val_accuracy: self.meta.val_accuracy,
            best: false,
            copy: None,
            seconds: written.elapsed().as_secs_f64(),
        });
        Ok(())
    }

    /// Tests the best-by-validation model and records the run's summary.
    pub fn finish(
        &mut self,
        stopped_early: bool,
        gate: &mut Gate<'_, B>,
    ) -> Result<(Outcome, FinalMetrics)> {
        let best = self
            .best_model
            .take()
            .unwrap_or_else(|| self.model().valid());
        let test = self.splits.test.as_ref().map(|t| {
            evaluate(
                &best,
                t,
                self.config.model.image_size,
                self.eval_batch(),
                self.config.replicas.max(1),
                self.device,
                &mut || gate.observer.between_batches(),
            )
        });
        let summary = FinalMetrics {
            epochs_completed: self.meta.epoch,
            best_epoch: self.meta.best_epoch,
            best_val_accuracy: self.meta.best_val_accuracy,
            test_accuracy: test.map(|t| t.1),
            test_loss: test.map(|t| t.0),
            train_seconds: self.started.elapsed().as_secs_f64(),
            stopped_early,
        };
        gate.check()?;
        self.files.append_metrics(&summary)?;
        if let Some(tb) = &mut self.tb {
            tb.finish(self.meta.global_step as u64, &summary)?;
        }
        gate.event(&TrainEvent::Finished(summary.clone()));
        Ok((Outcome::Completed, summary))
    }
}

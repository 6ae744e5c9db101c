//! The training loop: AdamW steps over prefetched batches, per-epoch validation, atomic
//! checkpoints, exact resume, and the test figure of the best-by-validation model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use super::checkpoint::{
    load_record, record_bytes, write_json, write_pending, Checkpoint, CheckpointMeta,
};
use super::ckpt_dir::{Resume, Start};
use super::config::TrainConfig;
use super::eval::{batch_tensors, evaluate};
use super::events::{EpochMetrics, FinalMetrics, Outcome, Progress, TrainEvent, TrainObserver};
use super::run_dir::RunDir;
use super::step::step_grads_with;
use crate::engine::data::{mix64, EpochPlan, Loader, Splits};
use crate::engine::model::Tlb;

/// The dropout stream of one step.
fn step_seed(seed: u64, step: usize) -> u64 {
    mix64(seed ^ mix64(step as u64))
}

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
    let out = run.dir.as_path();
    let resume = run.start.resumes();
    config.validate()?;
    let classes = splits.class_names().len();
    if config.model.num_classes != classes {
        bail!(
            "model.num_classes is {} but the dataset has {classes} classes",
            config.model.num_classes
        );
    }
    if splits.train.is_empty() || splits.val.is_empty() {
        bail!("the dataset needs at least one training and one validation image");
    }
    let run_files = RunDir(out.to_path_buf());
    let ckpts = run_files.checkpoints(run.attempt);
    std::fs::create_dir_all(&ckpts.dir)
        .with_context(|| format!("creating {}", ckpts.dir.display()))?;

    // Initial weights come from the run's seed too.
    B::seed(device, mix64(config.seed));
    let mut model: Tlb<B> = config.model.init(device)?.with_precision(config.precision);
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay as f32)
        .with_epsilon(1e-7)
        .init::<B, Tlb<B>>();
    let mut meta = CheckpointMeta {
        config: config.clone(),
        class_names: splits.class_names().to_vec(),
        epoch: 0,
        step_in_epoch: 0,
        global_step: 0,
        val_accuracy: None,
        best_val_accuracy: None,
        best_epoch: None,
        planned_epochs: None,
    };
    let Resume {
        checkpoint: latest,
        mut skipped,
    } = match &run.start {
        Start::Fresh => Resume::default(),
        Start::Newest => ckpts.latest(),
        Start::From { newest_first, best } => Resume::newest_of(newest_first, best),
    };
    for s in &skipped {
        observer.event(&TrainEvent::CheckpointSkipped(s.clone()));
    }
    if latest.is_none() && !skipped.is_empty() {
        bail!(
            "no intact checkpoint to resume from: {} failed verification (newest: {}: {})",
            skipped.len(),
            skipped[0].path.display(),
            skipped[0].reason
        );
    }
    if let Some(ckpt) = latest {
        let mut saved = ckpt.meta.config.clone();
        // How long and on how many threads a run goes may change; the recipe may not.
        (saved.epochs, saved.max_minutes, saved.replicas) =
            (config.epochs, config.max_minutes, config.replicas);
        if &saved != config {
            bail!(
                "cannot resume: the checkpoint in {} was trained with another config",
                out.display()
            );
        }
        model = model.load_record(load_record::<B, _>(ckpt.model, device)?);
        optim = optim.load_record(load_record::<B, _>(ckpt.optimizer, device)?);
        meta = CheckpointMeta {
            config: config.clone(),
            ..ckpt.meta
        };
    } else if !resume {
        // A fresh run in a used directory must not mix with an older run's files.
        for (_, p) in ckpts.epochs() {
            std::fs::remove_file(p)?;
        }
        for p in [
            ckpts.best_path(),
            ckpts.interrupted_path(),
            run_files.metrics_path(),
        ] {
            let _ = std::fs::remove_file(p);
        }
    }
    if !observer.may_write() {
        return Ok(abandoned(&meta, Instant::now()));
    }
    run_files.start_metrics(run.attempt, meta.epoch)?;
    write_json(&out.join("config.json"), config)?;

    let micro = config.micro_batch_size();
    // Evaluation keeps no graph, so it can take larger batches than training.
    let eval_batch = micro.max(256);
    let steps_per_epoch = splits.train.len().div_ceil(config.batch_size);
    let budget = (config.max_minutes > 0.0).then_some(config.max_minutes * 60.0);
    // Epochs this run trains: re-planned once under a time budget (after the first epoch).
    let mut epochs = match (budget, meta.planned_epochs) {
        (Some(_), Some(planned)) => planned.min(config.epochs),
        _ => config.epochs,
    };
    let mut total_steps = steps_per_epoch * epochs;
    let image_size = config.model.image_size;
    // The best model so far, as of the checkpoint resumed from (`best.ckpt` may be newer when
    // a newer checkpoint was corrupt, or be corrupt itself: then the epoch file serves).
    let reported = skipped.len();
    let best = meta
        .best_epoch
        .and_then(|e| ckpts.best_of(&ckpts.best_candidates(&run.start, e), e, &mut skipped));
    for s in &skipped[reported..] {
        observer.event(&TrainEvent::CheckpointSkipped(s.clone()));
    }
    let mut best_model = match best {
        Some(ckpt) => Some(ckpt.into_model::<B::InnerBackend>(device)?),
        None => {
            // Nothing intact holds it: the best is chosen afresh from here on.
            (meta.best_epoch, meta.best_val_accuracy) = (None, None);
            None
        }
    };
    observer.event(&TrainEvent::Started {
        resumed_from_step: meta.global_step,
        total_steps,
    });

    let started = Instant::now();
    let mut outcome = Outcome::Completed;
    let mut stopped_early = false;
    'epochs: while meta.epoch < epochs {
        let epoch = meta.epoch;
        let plan = EpochPlan {
            batch_size: config.batch_size,
            image_size,
            train: true,
            seed: config.seed,
            epoch: epoch as u64,
        };
        let mut loader = Loader::new(
            splits.train.clone(),
            plan,
            meta.step_in_epoch,
            config.data_workers,
            4,
        );
        let epoch_start = Instant::now();
        let (mut loss_sum, mut correct, mut seen, mut wait) = (0.0f64, 0usize, 0usize, 0.0f64);
        let mut lr = config.lr_at(meta.global_step, steps_per_epoch, epochs);
        loop {
            let t_wait = Instant::now();
            let Some(batch) = loader.next() else { break };
            wait += t_wait.elapsed().as_secs_f64();
            if observer.should_stop() {
                outcome = Outcome::Interrupted;
                break 'epochs;
            }
            if budget.is_some_and(|b| started.elapsed().as_secs_f64() > b) {
                stopped_early = true;
                break 'epochs;
            }
            lr = config.lr_at(meta.global_step, steps_per_epoch, epochs);
            let n = batch.len();
            let (images, labels) = batch_tensors::<B>(batch, device);
            let step = step_grads_with(
                &model,
                images,
                labels,
                config.replicas.max(1),
                micro,
                config.label_smoothing,
                step_seed(config.seed, meta.global_step),
                &mut || observer.between_batches(),
            );
            let (step_loss, step_correct) = (step.loss_sum, step.correct);
            let diverged = if !step_loss.is_finite() {
                Some(("loss", step_loss))
            } else {
                Some(("gradient", grad_sum(&model, &step.grads))).filter(|(_, g)| !g.is_finite())
            };
            if let Some((what, value)) = diverged {
                bail!(
                    "{what} became {} at epoch {}, step {} (global step {}); the run stops \
                     instead of training on it (lower the learning rate, or resume from an \
                     earlier checkpoint)",
                    if value.is_nan() { "NaN" } else { "infinite" },
                    epoch + 1,
                    meta.step_in_epoch + 1,
                    meta.global_step + 1
                );
            }
            model = optim.step(lr, model, step.grads);
            meta.global_step += 1;
            meta.step_in_epoch += 1;
            loss_sum += step_loss;
            correct += step_correct;
            seen += n;
            let elapsed = epoch_start.elapsed().as_secs_f64();
            let ips = seen as f64 / elapsed.max(1e-9);
            let remaining = total_steps.saturating_sub(meta.global_step) as f64;
            observer.event(&TrainEvent::Progress(Progress {
                epoch,
                step_in_epoch: meta.step_in_epoch,
                steps_per_epoch,
                global_step: meta.global_step,
                total_steps,
                loss: step_loss / n as f64,
                accuracy: step_correct as f64 / n as f64,
                lr,
                images_per_sec: ips,
                eta_seconds: remaining * config.batch_size as f64 / ips.max(1e-9),
            }));
            observer.between_steps(&model);
        }
        drop(loader);

        let valid = model.valid();
        let (val_loss, val_accuracy) = evaluate(
            &valid,
            &splits.val,
            image_size,
            eval_batch,
            config.replicas.max(1),
            device,
            &mut || observer.between_batches(),
        );
        if let (Some(budget), None, 0) = (budget, meta.planned_epochs, meta.epoch) {
            // The first epoch's time says how many fit the budget; the cosine schedule is
            // stretched or shrunk to end there (resumes keep the plan: it is in the meta).
            // (Reached only when this run started in epoch 0, so the clock timed that epoch.)
            epochs = config.epochs_within(budget, started.elapsed().as_secs_f64());
            meta.planned_epochs = Some(epochs);
            total_steps = steps_per_epoch * epochs;
        }
        let metrics = EpochMetrics {
            epoch: epoch + 1,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            val_loss,
            val_accuracy,
            lr,
            seconds: epoch_start.elapsed().as_secs_f64(),
            images_per_sec: seen as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9),
            data_wait_fraction: wait / epoch_start.elapsed().as_secs_f64().max(1e-9),
            epochs_total: epochs,
        };
        if !observer.may_write() {
            return Ok(abandoned(&meta, started));
        }
        run_files.append_epoch(run.attempt, &metrics)?;
        observer.event(&TrainEvent::Epoch(metrics));
        meta.epoch += 1;
        meta.step_in_epoch = 0;
        meta.val_accuracy = Some(val_accuracy);
        let is_best = meta.best_val_accuracy.is_none_or(|b| val_accuracy > b);
        if is_best {
            meta.best_val_accuracy = Some(val_accuracy);
            meta.best_epoch = Some(meta.epoch);
            best_model = Some(valid);
        }
        let written = Instant::now();
        let ckpt = snapshot(&model, &optim, &meta)?;
        let path = ckpts.epoch_path(meta.epoch);
        let bytes = ckpt.encode()?;
        // The epoch file and the best copy (the same bytes) are written under temp names
        // and renamed into place only once they are known to count: a worker that lost the
        // job meanwhile (paused in the write, say) never shows a complete file under a
        // checkpoint's name; its temp files go, and from the check on it writes nothing.
        let epoch_file = write_pending(&path, &bytes)?;
        let copy = is_best.then(|| ckpts.best_path());
        let pending = copy
            .as_deref()
            .map(|c| write_pending(c, &bytes))
            .transpose()?;
        if !observer.may_write() {
            return Ok(abandoned(&meta, started));
        }
        epoch_file.commit()?;
        let seconds = written.elapsed().as_secs_f64();
        if let Some(pending) = pending {
            pending.commit()?;
        }
        let _ = std::fs::remove_file(ckpts.interrupted_path());
        ckpts.prune(config.keep_last);
        observer.event(&TrainEvent::CheckpointSaved {
            path,
            epoch: meta.epoch,
            val_accuracy: Some(val_accuracy),
            best: is_best,
            copy,
            seconds,
        });
    }

    if (outcome == Outcome::Interrupted || stopped_early) && !observer.may_write() {
        return Ok(abandoned(&meta, started));
    }
    if outcome == Outcome::Interrupted || stopped_early {
        // Keep the exact position so the run can be resumed (or extended) later.
        let path = ckpts.interrupted_path();
        let written = Instant::now();
        let file = write_pending(&path, &snapshot(&model, &optim, &meta)?.encode()?)?;
        if !observer.may_write() {
            return Ok(abandoned(&meta, started));
        }
        file.commit()?;
        observer.event(&TrainEvent::CheckpointSaved {
            path,
            epoch: meta.epoch,
            val_accuracy: meta.val_accuracy,
            best: false,
            copy: None,
            seconds: written.elapsed().as_secs_f64(),
        });
        if outcome == Outcome::Interrupted {
            return Ok((outcome, partial(&meta, started)));
        }
    }

    let best = best_model.unwrap_or_else(|| model.valid());
    let test = splits.test.as_ref().map(|t| {
        evaluate(
            &best,
            t,
            image_size,
            eval_batch,
            config.replicas.max(1),
            device,
            &mut || observer.between_batches(),
        )
    });
    let summary = FinalMetrics {
        epochs_completed: meta.epoch,
        best_epoch: meta.best_epoch,
        best_val_accuracy: meta.best_val_accuracy,
        test_accuracy: test.map(|t| t.1),
        test_loss: test.map(|t| t.0),
        train_seconds: started.elapsed().as_secs_f64(),
        stopped_early,
    };
    if !observer.may_write() {
        return Ok(abandoned(&meta, started));
    }
    run_files.append_metrics(&summary)?;
    observer.event(&TrainEvent::Finished(summary.clone()));
    Ok((Outcome::Completed, summary))
}

/// How far a run got when it was abandoned.
fn abandoned(meta: &CheckpointMeta, started: Instant) -> (Outcome, FinalMetrics) {
    (Outcome::Abandoned, partial(meta, started))
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

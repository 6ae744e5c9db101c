//! Where a run starts: the newest intact checkpoint it may resume from (or a fresh model in a
//! clean directory), the run's files opened, and the best model so far restored.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;

use super::super::adamw::adamw;
use super::super::checkpoint::{load_record, write_json, Checkpoint, CheckpointMeta};
use super::super::ckpt_dir::{CheckpointDir, Resume, Start};
use super::super::config::TrainConfig;
use super::super::events::TrainEvent;
use super::super::run_dir::RunDir;
use super::super::Skipped;
use super::{Gate, Run};
use crate::engine::data::{mix64, Splits};
use crate::engine::model::{with_rng_lock, Tlb};
use crate::engine::tensorboard::{event_files, RunLog};

/// Everything a run carries from epoch to epoch.
pub(super) struct RunState<'r, B: AutodiffBackend, O> {
    pub config: &'r TrainConfig,
    pub splits: &'r Splits,
    pub run: &'r Run,
    pub device: &'r B::Device,
    pub files: RunDir,
    pub ckpts: CheckpointDir,
    /// The weights being trained (always there; an `Option` so that a step can move them
    /// through the optimiser).
    pub model: Option<Tlb<B>>,
    pub optim: O,
    /// Where the run is (epoch, step, best so far): what a checkpoint records.
    pub meta: CheckpointMeta,
    /// The best-by-validation model so far.
    pub best_model: Option<Tlb<B::InnerBackend>>,
    /// Checkpoints passed over on the way in (already reported).
    skipped: Vec<Skipped>,
    /// Epochs this run trains: re-planned once under a time budget (after the first epoch).
    pub epochs: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
    /// `max_minutes` in seconds, when set.
    pub budget: Option<f64>,
    pub started: Instant,
    /// This attempt's TensorBoard event file, once the run's files are open.
    pub tb: Option<RunLog>,
}

/// The model, optimiser and position the run starts from: the newest intact checkpoint
/// `run.start` names (its recipe must be the config's), or a fresh model; a fresh run in a
/// used directory first removes the older run's files.
pub(super) fn resume_or_start<'r, B: AutodiffBackend>(
    config: &'r TrainConfig,
    splits: &'r Splits,
    run: &'r Run,
    device: &'r B::Device,
    gate: &mut Gate<'_, B>,
) -> Result<RunState<'r, B, impl Optimizer<Tlb<B>, B>>> {
    check(config, splits)?;
    let files = RunDir(run.dir.clone());
    let ckpts = files.checkpoints(run.attempt);
    std::fs::create_dir_all(&ckpts.dir)
        .with_context(|| format!("creating {}", ckpts.dir.display()))?;
    // Initial weights come from the run's seed too, drawn while no other thread (another
    // job, a model being loaded) draws from burn's process-wide RNG.
    let model = with_rng_lock(|| {
        B::seed(device, mix64(config.seed));
        config.model.init::<B>(device)
    })?;
    let mut model: Tlb<B> = model.with_precision(config.precision);
    let mut optim = adamw::<B, Tlb<B>>(config.weight_decay as f32, 1e-7);
    let mut meta = CheckpointMeta::start(config.clone(), splits.class_names().to_vec());
    let (latest, skipped) = newest_intact(run, &ckpts, gate)?;
    if let Some(ckpt) = latest {
        let mut saved = ckpt.meta.config.clone();
        // How long and on how many threads a run goes may change; the recipe may not.
        (saved.epochs, saved.max_minutes, saved.replicas) =
            (config.epochs, config.max_minutes, config.replicas);
        if &saved != config {
            bail!(
                "cannot resume: the checkpoint in {} was trained with another config",
                run.dir.display()
            );
        }
        model = model.load_record(load_record::<B, _>(ckpt.model, device)?);
        optim = optim.load_record(load_record::<B, _>(ckpt.optimizer, device)?);
        meta = CheckpointMeta {
            config: config.clone(),
            ..ckpt.meta
        };
    } else if !run.start.resumes() {
        remove_older_run(&ckpts, &files)?;
    }
    let steps_per_epoch = splits.train.len().div_ceil(config.batch_size);
    let budget = (config.max_minutes > 0.0).then_some(config.max_minutes * 60.0);
    let epochs = match (budget, meta.planned_epochs) {
        (Some(_), Some(planned)) => planned.min(config.epochs),
        _ => config.epochs,
    };
    Ok(RunState {
        config,
        splits,
        run,
        device,
        files,
        ckpts,
        model: Some(model),
        optim,
        meta,
        best_model: None,
        skipped,
        epochs,
        steps_per_epoch,
        total_steps: steps_per_epoch * epochs,
        budget,
        started: Instant::now(),
        tb: None,
    })
}

/// The newest intact checkpoint `run.start` names, and those passed over on the way
/// (reported to the observer); none intact where some were tried is an error.
fn newest_intact<B: AutodiffBackend>(
    run: &Run,
    ckpts: &CheckpointDir,
    gate: &mut Gate<'_, B>,
) -> Result<(Option<Checkpoint>, Vec<Skipped>)> {
    let Resume {
        checkpoint: latest,
        skipped,
    } = match &run.start {
        Start::Fresh => Resume::default(),
        Start::Newest => ckpts.latest(),
        Start::From { newest_first, best } => Resume::newest_of(newest_first, best),
    };
    for s in &skipped {
        gate.event(&TrainEvent::CheckpointSkipped(s.clone()));
    }
    if latest.is_none() && !skipped.is_empty() {
        bail!(
            "no intact checkpoint to resume from: {} failed verification (newest: {}: {})",
            skipped.len(),
            skipped[0].path.display(),
            skipped[0].reason
        );
    }
    Ok((latest, skipped))
}

/// A fresh run in a used directory must not mix with an older run's files.
fn remove_older_run(ckpts: &CheckpointDir, files: &RunDir) -> Result<()> {
    for (_, p) in ckpts.epochs() {
        std::fs::remove_file(p)?;
    }
    for p in [
        ckpts.best_path(),
        ckpts.interrupted_path(),
        files.metrics_path(),
    ]
    .into_iter()
    .chain(event_files(&files.0))
    {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// What a run needs before it starts: a valid recipe for the dataset it is given.
fn check(config: &TrainConfig, splits: &Splits) -> Result<()> {
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
    Ok(())
}

impl<B: AutodiffBackend, O> RunState<'_, B, O> {
    pub fn model(&self) -> &Tlb<B> {
        self.model.as_ref().expect("the run's model")
    }

    /// The run's first writes: where this attempt starts in `metrics.jsonl`, the config, and
    /// the attempt's TensorBoard event file.
    pub fn open_files(&mut self, gate: &mut Gate<'_, B>) -> Result<()> {
        gate.check()?;
        self.files
            .start_metrics(self.run.attempt, self.meta.epoch)?;
        write_json(&self.run.dir.join("config.json"), self.config)?;
        let suffix = self
            .run
            .attempt
            .map_or_else(|| "local".to_string(), |a| format!("attempt-{a}"));
        let step = self.meta.global_step as u64;
        self.tb = Some(RunLog::open(&self.run.dir, &suffix, step, self.config)?);
        Ok(())
    }

    /// The best model so far, as of the checkpoint resumed from (`best.ckpt` may be newer
    /// when a newer checkpoint was corrupt, or be corrupt itself: then the epoch file
    /// serves). With nothing intact holding it, the best is chosen afresh from here on.
    pub fn restore_best(&mut self, gate: &mut Gate<'_, B>) -> Result<()> {
        let reported = self.skipped.len();
        let best = self.meta.best_epoch.and_then(|e| {
            let candidates = self.ckpts.best_candidates(&self.run.start, e);
            self.ckpts.best_of(&candidates, e, &mut self.skipped)
        });
        for s in &self.skipped[reported..] {
            gate.event(&TrainEvent::CheckpointSkipped(s.clone()));
        }
        self.best_model = match best {
            Some(ckpt) => Some(ckpt.into_model::<B::InnerBackend>(self.device)?),
            None => {
                (self.meta.best_epoch, self.meta.best_val_accuracy) = (None, None);
                None
            }
        };
        Ok(())
    }
}

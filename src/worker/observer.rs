//! What a training job's run reports to, on the worker: progress and epochs to watchers,
//! checkpoints and epochs to the store (fenced, retried while the store refuses), inference
//! answered between steps, and when to stop (cancel, shutdown, a lost lease).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use crossbeam_channel::Receiver;
use tracing::{error, warn};
use uuid::Uuid;

use super::inference::Serve;
use super::lease::Lease;
use super::{JobUpdate, Request, WorkerContext};
use crate::engine::model::Tlb;
use crate::engine::train::{
    CheckpointDir, EpochMetrics, SavedKind, TrainEvent, TrainObserver, CORRUPT_SUFFIX,
};
use crate::metrics::metrics;
use crate::store::{now_ms, CheckpointRow, Fence, StoreError, StoreResult};

/// How often progress goes out to watchers at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Tells the job's owner something that does not stop it: a WARN line, a JobWarning to
/// watchers, and the job's warnings in the store (GetJob).
pub(super) fn job_warning(ctx: &WorkerContext, fence: Fence, message: &str) {
    warn!(job = %fence.job, "{message}");
    ctx.publish(fence.job, JobUpdate::Warning(message.to_string()));
    if let Err(e) = ctx.runtime.block_on(ctx.store.add_warning(fence, message)) {
        error!(error = %format!("{e:#}"), "recording a job warning");
    }
}

/// How a fenced write that was retried ended.
pub(super) enum Retried<T> {
    Written(T),
    /// The job is another attempt's now.
    Lost,
    /// The server is stopping; the write was not made.
    Stopped,
}

/// Runs a fenced store write, and again every [`RETRY_EVERY`] while the store refuses it or
/// cannot be reached (answering inference meanwhile), until it is written, the job is
/// another attempt's, or the server stops.
pub(super) fn retry_fenced<T>(
    ctx: &WorkerContext,
    inference: &mut dyn Serve,
    rx: &Receiver<Request>,
    what: &str,
    write: impl Fn() -> StoreResult<T>,
) -> Retried<T> {
    loop {
        match write() {
            Ok(value) => return Retried::Written(value),
            Err(e) if e.is_lease_lost() => return Retried::Lost,
            Err(e) => error!(error = %format!("{e:#}"), "{what}; retrying"),
        }
        if !wait_serving(ctx, inference, rx, RETRY_EVERY) {
            return Retried::Stopped;
        }
    }
}

/// The longest pause between two tries of an upload to the artifact store.
const MAX_PUBLISH_PAUSE: Duration = Duration::from_secs(30);

/// How often a fenced write that the store refused is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Waits `pause`, answering inference meanwhile; false (at once) when the server stops.
fn wait_serving(
    ctx: &WorkerContext,
    inference: &mut dyn Serve,
    rx: &Receiver<Request>,
    pause: Duration,
) -> bool {
    let until = Instant::now() + pause;
    while Instant::now() < until {
        if ctx.stop.load(Ordering::SeqCst) {
            return false;
        }
        if let Ok(first) = rx.recv_timeout(Duration::from_millis(100)) {
            inference.serve_with(first, rx);
        }
    }
    !ctx.stop.load(Ordering::SeqCst)
}

pub(super) struct JobObserver<'a, B: AutodiffBackend> {
    ctx: &'a WorkerContext,
    job: Uuid,
    lease: &'a Lease,
    cancel: Arc<AtomicBool>,
    inference: &'a mut dyn Serve,
    rx: &'a Receiver<Request>,
    last_progress: Option<Instant>,
    /// An epoch whose metrics the store has not recorded yet.
    unrecorded: Option<EpochMetrics>,
    /// A checkpoint was left uncommitted because it could not be stored.
    unpublished: bool,
    /// Since when the device has been training without a break for inference.
    train_since: Instant,
    /// `tlb_device_busy_seconds_total{work="train"}` and `tlb_train_images_per_second` of
    /// this device.
    train_busy: prometheus::Counter,
    train_speed: prometheus::Gauge,
    /// The run's checkpoints and how many epoch files it keeps: the artifact store is
    /// pruned like the disk.
    pruning: Option<(CheckpointDir, usize)>,
    /// A search's trial stops at this epoch to wait for a promotion.
    pause_at: Option<u32>,
    /// It reached `pause_at` (its epoch recorded): the run stops there.
    pub(super) paused: bool,
    /// The attempt's TensorBoard event file, copied to the artifact store as it grows.
    event_file: Option<PathBuf>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> TrainObserver<B> for JobObserver<'_, B> {
    fn event(&mut self, event: &TrainEvent) {
        let ctx = self.ctx;
        match event {
            TrainEvent::Progress(p) => {
                self.lease.set_progress(p);
                self.train_speed.set(p.images_per_sec);
                self.count_train_time();
                let due = self
                    .last_progress
                    .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
                if due || p.step_in_epoch == p.steps_per_epoch {
                    self.last_progress = Some(Instant::now());
                    ctx.publish(self.job, JobUpdate::Progress(p.clone()));
                }
            }
            TrainEvent::Epoch(m) => {
                self.unrecorded = Some(m.clone());
                self.record_epoch();
                self.publish_log();
            }
            // A checkpoint of an epoch the store has not recorded would let a resume skip
            // that epoch's record: it stays uncommitted (the job resumes before it).
            TrainEvent::CheckpointSaved { .. } if self.unrecorded.is_some() => {}
            TrainEvent::CheckpointSaved {
                kind,
                path,
                epoch,
                val_accuracy,
                best,
                copy,
                seconds,
            } => {
                metrics().checkpoint_write_seconds.observe(*seconds);
                // Every replica can read what the store commits: the files go to the
                // artifact store first.
                if !self.publish([Some(path), copy.as_ref()].into_iter().flatten()) {
                    self.unpublished = true;
                    return;
                }
                if *kind == SavedKind::Position {
                    // Written mid-epoch: the job resumes from it.
                    let commit = ctx.store.commit_resume_point(self.lease.fence, path);
                    if let Err(e) = ctx.runtime.block_on(commit) {
                        self.write_failed(e, "recording a checkpoint");
                    }
                    return;
                }
                let row = CheckpointRow {
                    id: Uuid::new_v4(),
                    job_id: self.job,
                    epoch: *epoch as u32,
                    val_accuracy: *val_accuracy,
                    path: path.clone(),
                    is_best: *best,
                    created_at_ms: now_ms(),
                    copy_path: copy.clone(),
                };
                let fence = self.lease.fence;
                match ctx
                    .runtime
                    .block_on(ctx.store.record_checkpoint(fence, &row))
                {
                    Ok(()) => {
                        ctx.publish(self.job, JobUpdate::Checkpoint(row));
                        self.prune_store();
                    }
                    Err(e) => self.write_failed(e, "recording a checkpoint"),
                }
            }
            TrainEvent::CheckpointSkipped(skipped) => {
                // The reason starts with the file's path.
                let message = format!(
                    "a checkpoint failed verification and was skipped for an older one \
                     (renamed to *{CORRUPT_SUFFIX}): {}",
                    skipped.reason
                );
                job_warning(ctx, self.lease.fence, &message);
            }
            TrainEvent::Started { event_file, .. } => self.event_file = event_file.clone(),
            TrainEvent::Finished(_) => self.publish_log(),
        }
    }

    fn should_stop(&mut self) -> bool {
        self.paused
            || self.cancel.load(Ordering::SeqCst)
            || self.ctx.stop.load(Ordering::SeqCst)
            || self.lease.lost()
    }

    fn may_write(&mut self) -> bool {
        self.lease.still_owned()
    }

    fn between_steps(&mut self, _model: &Tlb<B>) {
        self.serve_inference();
    }

    fn between_batches(&mut self) {
        self.serve_inference();
    }
}

impl<'a, B: AutodiffBackend> JobObserver<'a, B> {
    /// The observer of job `job`'s run on the device `label` names.
    pub(super) fn new(
        ctx: &'a WorkerContext,
        job: Uuid,
        lease: &'a Lease,
        cancel: Arc<AtomicBool>,
        inference: &'a mut dyn Serve,
        rx: &'a Receiver<Request>,
        label: &str,
    ) -> Self {
        Self {
            ctx,
            job,
            lease,
            cancel,
            inference,
            rx,
            last_progress: None,
            unrecorded: None,
            unpublished: false,
            train_since: Instant::now(),
            train_busy: metrics()
                .device_busy_seconds
                .with_label_values(&[label, "train"]),
            train_speed: metrics()
                .train_images_per_second
                .with_label_values(&[label]),
            pruning: None,
            pause_at: None,
            paused: false,
            event_file: None,
            _backend: std::marker::PhantomData,
        }
    }

    /// Prunes the artifact store's copies of `ckpts` to the newest `keep` epochs, as the run
    /// prunes its disk.
    pub(super) fn prunes(mut self, ckpts: CheckpointDir, keep: usize) -> Self {
        self.pruning = Some((ckpts, keep));
        self
    }

    /// Stops the run once epoch `epoch` is recorded (a search's trial at its rung).
    pub(super) fn pauses_at(mut self, epoch: Option<u32>) -> Self {
        self.pause_at = epoch;
        self
    }

    /// Deletes from the artifact store what the run pruned from its disk (older epoch files,
    /// earlier attempts' mid-epoch ones), listed in the store itself (another replica may
    /// have written them), once a newer checkpoint is committed and while the job is this
    /// attempt's. A failure is logged and leaves the objects (the next epoch tries again).
    fn prune_store(&mut self) {
        let ctx = self.ctx;
        let Some((ckpts, keep)) = &self.pruning else {
            return;
        };
        if !ctx.artifacts.is_remote() || self.unpublished || !self.lease.still_owned() {
            return;
        }
        let pruned = ctx.runtime.block_on(async {
            let names = ctx.artifacts.list(&ckpts.dir).await?;
            let files: Vec<PathBuf> = ckpts
                .prunable(names, *keep)
                .into_iter()
                .map(|name| ckpts.dir.join(name))
                .collect();
            ctx.artifacts.delete(&files).await
        });
        if let Err(e) = pruned {
            warn!(error = %e, job = %self.job, "pruning old checkpoints in the artifact store");
        }
    }

    /// Uploads the attempt's TensorBoard event file to the artifact store (a no-op without
    /// one), while the job is this attempt's. A failure is logged; the next epoch's upload
    /// carries what this one missed.
    fn publish_log(&self) {
        let ctx = self.ctx;
        let Some(file) = &self.event_file else {
            return;
        };
        if !ctx.artifacts.is_remote() || !self.lease.still_owned() {
            return;
        }
        if let Err(e) = ctx.runtime.block_on(ctx.artifacts.publish(file)) {
            warn!(error = %e, file = %file.display(), "publishing the TensorBoard event file");
        }
    }

    /// Records the epoch's metrics (fenced), retrying every second while the store refuses
    /// or cannot be reached (answering inference meanwhile), until it is written, the job
    /// is another worker's, or the server stops. Stopped first, the epoch stays unrecorded:
    /// the run then ends as interrupted, never as finished, and is resumed from the last
    /// checkpoint the store committed.
    fn record_epoch(&mut self) {
        let Some(m) = self.unrecorded.clone() else {
            return;
        };
        let (ctx, fence) = (self.ctx, self.lease.fence);
        let what = format!("recording epoch {}", m.epoch);
        let write = || ctx.runtime.block_on(ctx.store.record_epoch(fence, &m));
        match retry_fenced(ctx, &mut *self.inference, self.rx, &what, write) {
            Retried::Written(()) => {
                self.unrecorded = None;
                self.paused = self.pause_at.is_some_and(|p| m.epoch as u32 >= p);
                ctx.publish(self.job, JobUpdate::Epoch(m));
            }
            Retried::Lost => self.lease.mark_lost(),
            Retried::Stopped => warn!(
                epoch = m.epoch,
                "stopping with an epoch the store has not recorded: the job resumes before it"
            ),
        }
    }

    /// Ends the run's accounting; true when every epoch was recorded and every checkpoint
    /// stored (a run that ends otherwise is not finished: it resumes).
    pub(super) fn close(&mut self) -> bool {
        self.count_train_time();
        self.train_speed.set(0.0);
        self.unrecorded.is_none() && !self.unpublished
    }

    /// Uploads the files to the artifact store (a no-op without one), retrying with a
    /// growing pause (answering inference meanwhile) while it fails; false when the server
    /// stops or the job is another worker's first: the files are then never committed.
    fn publish<'p>(&mut self, files: impl IntoIterator<Item = &'p PathBuf>) -> bool {
        let ctx = self.ctx;
        for file in files {
            let mut pause = RETRY_EVERY;
            loop {
                match ctx.runtime.block_on(ctx.artifacts.publish(file)) {
                    Ok(()) => break,
                    Err(e) => error!(
                        error = %e,
                        file = %file.display(),
                        "publishing a checkpoint; retrying in {} s",
                        pause.as_secs()
                    ),
                }
                if self.lease.lost() || !wait_serving(ctx, &mut *self.inference, self.rx, pause) {
                    return false;
                }
                pause = (pause * 2).min(MAX_PUBLISH_PAUSE);
            }
        }
        true
    }

    /// A store write of the run failed: when the job is another worker's now, the run stops.
    fn write_failed(&self, e: StoreError, what: &str) {
        if e.is_lease_lost() {
            self.lease.mark_lost();
        } else {
            error!(error = %format!("{e:#}"), "{what}");
        }
    }

    /// Adds the time since the last mark to the device's training time (inference served in
    /// between counts as inference).
    fn count_train_time(&mut self) {
        let now = Instant::now();
        self.train_busy
            .inc_by((now - self.train_since).as_secs_f64());
        self.train_since = now;
    }

    /// Answers the inference requests waiting, between two pieces of training work.
    fn serve_inference(&mut self) {
        self.count_train_time();
        self.inference.serve_pending(self.rx);
        self.train_since = Instant::now();
    }
}

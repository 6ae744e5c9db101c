//! Running one training job on the worker: mark it running, get its data, train with an
//! observer that records epochs and checkpoints, serves inference between steps and stops on
//! cancel or shutdown, then record how it ended.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use crossbeam_channel::Receiver;
use tracing::{error, info, info_span, warn};
use uuid::Uuid;

use super::inference::Serve;
use super::{JobUpdate, Request, WorkerContext};
use crate::engine::model::Tlb;
use crate::engine::train::{train, write_json, Outcome, TrainEvent, TrainObserver, CORRUPT_SUFFIX};
use crate::metrics::metrics;
use crate::store::{job_dir, now_ms, CheckpointRow, JobRow, JobState};

/// How often progress goes out to watchers at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

pub(super) fn run_job<B: AutodiffBackend>(
    ctx: &WorkerContext,
    device: &B::Device,
    inference: &mut dyn Serve,
    rx: &Receiver<Request>,
    job: JobRow,
) {
    let span = info_span!("job", id = %job.id);
    let _enter = span.enter();
    let id = job.id;
    let block_on = |f| ctx.runtime.block_on(f);
    if job.cancel_requested {
        // Cancelled while the server was down.
        finish(ctx, inference, rx, id, JobState::Cancelled, "", None);
        return;
    }
    // The last server died running it: once too often (without a checkpoint between), and
    // it is not resumed into the same death again.
    let deaths = job.unclean_exits + u32::from(job.run_open);
    if job.run_open && deaths >= ctx.crash_loop_limit {
        let message = format!(
            "the server stopped {deaths} times while running this job (killed or crashed, \
             with no checkpoint saved in between); not resuming it again. See the server log \
             and the host's kernel log (e.g. the OOM killer) for why"
        );
        error!(deaths, "crash loop: job failed instead of resumed");
        finish(ctx, inference, rx, id, JobState::Failed, &message, None);
        return;
    }
    let cancel = Arc::new(AtomicBool::new(false));
    *ctx.running.lock().expect("running slot") = Some((id, cancel.clone()));
    let resumed = job.state == JobState::Running;
    match block_on(ctx.store.mark_running(id, resumed)) {
        Ok(true) => publish_state(ctx, id),
        Ok(false) => {
            // Cancelled between being picked and starting.
            *ctx.running.lock().expect("running slot") = None;
            return;
        }
        Err(e) => {
            error!(error = %format!("{e:#}"), "marking the job running");
            *ctx.running.lock().expect("running slot") = None;
            std::thread::sleep(Duration::from_secs(1));
            return;
        }
    }
    info!(resumed, "job started");
    let result = train_job::<B>(ctx, device, inference, rx, &job, cancel.clone());
    *ctx.running.lock().expect("running slot") = None;
    match result {
        Ok((Outcome::Completed, test_accuracy)) => {
            info!(?test_accuracy, "job succeeded");
            finish(
                ctx,
                inference,
                rx,
                id,
                JobState::Succeeded,
                "",
                test_accuracy,
            )
        }
        Ok((Outcome::Interrupted, _)) if cancel.load(Ordering::SeqCst) => {
            info!("job cancelled");
            finish(ctx, inference, rx, id, JobState::Cancelled, "", None)
        }
        Ok((Outcome::Interrupted, _)) => {
            // Server shutdown: the job stays RUNNING and resumes on the next start.
            if let Err(e) = ctx.runtime.block_on(ctx.store.close_run(id)) {
                error!(error = %format!("{e:#}"), "recording the clean stop");
            }
            info!("job checkpointed for shutdown; resumes on restart");
        }
        Err(e) => {
            let message = format!("{e:#}");
            warn!(error = %message, "job failed");
            finish(ctx, inference, rx, id, JobState::Failed, &message, None)
        }
    }
}

fn train_job<B: AutodiffBackend>(
    ctx: &WorkerContext,
    device: &B::Device,
    inference: &mut dyn Serve,
    rx: &Receiver<Request>,
    job: &JobRow,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<(Outcome, Option<f64>)> {
    let dataset = ctx
        .datasets
        .resolve(&job.dataset_format, &job.dataset_path)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = job.id;
    let events = ctx.clone();
    let datasets = ctx.datasets.clone();
    let stopped = {
        let (cancel, stop) = (cancel.clone(), ctx.stop.clone());
        move || cancel.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst)
    };
    let keep_going = stopped.clone();
    // Reading (and maybe downloading) the data takes a while: serve inference meanwhile.
    let prepared = inference.while_serving(rx, move || {
        datasets.prepare(&dataset, &mut |url, done, total| {
            events.publish(
                id,
                JobUpdate::Download {
                    url: url.to_string(),
                    done,
                    total,
                },
            );
            !keep_going()
        })
    });
    let splits = match prepared {
        Ok(splits) => splits,
        // Cancelled or shutting down mid-download: not a failure.
        Err(_) if stopped() => return Ok((Outcome::Interrupted, None)),
        Err(e) => return Err(e),
    };
    let out = job_dir(&ctx.data_dir, id);
    std::fs::create_dir_all(&out)?;
    write_json(&out.join("labels.json"), &splits.class_names())?;
    let mut config = job.config.clone();
    if config.replicas == 0 {
        config.replicas = ctx.device.replicas();
    }
    let mut observer = JobObserver::<B> {
        ctx,
        job: id,
        cancel,
        inference,
        rx,
        last_progress: None,
        train_since: Instant::now(),
        train_busy: metrics()
            .device_busy_seconds
            .with_label_values(&[&ctx.device.to_string(), "train"]),
        train_speed: metrics()
            .train_images_per_second
            .with_label_values(&[&ctx.device.to_string()]),
        _backend: std::marker::PhantomData,
    };
    let run = catch_unwind(AssertUnwindSafe(|| {
        train::<B>(&config, &splits, &out, device, true, &mut observer)
    }));
    observer.count_train_time();
    observer.train_speed.set(0.0);
    match run {
        Ok(r) => r.map(|(outcome, summary)| (outcome, summary.test_accuracy)),
        Err(_) => Err(anyhow::anyhow!("training panicked (see the server log)")),
    }
}

fn publish_state(ctx: &WorkerContext, id: Uuid) {
    match ctx.runtime.block_on(ctx.store.get_job(id)) {
        Ok(Some(row)) => ctx.publish(id, JobUpdate::State(Box::new(row))),
        Ok(None) => {}
        Err(e) => error!(error = %format!("{e:#}"), "reading the job"),
    }
}

/// Records how the job ended. The store may refuse for a while (a full disk): then this
/// retries every second, answering inference meanwhile, until it is written or the server
/// stops (the job then stays RUNNING and is resumed on the next start).
fn finish(
    ctx: &WorkerContext,
    inference: &mut dyn Serve,
    rx: &Receiver<Request>,
    id: Uuid,
    state: JobState,
    error: &str,
    test: Option<f64>,
) {
    loop {
        match ctx
            .runtime
            .block_on(ctx.store.finish(id, state, error, test))
        {
            Ok(_) => return publish_state(ctx, id),
            Err(e) => error!(
                error = %format!("{e:#}"),
                state = state.as_str(),
                "recording the job's end; retrying"
            ),
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if ctx.stop.load(Ordering::SeqCst) {
                return;
            }
            if let Ok(first) = rx.recv_timeout(Duration::from_millis(100)) {
                inference.serve_with(first, rx);
            }
        }
    }
}

struct JobObserver<'a, B: AutodiffBackend> {
    ctx: &'a WorkerContext,
    job: Uuid,
    cancel: Arc<AtomicBool>,
    inference: &'a mut dyn Serve,
    rx: &'a Receiver<Request>,
    last_progress: Option<Instant>,
    /// Since when the device has been training without a break for inference.
    train_since: Instant,
    /// `tlb_device_busy_seconds_total{work="train"}` and `tlb_train_images_per_second` of
    /// this device.
    train_busy: prometheus::Counter,
    train_speed: prometheus::Gauge,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> TrainObserver<B> for JobObserver<'_, B> {
    fn event(&mut self, event: &TrainEvent) {
        let ctx = self.ctx;
        match event {
            TrainEvent::Progress(p) => {
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
                if let Err(e) = ctx.runtime.block_on(ctx.store.record_epoch(self.job, m)) {
                    error!(error = %format!("{e:#}"), "recording an epoch");
                }
                ctx.publish(self.job, JobUpdate::Epoch(m.clone()));
            }
            TrainEvent::CheckpointSaved {
                path,
                epoch,
                val_accuracy,
                best,
                seconds,
            } => {
                metrics().checkpoint_write_seconds.observe(*seconds);
                let is_epoch_file = path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("epoch-"));
                if !is_epoch_file {
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
                };
                match ctx.runtime.block_on(ctx.store.record_checkpoint(&row)) {
                    Ok(()) => ctx.publish(self.job, JobUpdate::Checkpoint(row)),
                    Err(e) => error!(error = %format!("{e:#}"), "recording a checkpoint"),
                }
            }
            TrainEvent::CheckpointSkipped(skipped) => {
                // The reason starts with the file's path.
                let message = format!(
                    "a checkpoint failed verification and was skipped for an older one \
                     (renamed to *{CORRUPT_SUFFIX}): {}",
                    skipped.reason
                );
                warn!("{message}");
                ctx.publish(self.job, JobUpdate::Warning(message));
            }
            TrainEvent::Started { .. } | TrainEvent::Finished(_) => {}
        }
    }

    fn should_stop(&mut self) -> bool {
        self.cancel.load(Ordering::SeqCst) || self.ctx.stop.load(Ordering::SeqCst)
    }

    fn between_steps(&mut self, _model: &Tlb<B>) {
        self.serve_inference();
    }

    fn between_batches(&mut self) {
        self.serve_inference();
    }
}

impl<B: AutodiffBackend> JobObserver<'_, B> {
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

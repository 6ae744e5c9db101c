//! Running one training job on the worker: mark it running, get its data, train with an
//! observer that records epochs and checkpoints, serves inference between steps and stops on
//! cancel or shutdown, then record how it ended.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use burn::tensor::backend::AutodiffBackend;
use crossbeam_channel::Receiver;
use tracing::{error, info, info_span, warn};
use uuid::Uuid;

use super::inference::Serve;
use super::lease::Lease;
use super::observer::{job_warning, retry_fenced, JobObserver, Retried};
use super::uploads::local_dataset;
use super::{JobUpdate, Request, WorkerContext};
use crate::engine::train::{train_run, write_json, CheckpointDir, Outcome, Run, RunDir, Start};
use crate::metrics::metrics;
use crate::names::Named;
use crate::store::{job_dir, Claimed, Fence, JobRow, JobState, StoreError};

pub(super) fn run_job<B: AutodiffBackend>(
    ctx: &WorkerContext,
    device: &B::Device,
    inference: &mut dyn Serve,
    rx: &Receiver<Request>,
    claimed: Claimed,
) {
    let resumed = claimed.resumed();
    let Claimed { fence, job } = claimed;
    let span = info_span!("job", id = %fence.job, attempt = fence.attempt);
    let _enter = span.enter();
    let id = fence.job;
    let job = match job {
        Ok(job) => job,
        Err(e) => {
            // It would be claimed again and again: it ends here, saying why.
            let message = format!("{e:#}");
            error!(error = %message, "claimed a job whose row cannot be read");
            finish(ctx, inference, rx, fence, JobState::Failed, &message, None);
            return;
        }
    };
    publish_state(ctx, id);
    if job.cancel_requested {
        // Cancelled while no worker ran it.
        finish(ctx, inference, rx, fence, JobState::Cancelled, "", None);
        return;
    }
    // Its last owner died running it: once too often (without a checkpoint between), and
    // it is not resumed into the same death again.
    let deaths = job.unclean_exits;
    if resumed && deaths >= ctx.crash_loop_limit {
        let message = format!(
            "the server stopped {deaths} times while running this job (killed or crashed, \
             with no checkpoint saved in between); not resuming it again. See the server log \
             and the host's kernel log (e.g. the OOM killer) for why"
        );
        error!(deaths, "crash loop: job failed instead of resumed");
        finish(ctx, inference, rx, fence, JobState::Failed, &message, None);
        return;
    }
    let cancel = Arc::new(AtomicBool::new(false));
    ctx.running
        .lock()
        .expect("running jobs")
        .insert(id, cancel.clone());
    let lease = Lease::hold(ctx, fence, cancel.clone());
    info!(resumed, device = %ctx.device_label, "job started");
    let result = train_job::<B>(ctx, device, inference, rx, &job, &lease, cancel.clone());
    ctx.running.lock().expect("running jobs").remove(&id);
    // The job is another attempt's now (the lease or a fenced write said so, or the run
    // stopped on it): this one records nothing more.
    let lost = lease.lost()
        || matches!(&result, Err(e) if e.downcast_ref::<StoreError>().is_some_and(StoreError::is_lease_lost));
    drop(lease);
    match result {
        Ok(Ended::Abandoned) => info!("job left to the worker that owns it now"),
        _ if lost => info!("job left to the worker that owns it now"),
        Ok(Ended::Interrupted) if cancel.load(Ordering::SeqCst) => {
            info!("job cancelled");
            finish(ctx, inference, rx, fence, JobState::Cancelled, "", None)
        }
        Ok(Ended::Paused) => {
            let what = "recording the trial's pause at its rung";
            let write = || ctx.runtime.block_on(ctx.store.pause(fence));
            match retry_fenced(ctx, inference, rx, what, write) {
                Retried::Written(()) => {
                    info!(epoch = ?job.pause_at, "trial paused at its rung");
                    publish_state(ctx, id);
                }
                Retried::Lost => info!("job left to the worker that owns it now"),
                Retried::Stopped => {}
            }
        }
        Ok(Ended::Completed(test_accuracy)) => {
            info!(?test_accuracy, "job succeeded");
            finish(
                ctx,
                inference,
                rx,
                fence,
                JobState::Succeeded,
                "",
                test_accuracy,
            )
        }
        Ok(Ended::Interrupted) => {
            // Shutdown: the job stays RUNNING; releasing the lease lets another worker
            // resume it at once (or this server on its next start).
            match ctx.runtime.block_on(ctx.store.release(fence)) {
                Ok(()) => info!("job checkpointed and released for shutdown"),
                Err(e) => error!(error = %format!("{e:#}"), "releasing the job's lease"),
            }
        }
        Err(e) => {
            let message = format!("{e:#}");
            warn!(error = %message, "job failed");
            finish(ctx, inference, rx, fence, JobState::Failed, &message, None)
        }
    }
}

/// How a job's run ended, for the worker.
enum Ended {
    /// Trained to its end; the test accuracy.
    Completed(Option<f64>),
    /// A search's trial reached the epoch it waits at.
    Paused,
    /// Cancelled or shutting down.
    Interrupted,
    /// Another worker owns the job now.
    Abandoned,
}

/// Where a claimed job starts: from the checkpoints the store committed for it, newest first
/// (the attempt that wrote them does not matter; an uncommitted file is never read). When it
/// committed some but not one of their files exists any more, starting again would silently
/// throw its training away: that is the operator's choice (`--on-missing-checkpoint`).
fn start_of(ctx: &WorkerContext, job: &JobRow, fence: Fence) -> anyhow::Result<Start> {
    let start = committed_checkpoints(ctx, job)?;
    let Start::From { newest_first, best } = &start else {
        return Ok(start);
    };
    let committed: Vec<&PathBuf> = newest_first.iter().chain(best).collect();
    // Written by another replica: downloaded from the artifact store (a no-op without one).
    for file in &committed {
        ctx.runtime
            .block_on(ctx.artifacts.fetch(file))
            .with_context(|| format!("fetching the committed checkpoint {}", file.display()))?;
    }
    if committed.is_empty() || committed.iter().any(|p| p.exists()) {
        return Ok(start);
    }
    let mut named: Vec<String> = newest_first
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if named.len() > 3 {
        let more = named.len() - 3;
        named.truncate(3);
        named.push(format!("and {more} more"));
    }
    let lost = format!(
        "none of the job's committed checkpoints exists any more ({}); {} epochs of training \
         are gone",
        named.join(", "),
        job.epochs_completed
    );
    match ctx.on_missing_checkpoint {
        MissingCheckpoint::Fail => anyhow::bail!(
            "{lost}. Restore the files (or check that this replica's --data-dir is the share \
             the job was trained in), then start the job again; or run the server with \
             --on-missing-checkpoint restart to train such jobs again from epoch 0"
        ),
        MissingCheckpoint::Restart => {
            metrics().restarts_from_scratch.inc();
            job_warning(
                ctx,
                fence,
                &format!("{lost}: training again from epoch 0 (--on-missing-checkpoint restart)"),
            );
            Ok(Start::Fresh)
        }
    }
}

/// What the operator wants when a resumed job's committed checkpoints are all missing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingCheckpoint {
    /// The job fails, naming the files and this flag.
    #[default]
    Fail,
    /// The job trains again from epoch 0, with a warning (log, WatchJob, GetJob) and a count
    /// in `tlb_job_restarts_from_scratch_total`.
    Restart,
}

/// The checkpoints the store committed for the job, newest first, and its best copies.
fn committed_checkpoints(ctx: &WorkerContext, job: &JobRow) -> anyhow::Result<Start> {
    let rows = ctx.runtime.block_on(ctx.store.list_checkpoints(job.id))?;
    let mut newest_first: Vec<PathBuf> = job.resume_path.iter().cloned().collect();
    for row in rows.iter().rev() {
        if !newest_first.contains(&row.path) {
            newest_first.push(row.path.clone());
        }
    }
    // Written before copies were recorded: the run's untagged best copy.
    let legacy_best =
        CheckpointDir::new(job_dir(&ctx.data_dir, job.id).join("checkpoints")).best_path();
    let best = rows
        .iter()
        .filter(|r| r.is_best)
        .flat_map(|r| {
            [
                r.copy_path.clone().unwrap_or(legacy_best.clone()),
                r.path.clone(),
            ]
        })
        .collect();
    Ok(Start::From { newest_first, best })
}

fn train_job<B: AutodiffBackend>(
    ctx: &WorkerContext,
    device: &B::Device,
    inference: &mut dyn Serve,
    rx: &Receiver<Request>,
    job: &JobRow,
    lease: &Lease,
    cancel: Arc<AtomicBool>,
) -> anyhow::Result<Ended> {
    // A job another replica's admission let through, on a device without its precision.
    ctx.device
        .supports(job.config.precision)
        .map_err(anyhow::Error::msg)?;
    let format = &job.dataset_format;
    let fetched = local_dataset(&ctx.artifacts, &ctx.datasets, format, &job.dataset_path);
    // A tree fetched from object storage stays while the job trains on it.
    let (path, _held) = ctx
        .runtime
        .block_on(fetched)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let dataset = ctx
        .datasets
        .resolve(format, &path)
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
        Err(_) if stopped() => return Ok(Ended::Interrupted),
        Err(e) => return Err(e),
    };
    let out = job_dir(&ctx.data_dir, id);
    std::fs::create_dir_all(&out)?;
    // Its checkpoints stay on this disk while it trains here, whatever the cache's bound.
    let _held = ctx.artifacts.hold(&out);
    write_json(&out.join("labels.json"), &splits.class_names())?;
    // In the store too, for replicas without this disk (informative: a failure is logged).
    let labels = ctx.store.set_labels(lease.fence, splits.class_names());
    if let Err(e) = ctx.runtime.block_on(labels) {
        warn!(error = %format!("{e:#}"), "recording the job's class names");
    }
    let mut config = job.config.clone();
    if config.replicas == 0 {
        config.replicas = ctx.device.replicas();
    }
    let run = Run {
        dir: out,
        attempt: Some(lease.fence.attempt),
        start: start_of(ctx, job, lease.fence)?,
    };
    let label = ctx.device_label.as_str();
    let ckpts = RunDir(run.dir.clone()).checkpoints(run.attempt);
    let mut observer = JobObserver::<B>::new(ctx, id, lease, cancel, inference, rx, label)
        .prunes(ckpts, config.keep_last)
        .pauses_at(job.pause_at);
    let run = catch_unwind(AssertUnwindSafe(|| {
        train_run::<B>(&config, &splits, &run, device, &mut observer)
    }));
    let all_recorded = observer.close();
    let paused = observer.paused && all_recorded;
    match run {
        // The job does not end before its epochs are recorded and its checkpoints stored.
        Ok(Ok((Outcome::Completed, _))) if !all_recorded => Ok(Ended::Interrupted),
        Ok(Ok((Outcome::Interrupted, _))) if paused => Ok(Ended::Paused),
        Ok(r) => r.map(|(outcome, summary)| match outcome {
            Outcome::Completed => Ended::Completed(summary.test_accuracy),
            Outcome::Interrupted => Ended::Interrupted,
            Outcome::Abandoned => Ended::Abandoned,
        }),
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

/// Records how the job ended (fenced: not when another worker owns the job now). The store
/// may refuse for a while (a full disk): then this retries every second, answering inference
/// meanwhile, until it is written or the server stops (the job then stays RUNNING and is
/// resumed when its lease runs out).
fn finish(
    ctx: &WorkerContext,
    inference: &mut dyn Serve,
    rx: &Receiver<Request>,
    fence: Fence,
    state: JobState,
    error: &str,
    test: Option<f64>,
) {
    let what = format!("recording the job's end ({})", state.name());
    let write = || {
        ctx.runtime
            .block_on(ctx.store.finish(fence, state, error, test))
    };
    match retry_fenced(ctx, inference, rx, &what, write) {
        Retried::Written(_) => publish_state(ctx, fence.job),
        Retried::Lost => info!("job left to the worker that owns it now"),
        // The job stays RUNNING: resumed when its lease runs out.
        Retried::Stopped => {}
    }
}

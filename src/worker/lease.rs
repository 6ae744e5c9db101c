//! Holding a claimed job: a task on the server's runtime renews the lease every third of it
//! (the database times it), publishes the run's latest step for watchers on other replicas
//! and picks up a cancel asked for through any replica. It beats once a second, whatever the
//! training thread is doing (a long step, a checkpoint write).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::WorkerContext;
use crate::engine::train::Progress;
use crate::store::{Fence, Heartbeat, Store};

/// A claimed job's lease, renewed until dropped.
pub(super) struct Lease {
    pub fence: Fence,
    store: Store,
    runtime: tokio::runtime::Handle,
    lost: Arc<AtomicBool>,
    progress: Arc<Mutex<Option<Progress>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Starts renewing `fence`'s lease; a cancel found in the store raises `cancel`.
    pub fn hold(ctx: &WorkerContext, fence: Fence, cancel: Arc<AtomicBool>) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Mutex::new(None::<Progress>));
        let lease = ctx.lease;
        let every = lease / 3;
        let beat = every.min(Duration::from_secs(1));
        let (store, lost_flag, latest) = (ctx.store.clone(), lost.clone(), progress.clone());
        let task = ctx.runtime.spawn(async move {
            let mut renewed = Instant::now();
            let mut failing = false;
            loop {
                tokio::time::sleep(beat).await;
                let renew = renewed.elapsed() + beat / 2 >= every;
                let step = latest.lock().expect("progress").take();
                let lease_ms = renew.then_some(lease.as_millis() as i64);
                match store.heartbeat(fence, lease_ms, step.as_ref()).await {
                    Ok(Heartbeat::Held { cancel: asked }) => {
                        if renew {
                            renewed = Instant::now();
                        }
                        if asked && !cancel.swap(true, Ordering::SeqCst) {
                            info!(job = %fence.job, "cancel requested through the store");
                        }
                        failing = false;
                    }
                    Ok(Heartbeat::Lost) => {
                        warn!(
                            job = %fence.job,
                            attempt = fence.attempt,
                            "lease lost: another worker owns the job now; stopping it here"
                        );
                        lost_flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => {
                        if !failing {
                            warn!(job = %fence.job, error = %format!("{e:#}"), "renewing the lease");
                        }
                        failing = true;
                    }
                }
            }
        });
        Self {
            fence,
            store: ctx.store.clone(),
            runtime: ctx.runtime.clone(),
            lost,
            progress,
            task,
        }
    }

    /// The job is another attempt's now (as far as the last beat knows).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Marks the job as lost (a fenced write found it so).
    pub fn mark_lost(&self) {
        self.lost.store(true, Ordering::SeqCst);
    }

    /// The latest step, for the next beat.
    pub fn set_progress(&self, progress: &Progress) {
        *self.progress.lock().expect("progress") = Some(progress.clone());
    }

    /// Asks the store whether the job is still this attempt's (right before files are
    /// written). When the store cannot answer, the files are written: they carry the
    /// attempt in their names and count only through a fenced row.
    pub fn still_owned(&self) -> bool {
        if self.lost() {
            return false;
        }
        match self.runtime.block_on(self.store.owns(self.fence)) {
            Ok(true) => true,
            Ok(false) => {
                self.mark_lost();
                false
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "checking the lease before a write");
                true
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

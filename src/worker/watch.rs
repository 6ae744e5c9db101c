//! Watching a job from any replica: the job as it is now, then its updates until it ends.
//! Updates of a job this process runs come from its worker's events; of one that runs on
//! another replica (or waits for a worker), from the store, read every [`REMOTE_POLL`].

use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch};
use uuid::Uuid;

use super::{JobEvent, JobUpdate, RunningJobs};
use crate::store::{JobRow, Store};

/// How often a job that runs on another replica is looked up in the store.
const REMOTE_POLL: Duration = Duration::from_millis(500);

/// One item of a watch.
#[derive(Debug)]
pub enum Watched {
    Update(JobUpdate),
    /// The server is stopping: the watch ends without the job's end.
    ShuttingDown,
}

/// Where watchers look: this process's job events and running jobs, the store, and the
/// server's shutdown.
#[derive(Clone)]
pub struct Watcher {
    pub events: broadcast::Sender<JobEvent>,
    pub running: RunningJobs,
    pub store: Store,
    pub shutdown: watch::Receiver<bool>,
}

impl Watcher {
    /// The job now and a channel of its updates until it ends (the first item is the job as
    /// read; the last, its final state). `None`: no such job.
    pub async fn watch(&self, id: Uuid) -> anyhow::Result<Option<mpsc::Receiver<Watched>>> {
        // Subscribe first: nothing between the snapshot and the stream is lost.
        let events = self.events.subscribe();
        let Some(job) = self.store.get_job(id).await? else {
            return Ok(None);
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(self.clone().forward(job, events, tx));
        Ok(Some(rx))
    }

    /// Waits at most `limit` for the job to end; true when it did.
    pub async fn until_ended(&self, id: Uuid, limit: Duration) -> bool {
        let Ok(Some(mut updates)) = self.watch(id).await else {
            return false;
        };
        let ended = async {
            while let Some(item) = updates.recv().await {
                if let Watched::Update(JobUpdate::State(row)) = item {
                    if row.state.is_terminal() {
                        return true;
                    }
                }
            }
            false
        };
        tokio::time::timeout(limit, ended).await.unwrap_or(false)
    }

    /// Tells this process's watchers of a job's new row (a change made outside its worker).
    pub fn announce(&self, row: JobRow) {
        let _ = self.events.send(std::sync::Arc::new((
            row.id,
            JobUpdate::State(Box::new(row)),
        )));
    }

    async fn forward(
        self,
        job: JobRow,
        mut events: broadcast::Receiver<JobEvent>,
        tx: mpsc::Sender<Watched>,
    ) {
        let id = job.id;
        let done = job.state.is_terminal();
        if tx
            .send(Watched::Update(JobUpdate::State(Box::new(job.clone()))))
            .await
            .is_err()
            || done
        {
            return;
        }
        let mut shutdown = self.shutdown.clone();
        let mut poll = tokio::time::interval(REMOTE_POLL);
        let mut seen = job;
        loop {
            let updates = tokio::select! {
                e = events.recv() => match e {
                    Ok(e) if e.0 == id => {
                        if let JobUpdate::State(row) = &e.1 {
                            seen = (**row).clone();
                        }
                        vec![e.1.clone()]
                    }
                    Ok(_) => continue,
                    // Too slow a reader: skip to the job as it is now.
                    Err(RecvError::Lagged(_)) => match self.store.get_job(id).await {
                        Ok(Some(row)) => {
                            seen = row.clone();
                            vec![JobUpdate::State(Box::new(row))]
                        }
                        _ => return,
                    },
                    Err(RecvError::Closed) => return,
                },
                _ = poll.tick() => {
                    if self.running.lock().expect("running jobs").contains_key(&id) {
                        continue;
                    }
                    let Ok(Some(row)) = self.store.get_job(id).await else { continue };
                    let updates = store_updates(&seen, &row);
                    seen = row;
                    updates
                }
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    let _ = tx.send(Watched::ShuttingDown).await;
                    return;
                }
            };
            for update in updates {
                let ended = matches!(&update, JobUpdate::State(r) if r.state.is_terminal());
                if tx.send(Watched::Update(update)).await.is_err() || ended {
                    return;
                }
            }
        }
    }
}

/// What changed between two readings of a job's row, as updates: the new step, a finished
/// epoch, and the job itself (last) when its state, owner, epochs, cancel flag or best
/// checkpoint changed.
fn store_updates(before: &JobRow, now: &JobRow) -> Vec<JobUpdate> {
    let mut updates = Vec::new();
    if let Some(p) = &now.progress {
        if before.progress.as_ref() != Some(p) {
            updates.push(JobUpdate::Progress(p.clone()));
        }
    }
    if now.epochs_completed > before.epochs_completed {
        if let Some(m) = &now.latest_metrics {
            updates.push(JobUpdate::Epoch(m.clone()));
        }
    }
    let changed = now.state != before.state
        || now.attempt != before.attempt
        || now.epochs_completed != before.epochs_completed
        || now.cancel_requested != before.cancel_requested
        || now.best_checkpoint_id != before.best_checkpoint_id;
    if changed {
        updates.push(JobUpdate::State(Box::new(now.clone())));
    }
    updates
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::train::{EpochMetrics, Preset};
    use crate::store::JobState;

    fn kinds(updates: &[JobUpdate]) -> Vec<&'static str> {
        updates
            .iter()
            .map(|u| match u {
                JobUpdate::Progress(_) => "progress",
                JobUpdate::Epoch(_) => "epoch",
                JobUpdate::State(_) => "state",
                _ => "other",
            })
            .collect()
    }

    #[test]
    fn store_readings_become_the_updates_a_local_watcher_would_see() {
        let before = JobRow::queued("tiny", Preset::Tiny.config(), "cifar10", "synth");
        assert!(store_updates(&before, &before).is_empty());
        let mut now = before.clone();
        now.state = JobState::Running;
        now.attempt = 1;
        assert_eq!(kinds(&store_updates(&before, &now)), ["state"]);
        let running = now.clone();
        now.epochs_completed = 1;
        now.latest_metrics = Some(EpochMetrics {
            epoch: 1,
            train_loss: 1.0,
            train_accuracy: 0.5,
            val_loss: 1.0,
            val_accuracy: 0.5,
            lr: 1e-3,
            seconds: 1.0,
            images_per_sec: 1.0,
            data_wait_fraction: 0.0,
            epochs_total: 2,
        });
        // The epoch, then the job (its epoch count changed); a terminal row ends the watch.
        assert_eq!(kinds(&store_updates(&running, &now)), ["epoch", "state"]);
        let mut done = now.clone();
        done.state = JobState::Succeeded;
        let last = store_updates(&now, &done);
        assert!(matches!(last.last(), Some(JobUpdate::State(r)) if r.state.is_terminal()));
    }
}

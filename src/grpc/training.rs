//! `tlb.v1.TrainingService`.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::info;
use uuid::Uuid;

use super::convert;
use super::AppState;
use crate::auth::{require, Caller, Role};
use crate::engine::train::Preset;
use crate::error::{parse_uuid, ApiError};
use crate::proto::v1 as pb;
use crate::proto::v1::training_service_server::TrainingService;
use crate::store::{JobRow, JobState};
use crate::worker::{JobEvent, JobUpdate};

/// Default and largest ListJobs page.
const PAGE_DEFAULT: usize = 50;
const PAGE_MAX: usize = 500;
/// How long CancelJob waits for a running job to stop before answering.
const CANCEL_WAIT: Duration = Duration::from_secs(30);
/// How often a job that runs on another replica is looked up in the store.
const REMOTE_POLL: Duration = Duration::from_millis(500);

pub struct TrainingApi(pub AppState);

impl TrainingApi {
    /// The job a request's `job_id` names.
    async fn job(&self, job_id: &str) -> Result<JobRow, ApiError> {
        self.job_by_id(parse_uuid("job_id", job_id)?).await
    }

    async fn job_by_id(&self, id: Uuid) -> Result<JobRow, ApiError> {
        self.0
            .store
            .get_job(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))
    }
}

fn parse_page_token(token: &str) -> Result<Option<(i64, String)>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || ApiError::field("page_token", "not a token from a ListJobs response");
    let (ms, id) = token.split_once(':').ok_or_else(bad)?;
    let id = Uuid::parse_str(id).map_err(|_| bad())?;
    Ok(Some((ms.parse().map_err(|_| bad())?, id.to_string())))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl TrainingService for TrainingApi {
    async fn start_training(
        &self,
        request: Request<pb::StartTrainingRequest>,
    ) -> Result<Response<pb::StartTrainingResponse>, Status> {
        let caller = Caller::of(&request).cloned();
        let r = request.into_inner();
        let preset_name = if r.preset.is_empty() {
            "cpu-small"
        } else {
            &r.preset
        };
        let preset = Preset::from_name(preset_name).map_err(|e| ApiError::field("preset", e))?;
        let dataset = r.dataset.ok_or_else(|| {
            ApiError::field(
                "dataset",
                "is required: {format: cifar10|cifar100|image-folder, path}",
            )
        })?;
        let resolved = self.0.datasets.resolve(&dataset.format, &dataset.path)?;
        let mut config = preset.config();
        if let Some(overrides) = &r.config {
            convert::apply_overrides(&mut config, overrides)?;
        }
        config.model.num_classes = resolved.num_classes;
        config
            .validate()
            .map_err(|e| ApiError::field(&format!("config.{}", e.field), e.message))?;
        if resolved.needs_download {
            require(
                caller.as_ref(),
                Role::Admin,
                "a job that downloads its dataset",
            )?;
        }
        // Only now the state of the machine: arguments are judged first.
        self.0.admission.check(&config)?;
        let queued = self
            .0
            .store
            .count_by_state()
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .find_map(|(s, n)| (s == JobState::Queued).then_some(n as usize))
            .unwrap_or(0);
        if queued >= self.0.max_queued_jobs {
            return Err(ApiError::ResourceExhausted(format!(
                "job queue full: {queued} jobs queued, the limit is {} (--max-queued-jobs); \
                 start this one when some have run",
                self.0.max_queued_jobs
            ))
            .into());
        }
        let mut job = JobRow::queued(preset_name, config, &dataset.format, &dataset.path);
        job.created_by = caller.map(|c| c.name).unwrap_or_default();
        self.0
            .store
            .insert_job(&job)
            .await
            .map_err(ApiError::from)?;
        info!(job = %job.id, preset = preset_name, dataset = %dataset.path, "job queued");
        self.0.worker.wake();
        Ok(Response::new(pb::StartTrainingResponse {
            job_id: job.id.to_string(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let job = self.job(&request.get_ref().job_id).await?;
        Ok(Response::new(convert::job(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let r = request.into_inner();
        let state = convert::state_filter(r.state)?;
        let size = match r.page_size as usize {
            0 => PAGE_DEFAULT,
            n => n.min(PAGE_MAX),
        };
        let after = parse_page_token(&r.page_token)?;
        let mut rows = self
            .0
            .store
            .list_jobs(state, size + 1, after)
            .await
            .map_err(ApiError::from)?;
        let next_page_token = if rows.len() > size {
            rows.truncate(size);
            rows.last()
                .map(|j| format!("{}:{}", j.created_at_ms, j.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs: rows.iter().map(convert::job).collect(),
            next_page_token,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let job = self.job(&request.get_ref().job_id).await?;
        if let Some(caller) = Caller::of(&request) {
            if caller.role == Role::Train && caller.name != job.created_by {
                return Err(Status::permission_denied(format!(
                    "role train may cancel only its own jobs; job {} was started by '{}' \
                     (an admin token can cancel any job)",
                    job.id, job.created_by
                )));
            }
        }
        let store = &self.0.store;
        if job.state.is_terminal() {
            return Err(ApiError::FailedPrecondition(format!(
                "job {} already ended ({}); only queued or running jobs can be cancelled",
                job.id,
                job.state.as_str()
            ))
            .into());
        }
        // Subscribe before acting so the end of the job cannot be missed.
        let mut events = self.0.events.subscribe();
        if store.cancel_queued(job.id).await.map_err(ApiError::from)? {
            info!(job = %job.id, "queued job cancelled");
            let row = self.job_by_id(job.id).await?;
            let _ = self.0.events.send(std::sync::Arc::new((
                job.id,
                JobUpdate::State(Box::new(row.clone())),
            )));
            return Ok(Response::new(convert::job(&row)));
        }
        // Stored first: the worker running it, here or on another replica, picks it up
        // (within a second there).
        store.request_cancel(job.id).await.map_err(ApiError::from)?;
        if let Some(flag) = self.0.running.lock().expect("running jobs").get(&job.id) {
            flag.store(true, Ordering::SeqCst);
        }
        info!(job = %job.id, "cancelling running job");
        let ended = tokio::time::timeout(CANCEL_WAIT, async {
            let mut poll = tokio::time::interval(REMOTE_POLL);
            loop {
                tokio::select! {
                    e = events.recv() => match e {
                        Ok(e) if e.0 == job.id => {
                            if let JobUpdate::State(row) = &e.1 {
                                if row.state.is_terminal() {
                                    return;
                                }
                            }
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    },
                    // It may run on another replica: its end shows in the store.
                    _ = poll.tick() => {
                        if let Ok(Some(row)) = store.get_job(job.id).await {
                            if row.state.is_terminal() {
                                return;
                            }
                        }
                    }
                }
            }
        })
        .await;
        if ended.is_err() {
            info!(job = %job.id, "cancel requested; the job is still stopping");
        }
        let row = self.job_by_id(job.id).await?;
        Ok(Response::new(convert::job(&row)))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let id = parse_uuid("job_id", &request.get_ref().job_id)?;
        // Subscribe first: nothing between the snapshot and the stream is lost.
        let events = self.0.events.subscribe();
        let job = self.job_by_id(id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let state = self.0.clone();
        tokio::spawn(forward_events(state, job, events, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_checkpoints(
        &self,
        request: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let job = self.job(&request.get_ref().job_id).await?;
        let rows = self
            .0
            .store
            .list_checkpoints(job.id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: rows.iter().map(convert::checkpoint).collect(),
        }))
    }
}

/// Feeds one WatchJob stream: the job as it is now, then its updates until it ends. Updates
/// of a job this process runs come from its worker; of one that runs elsewhere (or waits for
/// a worker), from the store, looked at every [`REMOTE_POLL`].
async fn forward_events(
    state: AppState,
    job: JobRow,
    mut events: tokio::sync::broadcast::Receiver<JobEvent>,
    tx: tokio::sync::mpsc::Sender<Result<pb::JobEvent, Status>>,
) {
    let id = job.id;
    let first = convert::event(&JobUpdate::State(Box::new(job.clone())));
    if tx.send(Ok(first)).await.is_err() || job.state.is_terminal() {
        return;
    }
    let mut shutdown = state.shutdown.clone();
    let mut poll = tokio::time::interval(REMOTE_POLL);
    let mut seen = job;
    loop {
        let update = tokio::select! {
            e = events.recv() => Some(e),
            _ = poll.tick() => {
                if state.running.lock().expect("running jobs").contains_key(&id) {
                    continue;
                }
                let Ok(Some(row)) = state.store.get_job(id).await else { continue };
                let (updates, ended) = store_updates(&seen, &row);
                seen = row;
                for update in &updates {
                    if tx.send(Ok(convert::event(update))).await.is_err() {
                        return;
                    }
                }
                if ended {
                    return;
                }
                continue;
            }
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => None,
        };
        let Some(update) = update else {
            let status = Status::unavailable("server shutting down; watch again after it restarts");
            let _ = tx.send(Err(status)).await;
            return;
        };
        let (update, ended) = match update {
            Ok(e) if e.0 == id => {
                if let JobUpdate::State(row) = &e.1 {
                    seen = (**row).clone();
                }
                let ended = matches!(&e.1, JobUpdate::State(r) if r.state.is_terminal());
                (convert::event(&e.1), ended)
            }
            Ok(_) => continue,
            Err(RecvError::Lagged(_)) => {
                // Too slow a reader: skip to the job as it is now.
                match state.store.get_job(id).await {
                    Ok(Some(row)) => {
                        let ended = row.state.is_terminal();
                        seen = row.clone();
                        (convert::event(&JobUpdate::State(Box::new(row))), ended)
                    }
                    _ => return,
                }
            }
            Err(RecvError::Closed) => return,
        };
        if tx.send(Ok(update)).await.is_err() || ended {
            return;
        }
    }
}

/// What changed between two readings of a job's row, as updates (the new step, a finished
/// epoch, the job itself when its state or owner changed), and whether it has ended.
fn store_updates(before: &JobRow, now: &JobRow) -> (Vec<JobUpdate>, bool) {
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
    (updates, now.state.is_terminal())
}

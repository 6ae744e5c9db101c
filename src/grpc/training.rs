//! `tlb.v1.TrainingService`.

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};
use tracing::info;
use uuid::Uuid;

use super::convert;
use super::paging::Page;
use super::{may_cancel, AppState};
use crate::auth::{require, Caller, Role};
use crate::datasets::upload::remote;
use crate::engine::train::Preset;
use crate::error::{parse_uuid, ApiError};
use crate::names::Named;
use crate::proto::v1 as pb;
use crate::proto::v1::training_service_server::TrainingService;
use crate::store::{JobRow, JobState};
use crate::worker::{local_dataset, Watched, Watcher};

/// How long CancelJob waits for a running job to stop before answering.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

pub struct TrainingApi(pub AppState);

impl TrainingApi {
    /// The job a request's `job_id` names.
    async fn job(&self, job_id: &str) -> Result<JobRow, ApiError> {
        self.job_by_id(parse_uuid("job_id", job_id)?).await
    }

    fn watcher(&self) -> Watcher {
        Watcher {
            events: self.0.events.clone(),
            running: self.0.running.clone(),
            store: self.0.store.clone(),
            shutdown: self.0.shutdown.clone(),
        }
    }

    async fn job_by_id(&self, id: Uuid) -> Result<JobRow, ApiError> {
        self.0
            .store
            .get_job(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))
    }
}

/// A request's dataset: `(format, the path its job row keeps, the path read here)`. A
/// path under the datasets root as given; an uploaded dataset by name; an `s3://` URI,
/// fetched here (each replica that runs the job fetches it, or finds it fetched).
async fn dataset_of(
    state: &AppState,
    d: pb::Dataset,
) -> Result<(String, String, String), ApiError> {
    let named = [&d.path, &d.id, &d.uri]
        .iter()
        .filter(|s| !s.is_empty())
        .count();
    if named > 1 {
        return Err(ApiError::field(
            "dataset",
            "give one of path (on the server), id (an upload) or uri (s3://)",
        ));
    }
    if !d.uri.is_empty() {
        remote::parse(&d.uri)?;
        let format = if d.format.is_empty() {
            "image-folder".to_string()
        } else {
            d.format
        };
        let (local, _) = local_dataset(&state.artifacts, &state.datasets, &format, &d.uri).await?;
        return Ok((format, d.uri, local));
    }
    if d.id.is_empty() {
        return Ok((d.format, d.path.clone(), d.path));
    }
    let row = state.store.get_dataset(&d.id).await?.ok_or_else(|| {
        ApiError::NotFound(format!("dataset.id: no uploaded dataset named '{}'", d.id))
    })?;
    let path = super::datasets::job_path(&row);
    let (local, _) = local_dataset(&state.artifacts, &state.datasets, &row.format, &path).await?;
    Ok((row.format, path, local))
}

/// What a job (or a search's trials) starts from, judged as StartTraining judges it:
/// arguments first (preset, dataset, overrides), then the machine (admission, artifact
/// store, queue room).
pub(super) struct Base {
    pub preset: String,
    pub config: crate::engine::train::TrainConfig,
    pub format: String,
    pub path: String,
}

pub(super) async fn base_of(
    state: &AppState,
    caller: Option<&Caller>,
    preset: &str,
    overrides: Option<&pb::TrainingConfig>,
    dataset: Option<pb::Dataset>,
) -> Result<Base, Status> {
    let preset_name = if preset.is_empty() {
        "cpu-small"
    } else {
        preset
    };
    let preset = preset_name
        .parse::<Preset>()
        .map_err(|e| ApiError::field("preset", e))?;
    let dataset = dataset.ok_or_else(|| {
        ApiError::field(
            "dataset",
            "is required: {format: cifar10|cifar100|image-folder, path}",
        )
    })?;
    let (format, path, local) = dataset_of(state, dataset).await?;
    let resolved = state.datasets.resolve(&format, &local)?;
    let mut config = preset.config();
    if let Some(overrides) = overrides {
        convert::apply_overrides(&mut config, overrides)?;
    }
    config.model.num_classes = resolved.num_classes;
    config
        .validate()
        .map_err(|e| ApiError::field(&format!("config.{}", e.field), e.message))?;
    if resolved.needs_download {
        require(caller, Role::Admin, "a job that downloads its dataset")?;
    }
    Ok(Base {
        preset: preset_name.to_string(),
        config,
        format,
        path,
    })
}

/// The machine's say, after the arguments: whether `config` fits, checkpoints can be kept,
/// and the queue has room.
pub(super) async fn admit(
    state: &AppState,
    config: &crate::engine::train::TrainConfig,
) -> Result<(), ApiError> {
    state.admission.check(config)?;
    // A job whose checkpoints could not be kept is refused before it queues.
    state.artifacts.check().await?;
    let queued = state
        .store
        .count_by_state()
        .await?
        .into_iter()
        .find_map(|(s, n)| (s == JobState::Queued).then_some(n as usize))
        .unwrap_or(0);
    if queued >= state.max_queued_jobs {
        return Err(ApiError::ResourceExhausted(format!(
            "job queue full: {queued} jobs queued, the limit is {} (--max-queued-jobs); \
             start this one when some have run",
            state.max_queued_jobs
        )));
    }
    Ok(())
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
        let base = base_of(
            &self.0,
            caller.as_ref(),
            &r.preset,
            r.config.as_ref(),
            r.dataset,
        )
        .await?;
        // Only now the state of the machine: arguments are judged first.
        admit(&self.0, &base.config).await?;
        let Base {
            preset,
            config,
            format,
            path,
        } = base;
        let mut job = JobRow::queued(&preset, config, &format, &path);
        job.created_by = caller.map(|c| c.name).unwrap_or_default();
        self.0
            .store
            .insert_job(&job)
            .await
            .map_err(ApiError::from)?;
        info!(job = %job.id, preset = %preset, dataset = %path, "job queued");
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
        let page = Page::of(r.page_size, &r.page_token)?;
        let mut rows = self
            .0
            .store
            .list_jobs(state, page.fetch(), page.after.clone())
            .await
            .map_err(ApiError::from)?;
        let next_page_token = page.cut(&mut rows, |j| (j.created_at_ms, j.id));
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
        may_cancel(
            Caller::of(&request),
            ("job", "jobs"),
            job.id,
            &job.created_by,
        )?;
        let store = &self.0.store;
        if job.state.is_terminal() {
            return Err(ApiError::FailedPrecondition(format!(
                "job {} already ended ({}); only queued or running jobs can be cancelled",
                job.id,
                job.state.name()
            ))
            .into());
        }
        if store.cancel_queued(job.id).await.map_err(ApiError::from)? {
            info!(job = %job.id, "queued job cancelled");
            let row = self.job_by_id(job.id).await?;
            self.watcher().announce(row.clone());
            return Ok(Response::new(convert::job(&row)));
        }
        // Stored first: the worker running it, here or on another replica, picks it up
        // (within a second there).
        store.request_cancel(job.id).await.map_err(ApiError::from)?;
        self.0.stop_here(&job.id);
        info!(job = %job.id, "cancelling running job");
        if !self.watcher().until_ended(job.id, CANCEL_WAIT).await {
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
        let updates = self
            .watcher()
            .watch(id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("no job with id {id}")))?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(updates).map(|w| match w {
            Watched::Update(update) => Ok(convert::event(&update)),
            Watched::ShuttingDown => Err(Status::unavailable(
                "server shutting down; watch again after it restarts",
            )),
        });
        Ok(Response::new(Box::pin(stream)))
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

    async fn list_epochs(
        &self,
        request: Request<pb::ListEpochsRequest>,
    ) -> Result<Response<pb::ListEpochsResponse>, Status> {
        let job = self.job(&request.get_ref().job_id).await?;
        let rows = self
            .0
            .store
            .job_epochs(job.id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ListEpochsResponse {
            epochs: rows.iter().map(convert::metrics).collect(),
        }))
    }
}

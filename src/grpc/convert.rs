//! Store rows and engine structs to protobuf messages, and request configs to engine configs.

use prost_types::Timestamp;

use crate::engine::model::{Precision, Readout};
use crate::engine::train::{EpochMetrics, Progress, Schedule, TrainConfig};
use crate::error::ApiError;
use crate::proto::v1 as pb;
use crate::store::{CheckpointRow, JobRow, JobState};
use crate::worker::JobUpdate;

pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::Paused => pb::JobState::Paused,
        JobState::Stopped => pb::JobState::Stopped,
    }
}

/// The store state of a request filter; `None` for "any".
pub fn state_filter(value: i32) -> Result<Option<JobState>, ApiError> {
    let state = pb::JobState::try_from(value)
        .map_err(|_| ApiError::field("state", format!("unknown job state {value}")))?;
    Ok(match state {
        pb::JobState::Unspecified => None,
        pb::JobState::Queued => Some(JobState::Queued),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
        pb::JobState::Paused => Some(JobState::Paused),
        pb::JobState::Stopped => Some(JobState::Stopped),
    })
}

pub fn metrics(m: &EpochMetrics) -> pb::Metrics {
    pb::Metrics {
        epoch: m.epoch as u32,
        train_loss: m.train_loss,
        train_accuracy: m.train_accuracy,
        val_loss: m.val_loss,
        val_accuracy: m.val_accuracy,
        lr: m.lr,
        seconds: m.seconds,
        images_per_sec: m.images_per_sec,
    }
}

pub fn progress(p: &Progress) -> pb::Progress {
    pb::Progress {
        epoch: p.epoch as u32 + 1,
        step_in_epoch: p.step_in_epoch as u32,
        steps_per_epoch: p.steps_per_epoch as u32,
        global_step: p.global_step as u64,
        total_steps: p.total_steps as u64,
        loss: p.loss,
        accuracy: p.accuracy,
        images_per_sec: p.images_per_sec,
        eta_seconds: p.eta_seconds,
    }
}

pub fn checkpoint(c: &CheckpointRow) -> pb::CheckpointInfo {
    pb::CheckpointInfo {
        checkpoint_id: c.id.to_string(),
        job_id: c.job_id.to_string(),
        epoch: c.epoch,
        val_accuracy: c.val_accuracy,
        best: c.is_best,
        created_at: Some(timestamp(c.created_at_ms)),
    }
}

pub fn job(j: &JobRow) -> pb::Job {
    pb::Job {
        job_id: j.id.to_string(),
        state: job_state(j.state) as i32,
        preset: j.preset.clone(),
        config_json: serde_json::to_string(&j.config).unwrap_or_default(),
        dataset: Some(pb::Dataset {
            format: j.dataset_format.clone(),
            path: j.dataset_path.clone(),
            // An uploaded dataset's path names its content: `upload:<sha256>/<folder>`.
            id: String::new(),
            uri: if j.dataset_path.starts_with("s3://") {
                j.dataset_path.clone()
            } else {
                String::new()
            },
        }),
        created_at: Some(timestamp(j.created_at_ms)),
        started_at: j.started_at_ms.map(timestamp),
        finished_at: j.finished_at_ms.map(timestamp),
        epochs_completed: j.epochs_completed,
        epochs_total: j.epochs_total,
        latest_metrics: j.latest_metrics.as_ref().map(metrics),
        best_checkpoint_id: j
            .best_checkpoint_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        error: j.error.clone(),
        test_accuracy: j.test_accuracy,
        restarts: j.restarts,
        cancel_requested: j.cancel_requested,
        created_by: j.created_by.clone(),
        worker: j.worker.clone(),
        attempt: j.attempt,
        device: j.device.clone(),
        warnings: j.warnings.clone(),
        search_id: j.search_id.map(|s| s.to_string()).unwrap_or_default(),
        trial: j.trial,
        best_val_accuracy: j.best_val_accuracy,
    }
}

pub fn event(update: &JobUpdate) -> pb::JobEvent {
    use pb::job_event::Event;
    let event = match update {
        JobUpdate::State(j) => Event::State(job(j)),
        JobUpdate::Progress(p) => Event::Progress(progress(p)),
        JobUpdate::Epoch(m) => Event::Epoch(metrics(m)),
        JobUpdate::Checkpoint(c) => Event::Checkpoint(checkpoint(c)),
        JobUpdate::Download { url, done, total } => Event::Download(pb::DownloadProgress {
            url: url.clone(),
            bytes_done: *done,
            bytes_total: *total,
        }),
        JobUpdate::Warning(message) => Event::Warning(pb::JobWarning {
            message: message.clone(),
        }),
    };
    pb::JobEvent { event: Some(event) }
}

fn positive(field: &str, v: Option<u32>) -> Result<Option<usize>, ApiError> {
    match v {
        Some(0) => Err(ApiError::field(field, "must be positive")),
        v => Ok(v.map(|v| v as usize)),
    }
}

/// Applies the set fields of a request's `TrainingConfig` to a preset's config.
pub fn apply_overrides(c: &mut TrainConfig, o: &pb::TrainingConfig) -> Result<(), ApiError> {
    let m = &mut c.model;
    let fields = [
        ("config.image_size", o.image_size, &mut m.image_size),
        ("config.patch_size", o.patch_size, &mut m.patch_size),
        ("config.embed_dim", o.embed_dim, &mut m.embed_dim),
        ("config.chunk_size", o.chunk_size, &mut m.chunk_size),
        ("config.r", o.r, &mut m.r),
        ("config.num_layers", o.num_layers, &mut m.num_layers),
        ("config.num_heads", o.num_heads, &mut m.num_heads),
    ];
    for (name, value, slot) in fields {
        if let Some(v) = positive(name, value)? {
            *slot = v;
        }
    }
    if let Some(v) = o.ffn_dropout {
        m.ffn_dropout = v;
    }
    if let Some(v) = o.attn_dropout {
        m.attn_dropout = v;
    }
    match pb::Readout::try_from(o.readout) {
        Ok(pb::Readout::Unspecified) => {}
        Ok(pb::Readout::Slow) => m.readout = Readout::Slow,
        Ok(pb::Readout::LastFast) => m.readout = Readout::LastFast,
        Err(_) => return Err(ApiError::field("config.readout", "unknown readout")),
    }
    let fields = [
        ("config.epochs", o.epochs, &mut c.epochs),
        ("config.batch_size", o.batch_size, &mut c.batch_size),
    ];
    for (name, value, slot) in fields {
        if let Some(v) = positive(name, value)? {
            *slot = v;
        }
    }
    if let Some(v) = o.micro_batch {
        c.micro_batch = v as usize;
    }
    let floats = [
        (o.lr, &mut c.lr),
        (o.weight_decay, &mut c.weight_decay),
        (o.warmup_epochs, &mut c.warmup_epochs),
        (o.label_smoothing, &mut c.label_smoothing),
        (o.max_minutes, &mut c.max_minutes),
    ];
    for (value, slot) in floats {
        if let Some(v) = value {
            *slot = v;
        }
    }
    match pb::Schedule::try_from(o.schedule) {
        Ok(pb::Schedule::Unspecified) => {}
        Ok(pb::Schedule::Constant) => c.schedule = Schedule::Constant,
        Ok(pb::Schedule::Cosine) => c.schedule = Schedule::Cosine,
        Err(_) => return Err(ApiError::field("config.schedule", "unknown schedule")),
    }
    match pb::Precision::try_from(o.precision) {
        Ok(pb::Precision::Unspecified) => {}
        Ok(pb::Precision::F32) => c.precision = Precision::F32,
        Ok(pb::Precision::Bf16) => c.precision = Precision::Bf16,
        Err(_) => return Err(ApiError::field("config.precision", "unknown precision")),
    }
    if let Some(v) = o.seed {
        c.seed = v;
    }
    Ok(())
}

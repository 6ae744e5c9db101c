//! Rows of the job store and their mapping from SQL.

use std::path::PathBuf;

use anyhow::{Context, Result};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use super::paths::StoredPaths;
use crate::engine::train::{EpochMetrics, Progress, TrainConfig};

/// Milliseconds since the Unix epoch (UTC).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    strum::Display,
    strum::EnumIter,
)]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE", parse_err_ty = String, parse_err_fn = unknown_state)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// A search's trial waiting at its rung for a promotion (it keeps its checkpoints and
    /// resumes from them when promoted).
    Paused,
    /// A search's trial its search ended without promoting (its checkpoints stay).
    Stopped,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Stopped
        )
    }
}

fn unknown_state(name: &str) -> String {
    crate::names::unknown::<JobState>("job state", name)
}

/// One training job.
#[derive(Clone, Debug)]
pub struct JobRow {
    pub id: Uuid,
    pub state: JobState,
    pub preset: String,
    /// The resolved config the job trains with.
    pub config: TrainConfig,
    pub dataset_format: String,
    pub dataset_path: String,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub epochs_completed: u32,
    pub epochs_total: u32,
    pub latest_metrics: Option<EpochMetrics>,
    pub best_checkpoint_id: Option<Uuid>,
    /// Its validation accuracy (read with the job; unset where a claim returned the row).
    pub best_val_accuracy: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub error: String,
    pub restarts: u32,
    pub cancel_requested: bool,
    /// Times the server died while running the job since its last checkpoint.
    pub unclean_exits: u32,
    /// A server runs the job now (or died running it: found so when the job is picked up).
    pub run_open: bool,
    /// The NAME of the token that started the job (empty without auth).
    pub created_by: String,
    /// Claims of the job so far; the newest attempt's number fences its writes.
    pub attempt: u32,
    /// The replica (`--replica-id`) and device of the newest attempt.
    pub worker: String,
    pub device: String,
    /// The newest checkpoint file the job committed: a resumed run starts from it.
    pub resume_path: Option<PathBuf>,
    /// The running job's latest step (for watchers on replicas that do not run it).
    pub progress: Option<Progress>,
    /// What the owner should know that did not stop the job, oldest first.
    pub warnings: Vec<String>,
    /// The model's class names (empty: not known yet, or a job from before they were stored).
    pub labels: Vec<String>,
    /// The search this job is a trial of, and its number there.
    pub search_id: Option<Uuid>,
    pub trial: Option<u32>,
    /// The ASHA rung the trial trains towards (0 outside ASHA).
    pub rung: u32,
    /// The epoch the trial waits at for a promotion (None: it trains to the end).
    pub pause_at: Option<u32>,
}

/// A BOOLEAN column, selected as `CAST(… AS INTEGER)`.
fn flag(r: &AnyRow, column: &str) -> Result<bool> {
    Ok(r.try_get::<i64, _>(column)? != 0)
}

pub(super) fn uuid(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).with_context(|| format!("bad uuid '{s}' in the store"))
}

impl JobRow {
    /// A new queued job.
    pub fn queued(preset: &str, config: TrainConfig, format: &str, path: &str) -> Self {
        Self {
            id: Uuid::new_v4(),
            state: JobState::Queued,
            preset: preset.to_string(),
            epochs_total: config.epochs as u32,
            config,
            dataset_format: format.to_string(),
            dataset_path: path.to_string(),
            created_at_ms: now_ms(),
            started_at_ms: None,
            finished_at_ms: None,
            epochs_completed: 0,
            latest_metrics: None,
            best_checkpoint_id: None,
            best_val_accuracy: None,
            test_accuracy: None,
            error: String::new(),
            restarts: 0,
            cancel_requested: false,
            unclean_exits: 0,
            run_open: false,
            created_by: String::new(),
            attempt: 0,
            worker: String::new(),
            device: String::new(),
            resume_path: None,
            progress: None,
            warnings: Vec::new(),
            labels: Vec::new(),
            search_id: None,
            trial: None,
            rung: 0,
            pause_at: None,
        }
    }

    pub(super) fn from_row(r: &AnyRow, paths: &StoredPaths) -> Result<Self> {
        let id = uuid(r.try_get("id")?)?;
        Self::parse(id, r, paths).with_context(|| format!("job {id} in the store is unreadable"))
    }

    fn parse(id: Uuid, r: &AnyRow, paths: &StoredPaths) -> Result<Self> {
        let config: String = r.try_get("config_json")?;
        let metrics: Option<String> = r.try_get("latest_metrics_json")?;
        let best: Option<String> = r.try_get("best_checkpoint_id")?;
        // Metrics are informative: unreadable ones are dropped, not the job.
        let latest_metrics = metrics.and_then(|m| {
            serde_json::from_str(&m)
                .map_err(|e| tracing::warn!(job = %id, error = %e, "unreadable metrics dropped"))
                .ok()
        });
        Ok(Self {
            id,
            state: r
                .try_get::<String, _>("state")?
                .parse()
                .map_err(anyhow::Error::msg)?,
            preset: r.try_get("preset")?,
            config: serde_json::from_str(&config).context("job config in the store")?,
            dataset_format: r.try_get("dataset_format")?,
            dataset_path: r.try_get("dataset_path")?,
            created_at_ms: r.try_get("created_at_ms")?,
            started_at_ms: r.try_get("started_at_ms")?,
            finished_at_ms: r.try_get("finished_at_ms")?,
            epochs_completed: r.try_get::<i64, _>("epochs_completed")? as u32,
            epochs_total: r.try_get::<i64, _>("epochs_total")? as u32,
            latest_metrics,
            best_checkpoint_id: best.as_deref().map(uuid).transpose()?,
            best_val_accuracy: r.try_get("best_val_accuracy").ok().flatten(),
            test_accuracy: r.try_get("test_accuracy")?,
            error: r.try_get("error")?,
            restarts: r.try_get::<i64, _>("restarts")? as u32,
            cancel_requested: flag(r, "cancel_requested")?,
            unclean_exits: r.try_get::<i64, _>("unclean_exits")? as u32,
            run_open: flag(r, "run_open")?,
            created_by: r.try_get("created_by")?,
            attempt: r.try_get::<i64, _>("attempt")? as u32,
            worker: r.try_get("worker")?,
            device: r.try_get("device")?,
            resume_path: r
                .try_get::<Option<String>, _>("resume_path")?
                .map(|p| paths.local(&p)),
            progress: r
                .try_get::<Option<String>, _>("progress_json")?
                .and_then(|p| serde_json::from_str(&p).ok()),
            warnings: warnings(r)?,
            labels: r
                .try_get::<Option<String>, _>("labels_json")?
                .and_then(|l| serde_json::from_str(&l).ok())
                .unwrap_or_default(),
            search_id: r
                .try_get::<Option<String>, _>("search_id")?
                .as_deref()
                .map(uuid)
                .transpose()?,
            trial: r.try_get::<Option<i64>, _>("trial")?.map(|t| t as u32),
            rung: r.try_get::<i64, _>("rung")? as u32,
            pause_at: r.try_get::<Option<i64>, _>("pause_at")?.map(|p| p as u32),
        })
    }
}

/// The `warnings_json` column (unreadable JSON reads as none: warnings are informative).
pub(super) fn warnings(r: &AnyRow) -> Result<Vec<String>> {
    Ok(r.try_get::<Option<String>, _>("warnings_json")?
        .and_then(|w| serde_json::from_str(&w).ok())
        .unwrap_or_default())
}

/// One saved epoch of a job.
#[derive(Clone, Debug)]
pub struct CheckpointRow {
    pub id: Uuid,
    pub job_id: Uuid,
    pub epoch: u32,
    pub val_accuracy: Option<f64>,
    pub path: PathBuf,
    pub is_best: bool,
    pub created_at_ms: i64,
    /// The best checkpoint's copy (read when `path` was pruned).
    pub copy_path: Option<PathBuf>,
}

impl CheckpointRow {
    pub(super) fn from_row(r: &AnyRow, paths: &StoredPaths) -> Result<Self> {
        Ok(Self {
            id: uuid(r.try_get("id")?)?,
            job_id: uuid(r.try_get("job_id")?)?,
            epoch: r.try_get::<i64, _>("epoch")? as u32,
            val_accuracy: r.try_get("val_accuracy")?,
            path: paths.local(&r.try_get::<String, _>("path")?),
            is_best: flag(r, "is_best")?,
            created_at_ms: r.try_get("created_at_ms")?,
            copy_path: r
                .try_get::<Option<String>, _>("copy_path")?
                .map(|p| paths.local(&p)),
        })
    }
}

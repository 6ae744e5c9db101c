//! The gRPC layer: translates requests into store queries and worker requests, and results
//! into responses. No training or inference logic lives here.

pub mod convert;
mod datasets;
mod export;
mod images;
mod import;
mod inference;
mod oip;
mod paging;
mod search;
mod training;
pub mod wire;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};

pub use datasets::DatasetApi;
pub use inference::InferenceApi;
pub use oip::{OipApi, OnlyOpenInference};
pub use search::{through_search, SearchApi};
pub use training::TrainingApi;

use crate::admission::Admission;
use crate::artifacts::Artifacts;
use crate::datasets::Datasets;
use crate::store::{CheckpointRow, LastKnown, Store};
use crate::worker::{JobEvent, RunningJobs, WorkerHandle};

/// Most images in one Classify request.
pub const MAX_BATCH: usize = 256;
/// Largest side of an image, encoded or raw.
pub const MAX_IMAGE_SIDE: u32 = 4096;
/// Most pixels in one request, all images together (checked from the headers, before any
/// decoding): one image at the largest size, or 256 images of 256×256. It bounds the
/// decoding work one request can ask for (about 0.2 s of CPU).
pub const MAX_REQUEST_PIXELS: u64 = MAX_IMAGE_SIDE as u64 * MAX_IMAGE_SIDE as u64;
/// Largest request message: room for one raw RGB8 image at the largest size (48 MiB), so
/// every documented limit can be reached.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Whether `s` is a SHA-256 as 64 hex digits (the form uploads name their bytes by).
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// When the client's deadline (`grpc-timeout`) passes, if it set one.
pub fn deadline_of<T>(request: &tonic::Request<T>) -> Option<std::time::Instant> {
    let v = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => std::time::Duration::from_secs(n.saturating_mul(3600)),
        "M" => std::time::Duration::from_secs(n.saturating_mul(60)),
        "S" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_millis(n),
        "u" => std::time::Duration::from_micros(n),
        "n" => std::time::Duration::from_nanos(n),
        _ => return None,
    };
    std::time::Instant::now().checked_add(d)
}

/// How long before the client's deadline a waiting call gives up, so that its answer
/// (DEADLINE_EXCEEDED) goes out before the transport's own timer cancels the call.
const DEADLINE_MARGIN: std::time::Duration = std::time::Duration::from_millis(20);

/// Runs a call's work until its deadline; past it, DEADLINE_EXCEEDED (and the work is
/// dropped: a request still queued for the device is then skipped unprocessed).
pub async fn within<T>(
    deadline: Option<std::time::Instant>,
    work: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let Some(deadline) = deadline else {
        return work.await;
    };
    let give_up = deadline.checked_sub(DEADLINE_MARGIN).unwrap_or(deadline);
    match tokio::time::timeout_at(give_up.into(), work).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(
            "the client's deadline passed before the answer was ready; the request was dropped",
        )),
    }
}

/// Refuses a cancel by a `train` token of what another caller started (`what` names it:
/// "job" or "search", `whats` its plural); admins cancel anything, and a server without
/// tokens lets everyone.
fn may_cancel(
    caller: Option<&crate::auth::Caller>,
    (what, whats): (&str, &str),
    id: uuid::Uuid,
    owner: &str,
) -> Result<(), tonic::Status> {
    match caller {
        Some(c) if c.role == crate::auth::Role::Train && c.name != owner => {
            Err(tonic::Status::permission_denied(format!(
                "role train may cancel only its own {whats}; {what} {id} was started by \
                 '{owner}' (an admin token can cancel any {what})"
            )))
        }
        _ => Ok(()),
    }
}

/// What the services share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub worker: Arc<WorkerHandle>,
    pub events: broadcast::Sender<JobEvent>,
    pub datasets: Datasets,
    pub data_dir: PathBuf,
    pub running: RunningJobs,
    /// Turns true when the server is shutting down (open streams end).
    pub shutdown: watch::Receiver<bool>,
    /// Whether a new job fits the machine (memory, data dir space).
    pub admission: Admission,
    /// Queued jobs beyond which StartTraining is refused.
    pub max_queued_jobs: usize,
    /// The checkpoint each model name last stood for, served while the store is down.
    pub models: Arc<LastKnown<CheckpointRow>>,
    /// Where checkpoints live beyond the data dir (none by default).
    pub artifacts: Artifacts,
}

impl AppState {
    /// Tells a job running on this replica to stop at once (a cancel stored in the job
    /// store reaches it within a second wherever it runs).
    pub(crate) fn stop_here(&self, job: &uuid::Uuid) {
        if let Some(flag) = self.running.lock().expect("running jobs").get(job) {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The checkpoint a model name stands for, as the store answered (remembered); while the
    /// store cannot be reached, the one it last stood for. Classify and the Open Inference
    /// Protocol both resolve names through it (`key` keeps their namespaces apart).
    pub(crate) fn remembered(
        &self,
        key: &str,
        answer: Result<CheckpointRow, crate::error::ApiError>,
    ) -> Result<CheckpointRow, crate::error::ApiError> {
        self.models.through(key, answer, |e| {
            matches!(e, crate::error::ApiError::Unavailable(_))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::deadline_of;

    fn with_timeout(v: &str) -> tonic::Request<()> {
        let mut r = tonic::Request::new(());
        r.metadata_mut().insert("grpc-timeout", v.parse().unwrap());
        r
    }

    /// How far in the future the deadline of `grpc-timeout: v` lies, if it has one.
    fn ahead(v: &str) -> Option<Duration> {
        let before = Instant::now();
        let d = deadline_of(&with_timeout(v))?;
        Some(d.duration_since(before))
    }

    #[test]
    fn grpc_timeouts_in_every_unit_become_deadlines() {
        assert!(deadline_of(&tonic::Request::new(())).is_none());
        let near = |v: &str, want: Duration| {
            let got = ahead(v).unwrap_or_else(|| panic!("{v}: no deadline"));
            assert!(
                got >= want && got < want + Duration::from_secs(1),
                "{v}: {got:?}"
            );
        };
        near("2H", Duration::from_secs(7200));
        near("3M", Duration::from_secs(180));
        near("5S", Duration::from_secs(5));
        near("250m", Duration::from_millis(250));
        near("750u", Duration::from_micros(750));
        near("99999999n", Duration::from_nanos(99_999_999));
    }

    #[test]
    fn malformed_or_unrepresentable_timeouts_mean_no_deadline() {
        for v in ["S", "5", "5s", "5X", "-5S", "1.5S", "99999999999999999999S"] {
            assert!(ahead(v).is_none(), "{v}");
        }
        // Past what an Instant can hold on some hosts: then no deadline, never a panic.
        let far = ahead("99999999H");
        assert!(far.is_none_or(|d| d >= Duration::from_secs(3600 * 99_999_999)));
    }
}

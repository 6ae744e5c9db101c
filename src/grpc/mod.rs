//! The gRPC layer: translates requests into store queries and worker requests, and results
//! into responses. No training or inference logic lives here.

pub mod convert;
mod images;
mod inference;
mod training;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};

pub use inference::InferenceApi;
pub use training::TrainingApi;

use crate::server::datasets::Datasets;
use crate::server::resources::Admission;
use crate::store::Store;
use crate::worker::{JobEvent, RunningSlot, WorkerHandle};

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

/// What the services share.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub worker: Arc<WorkerHandle>,
    pub events: broadcast::Sender<JobEvent>,
    pub datasets: Datasets,
    pub data_dir: PathBuf,
    pub running: RunningSlot,
    /// Turns true when the server is shutting down (open streams end).
    pub shutdown: watch::Receiver<bool>,
    /// Whether a new job fits the machine (memory, data dir space).
    pub admission: Admission,
}

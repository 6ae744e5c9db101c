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
use crate::store::Store;
use crate::worker::{JobEvent, RunningSlot, WorkerHandle};

/// Most images in one Classify request.
pub const MAX_BATCH: usize = 256;
/// Largest side of an image, encoded or raw.
pub const MAX_IMAGE_SIDE: u32 = 4096;
/// Largest request message.
pub const MAX_MESSAGE_BYTES: usize = 32 << 20;

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
}

//! The device workers: one thread per device owns it and the models on it. Each claims
//! training jobs from the store on its own (one at a time, under a lease: `lease.rs`) and,
//! between training steps and when idle, answers inference requests, batching those that
//! arrived together. Inference goes to an idle device that has the model loaded, else any idle
//! one (or to the `--inference-device` thread).

mod devices;
mod inference;
mod job;
mod lease;
mod models;
mod observer;
pub mod search;
mod uploads;
mod watch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use crossbeam_channel::{Receiver, Sender};
use tokio::sync::{broadcast, oneshot};
use uuid::Uuid;

pub use devices::device_labels;
use devices::{ReadyAll, Slot};
use inference::Serve as _;
pub use inference::{AttentionResult, ClassifyResult};
pub use job::MissingCheckpoint;
pub use models::{add_imported, local_model, ModelRef, IMPORTED};
pub use uploads::local_dataset;
pub use watch::{Watched, Watcher};

use crate::artifacts::Artifacts;
use crate::datasets::Datasets;
use crate::engine::backend::DeviceSpec;
use crate::engine::train::{EpochMetrics, Progress};
use crate::error::ApiError;
use crate::metrics::metrics;
use crate::store::{CheckpointRow, JobRow, Store};

/// A request's place in the inference queue: its images count against
/// `--max-queued-images` from the moment it is accepted (before decoding) until it is answered
/// or dropped; it knows when it was queued and the client's deadline.
pub struct Ticket {
    images: usize,
    queued: Arc<AtomicUsize>,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
}

impl Ticket {
    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.images, Ordering::SeqCst);
        metrics().inference_queued_images.sub(self.images as i64);
    }
}

/// How often an idle worker looks for a job in the store.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// What the worker is asked to do.
pub enum Request {
    /// Class probabilities for planar RGB8 images of side [`crate::engine::infer::STORE_SIDE`].
    Classify {
        model: ModelRef,
        images: Vec<Vec<u8>>,
        ticket: Ticket,
        reply: oneshot::Sender<Result<ClassifyResult, ApiError>>,
    },
    Attention {
        model: ModelRef,
        image: Vec<u8>,
        ticket: Ticket,
        reply: oneshot::Sender<Result<AttentionResult, ApiError>>,
    },
    /// A job was queued.
    Wake,
}

/// Something that happened to a job, for `WatchJob` streams.
#[derive(Clone, Debug)]
pub enum JobUpdate {
    State(Box<JobRow>),
    Progress(Progress),
    Epoch(EpochMetrics),
    Checkpoint(CheckpointRow),
    Download {
        url: String,
        done: u64,
        total: u64,
    },
    /// Something the job's owner should know (e.g. a corrupt checkpoint was skipped).
    Warning(String),
}

/// A job update with the job it belongs to.
pub type JobEvent = Arc<(Uuid, JobUpdate)>;

/// The jobs this process runs, and the flags that cancel them.
pub type RunningJobs = Arc<Mutex<HashMap<Uuid, Arc<AtomicBool>>>>;

/// What the worker thread shares with the server.
#[derive(Clone)]
pub struct WorkerContext {
    pub store: Store,
    pub runtime: tokio::runtime::Handle,
    pub events: broadcast::Sender<JobEvent>,
    pub datasets: Datasets,
    pub data_dir: PathBuf,
    pub running: RunningJobs,
    /// Raised on shutdown: running jobs checkpoint and release their leases.
    pub stop: Arc<AtomicBool>,
    /// The device of this worker (set per thread by [`WorkerHandle::start`]) and its name in
    /// the store and metrics (`cpu`, or `cpu#1` when a device is given twice).
    pub device: DeviceSpec,
    pub device_label: String,
    /// A job the server died running this many times without a checkpoint in between is
    /// failed instead of resumed again.
    pub crash_loop_limit: u32,
    /// This replica's name (`--replica-id`), the worker of the jobs it claims.
    pub replica_id: String,
    /// How long a claim holds a job without renewal (`--lease-seconds`).
    pub lease: Duration,
    /// What a resumed job whose committed checkpoints are all missing does.
    pub on_missing_checkpoint: MissingCheckpoint,
    /// Where checkpoints are published before the store commits them, and fetched from when
    /// this replica lacks one.
    pub artifacts: Artifacts,
}

impl WorkerContext {
    fn publish(&self, job: Uuid, update: JobUpdate) {
        // No receiver only means nobody is watching.
        let _ = self.events.send(Arc::new((job, update)));
    }
}

/// The server's end of the workers.
pub struct WorkerHandle {
    slots: Vec<Slot>,
    /// The `--inference-device` thread, when there is one.
    infer_tx: Option<Sender<Request>>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Images accepted for inference and not yet answered, and their bound.
    queued: Arc<AtomicUsize>,
    max_queued_images: usize,
    next: AtomicUsize,
}

fn gone() -> ApiError {
    ApiError::Unavailable("the device worker has stopped (server shutting down)".into())
}

impl WorkerHandle {
    /// Starts a worker thread per device; `ready` is called once a device answered a first
    /// operation (or with why none did). `inference_device`: `None`, the workers answer
    /// inference between training steps; `Some(d)`, a thread of its own answers it on `d`
    /// (e.g. the CPU beside a GPU), even during a step.
    pub fn start(
        ctx: WorkerContext,
        devices: &[DeviceSpec],
        inference_device: Option<DeviceSpec>,
        max_queued_images: usize,
        ready: impl FnOnce(Result<(), String>) + Send + 'static,
    ) -> Self {
        let stop = ctx.stop.clone();
        let all_ready = Arc::new(Mutex::new(ReadyAll {
            left: devices.len(),
            errors: Vec::new(),
            ready: Some(Box::new(ready)),
        }));
        let mut threads = Vec::new();
        let mut slots = Vec::new();
        for (spec, label) in devices.iter().zip(device_labels(devices)) {
            let (tx, rx) = crossbeam_channel::unbounded();
            let slot = Slot {
                tx,
                alive: Arc::default(),
                training: Arc::default(),
                cached: Arc::default(),
            };
            let mut ctx = ctx.clone();
            (ctx.device, ctx.device_label) = (spec.clone(), label.clone());
            let (alive, training, cached) = (
                slot.alive.clone(),
                slot.training.clone(),
                slot.cached.clone(),
            );
            let all_ready = all_ready.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tlb-worker-{label}"))
                .spawn(move || {
                    let device = ctx.device.clone();
                    let report = move |r: Result<(), String>| {
                        alive.store(r.is_ok(), Ordering::SeqCst);
                        ReadyAll::report(&all_ready, r)
                    };
                    crate::with_backend!(device, |B, device| {
                        Worker::<B>::new(ctx, device, rx, training, cached).run(report)
                    })
                })
                .expect("spawning a worker thread");
            threads.push(thread);
            slots.push(slot);
        }
        let infer_tx = inference_device.map(|inference_device| {
            // Inference on a thread of its own, answering even while a step runs.
            let (infer_tx, infer_rx) = crossbeam_channel::unbounded();
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name("tlb-inference".into())
                .spawn(move || {
                    crate::with_backend!(inference_device.clone(), |IB, device| {
                        let mut engine = inference::Inference::<
                            <IB as burn::tensor::backend::AutodiffBackend>::InnerBackend,
                        >::new(device, &inference_device);
                        serve_until_stopped(&mut engine, &infer_rx, &stop)
                    })
                })
                .expect("spawning the inference thread");
            threads.push(thread);
            infer_tx
        });
        Self {
            slots,
            infer_tx,
            stop,
            threads: Mutex::new(threads),
            queued: Arc::new(AtomicUsize::new(0)),
            max_queued_images,
            next: AtomicUsize::new(0),
        }
    }

    /// Takes places for `images` images in the inference queue, or refuses at once when it is
    /// full: memory does not grow with the offered load.
    pub fn reserve(&self, images: usize, deadline: Option<Instant>) -> Result<Ticket, ApiError> {
        let before = self.queued.fetch_add(images, Ordering::SeqCst);
        let ticket = Ticket {
            images,
            queued: self.queued.clone(),
            enqueued: Instant::now(),
            deadline,
        };
        metrics().inference_queued_images.add(images as i64);
        if before + images > self.max_queued_images {
            return Err(ApiError::ResourceExhausted(format!(
                "inference queue full: {before} images waiting, the limit is {} \
                 (--max-queued-images); retry later",
                self.max_queued_images
            )));
        }
        Ok(ticket)
    }

    pub async fn classify(
        &self,
        model: ModelRef,
        images: Vec<Vec<u8>>,
        ticket: Ticket,
    ) -> Result<ClassifyResult, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.route(model.checkpoint_id)
            .send(Request::Classify {
                model,
                images,
                ticket,
                reply,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn attention(
        &self,
        model: ModelRef,
        image: Vec<u8>,
        ticket: Ticket,
    ) -> Result<AttentionResult, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.route(model.checkpoint_id)
            .send(Request::Attention {
                model,
                image,
                ticket,
                reply,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Whether at least one device answered its first operation.
    pub fn any_device_ready(&self) -> bool {
        self.slots.iter().any(|s| s.alive.load(Ordering::SeqCst))
    }

    /// Tells the workers a job was queued.
    pub fn wake(&self) {
        for slot in &self.slots {
            let _ = slot.tx.send(Request::Wake);
        }
    }

    /// Asks the workers to checkpoint their running jobs and stop; returns when they have.
    pub fn stop_and_join(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
        for t in std::mem::take(&mut *self.threads.lock().expect("worker handle")) {
            if t.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}

/// The inference thread's loop: answer requests until shutdown.
fn serve_until_stopped(
    engine: &mut dyn inference::Serve,
    rx: &Receiver<Request>,
    stop: &AtomicBool,
) {
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(first) => engine.serve_with(first, rx),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) if !stop.load(Ordering::SeqCst) => {}
            Err(_) => break,
        }
    }
    engine.serve_pending(rx);
}

struct Worker<B: AutodiffBackend> {
    ctx: WorkerContext,
    device: B::Device,
    rx: Receiver<Request>,
    inference: inference::Inference<B::InnerBackend>,
    /// Raised while a job runs here (for the router).
    training: Arc<AtomicBool>,
}

impl<B: AutodiffBackend> Worker<B> {
    fn new(
        ctx: WorkerContext,
        device: B::Device,
        rx: Receiver<Request>,
        training: Arc<AtomicBool>,
        cached: Arc<Mutex<Vec<Uuid>>>,
    ) -> Self {
        let mut inference = inference::Inference::new(device.clone(), &ctx.device);
        inference.publish_cache_to(cached);
        Self {
            ctx,
            device,
            rx,
            inference,
            training,
        }
    }

    fn run(mut self, ready: impl FnOnce(Result<(), String>)) {
        // A first round trip initialises the device (a CUDA context takes a moment).
        let probe = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            burn::tensor::Tensor::<B::InnerBackend, 1>::ones([1], &self.device)
                .into_data()
                .to_vec::<f32>()
                .map_err(|e| format!("{e:?}"))
        }));
        match probe {
            Ok(Ok(v)) if v == [1.0] => {}
            other => {
                let why = match other {
                    Ok(Err(e)) => e,
                    Ok(Ok(v)) => format!("read back {v:?}"),
                    Err(_) => "the backend panicked".into(),
                };
                let why = format!("device {} is not usable: {why}", self.ctx.device_label);
                tracing::error!("{why}");
                ready(Err(why));
                return;
            }
        }
        let device = self.ctx.device_label.clone();
        tracing::info!(%device, "device worker ready");
        ready(Ok(()));
        let lease_ms = self.ctx.lease.as_millis() as i64;
        while !self.ctx.stop.load(Ordering::SeqCst) {
            self.inference.serve_pending(&self.rx);
            let ctx = &self.ctx;
            let claim = ctx
                .runtime
                .block_on(ctx.store.claim(&ctx.replica_id, &device, lease_ms));
            match claim {
                Ok(Some(claimed)) => {
                    let search = claimed.job.as_ref().ok().and_then(|j| j.search_id);
                    self.training.store(true, Ordering::SeqCst);
                    job::run_job::<B>(ctx, &self.device, &mut self.inference, &self.rx, claimed);
                    self.training.store(false, Ordering::SeqCst);
                    // Its trial paused or ended: the search decides what runs next.
                    if let Some(search) = search {
                        ctx.runtime.block_on(search::advance(&ctx.store, search));
                    }
                }
                Ok(None) => {
                    // Idle: wait for a request, a wake-up, or the next look at the store (a
                    // job queued through another replica, or one whose lease ran out).
                    if let Ok(first) = self.rx.recv_timeout(IDLE_POLL) {
                        self.inference.serve_with(first, &self.rx);
                    }
                }
                Err(e) => {
                    // An unreachable store is logged once, by its probe.
                    if e.is_unavailable() {
                        tracing::debug!(error = %format!("{e:#}"), "reading the job queue");
                    } else {
                        tracing::error!(error = %format!("{e:#}"), "reading the job queue");
                    }
                    if let Ok(first) = self.rx.recv_timeout(Duration::from_secs(1)) {
                        self.inference.serve_with(first, &self.rx);
                    }
                }
            }
        }
        // Answer what is already queued before going.
        self.inference.serve_pending(&self.rx);
        tracing::info!(%device, "device worker stopped");
    }
}

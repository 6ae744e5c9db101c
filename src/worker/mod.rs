//! The device worker: one thread owns the burn device and the models on it. It runs queued
//! training jobs one at a time and, between training steps and when idle, answers inference
//! requests, batching those that arrived together.

mod inference;
mod job;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use crossbeam_channel::{Receiver, Sender};
use tokio::sync::{broadcast, oneshot};
use uuid::Uuid;

use inference::Serve as _;
pub use inference::{AttentionResult, ClassifyResult};

use crate::datasets::Datasets;
use crate::engine::backend::DeviceSpec;
use crate::engine::train::{EpochMetrics, Progress};
use crate::error::ApiError;
use crate::metrics::metrics;
use crate::store::{CheckpointRow, JobRow, Store};

/// A checkpoint to run inference with.
#[derive(Clone, Debug)]
pub struct ModelRef {
    pub checkpoint_id: Uuid,
    pub path: PathBuf,
    /// Read instead when `path` was pruned (a job's `best.ckpt` holds its best epoch).
    pub fallback: Option<PathBuf>,
}

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

/// The running job and the flag that cancels it.
pub type RunningSlot = Arc<Mutex<Option<(Uuid, Arc<AtomicBool>)>>>;

/// What the worker thread shares with the server.
#[derive(Clone)]
pub struct WorkerContext {
    pub store: Store,
    pub runtime: tokio::runtime::Handle,
    pub events: broadcast::Sender<JobEvent>,
    pub datasets: Datasets,
    pub data_dir: PathBuf,
    pub running: RunningSlot,
    /// Raised on shutdown: the running job checkpoints and stays resumable.
    pub stop: Arc<AtomicBool>,
    pub device: DeviceSpec,
    /// A job the server died running this many times without a checkpoint in between is
    /// failed instead of resumed again.
    pub crash_loop_limit: u32,
}

impl WorkerContext {
    fn publish(&self, job: Uuid, update: JobUpdate) {
        // No receiver only means nobody is watching.
        let _ = self.events.send(Arc::new((job, update)));
    }
}

/// The server's end of the worker.
pub struct WorkerHandle {
    /// To the device worker (jobs; inference too when it runs on the training device).
    tx: Sender<Request>,
    /// Where Classify/GetAttention go: `tx`, or the inference thread of another device.
    infer_tx: Sender<Request>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Images accepted for inference and not yet answered, and their bound.
    queued: Arc<AtomicUsize>,
    max_queued_images: usize,
}

fn gone() -> ApiError {
    ApiError::Unavailable("the device worker has stopped (server shutting down)".into())
}

impl WorkerHandle {
    /// Starts the worker thread; `ready` is called once the device answered a first operation
    /// (or with why it did not). `inference_device`: `None`, the worker answers inference
    /// between training steps; `Some(d)`, a thread of its own answers it on `d` (e.g. the CPU
    /// beside a GPU), even during a step.
    pub fn start(
        ctx: WorkerContext,
        inference_device: Option<DeviceSpec>,
        max_queued_images: usize,
        ready: impl FnOnce(Result<(), String>) + Send + 'static,
    ) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stop = ctx.stop.clone();
        let thread = std::thread::Builder::new()
            .name("tlb-device-worker".into())
            .spawn(move || {
                let device = ctx.device.clone();
                crate::with_backend!(device, |B, device| {
                    Worker::<B>::new(ctx, device, rx).run(ready)
                })
            })
            .expect("spawning the worker thread");
        let mut threads = vec![thread];
        let infer_tx = if let Some(inference_device) = inference_device {
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
        } else {
            tx.clone()
        };
        Self {
            tx,
            infer_tx,
            stop,
            threads: Mutex::new(threads),
            queued: Arc::new(AtomicUsize::new(0)),
            max_queued_images,
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
        self.infer_tx
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
        self.infer_tx
            .send(Request::Attention {
                model,
                image,
                ticket,
                reply,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Tells the worker a job was queued.
    pub fn wake(&self) {
        let _ = self.tx.send(Request::Wake);
    }

    /// Asks the worker to checkpoint the running job and stop; returns when it has.
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
}

impl<B: AutodiffBackend> Worker<B> {
    fn new(ctx: WorkerContext, device: B::Device, rx: Receiver<Request>) -> Self {
        let inference = inference::Inference::new(device.clone(), &ctx.device);
        Self {
            ctx,
            device,
            rx,
            inference,
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
                let why = format!("device {:?} is not usable: {why}", self.ctx.device);
                tracing::error!("{why}");
                ready(Err(why));
                return;
            }
        }
        tracing::info!(device = ?self.ctx.device, "device worker ready");
        ready(Ok(()));
        while !self.ctx.stop.load(Ordering::SeqCst) {
            self.inference.serve_pending(&self.rx);
            let next = self.ctx.runtime.block_on(self.ctx.store.next_runnable());
            match next {
                Ok(Some(job)) => {
                    job::run_job::<B>(&self.ctx, &self.device, &mut self.inference, &self.rx, job)
                }
                Ok(None) => {
                    // Idle: wait for a request or a new job.
                    if let Ok(first) = self.rx.recv_timeout(Duration::from_secs(5)) {
                        self.inference.serve_with(first, &self.rx);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "reading the job queue");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        // Answer what is already queued before going.
        self.inference.serve_pending(&self.rx);
        tracing::info!("device worker stopped");
    }
}

//! Inference on the worker thread: a small cache of loaded checkpoints, and requests that
//! arrive together for the same model run as one batch.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::tensor::backend::Backend;
use crossbeam_channel::Receiver;
use uuid::Uuid;

use super::{ModelRef, Request, Ticket};
use crate::engine::backend::DeviceSpec;
use crate::engine::infer::{attention_maps, eval_batch, probabilities, AttentionMaps, STORE_SIDE};
use crate::engine::model::{with_rng_lock, Tlb};
use crate::engine::train::Checkpoint;
use crate::error::ApiError;
use crate::metrics::metrics;

/// Loaded models kept on the device.
const CACHE_SIZE: usize = 4;
/// Largest batch one forward pass takes (bounds activation memory).
const MAX_FORWARD: usize = 512;

pub struct ClassifyResult {
    /// `[image][class]`, in request order.
    pub probabilities: Vec<Vec<f32>>,
    pub labels: Arc<Vec<String>>,
    pub checkpoint_id: Uuid,
    /// Images in the batch this request was part of.
    pub batch_images: usize,
}

pub struct AttentionResult {
    pub maps: AttentionMaps,
    pub labels: Arc<Vec<String>>,
    /// Side of the patch grid (tokens run row-major over it).
    pub grid: usize,
    pub checkpoint_id: Uuid,
}

struct Loaded<B: Backend> {
    model: Tlb<B>,
    labels: Arc<Vec<String>>,
    image_size: usize,
    grid: usize,
}

type ClassifyReply = Pending<ClassifyResult>;
/// Classify requests for one model: each request's images and where its answer goes.
type ClassifyGroup = (ModelRef, Vec<(Vec<Vec<u8>>, ClassifyReply)>);

/// Answers inference requests on some backend (the training device's, or another one).
pub trait Serve {
    /// Answers `requests`, batching those for the same model.
    fn serve(&mut self, requests: Vec<Request>);

    /// Answers every request already waiting.
    fn serve_pending(&mut self, rx: &Receiver<Request>) {
        let waiting: Vec<Request> = rx.try_iter().collect();
        if !waiting.is_empty() {
            self.serve(waiting);
        }
    }

    /// Answers `first` and whatever arrived with it.
    fn serve_with(&mut self, first: Request, rx: &Receiver<Request>) {
        let mut all = vec![first];
        all.extend(rx.try_iter());
        self.serve(all);
    }
}

impl<B: Backend> Serve for Inference<B> {
    fn serve(&mut self, requests: Vec<Request>) {
        self.serve_all(requests)
    }
}

impl dyn Serve + '_ {
    /// Runs `work` on a helper thread, answering inference requests until it is done.
    pub fn while_serving<T: Send>(
        &mut self,
        rx: &Receiver<Request>,
        work: impl FnOnce() -> T + Send,
    ) -> T {
        std::thread::scope(|s| {
            let handle = s.spawn(work);
            while !handle.is_finished() {
                if let Ok(first) = rx.recv_timeout(std::time::Duration::from_millis(20)) {
                    self.serve_with(first, rx);
                }
            }
            match handle.join() {
                Ok(v) => v,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

pub struct Inference<B: Backend> {
    device: B::Device,
    /// The device's name, for metrics.
    label: String,
    threads: usize,
    /// Most recently used last.
    cache: Vec<(Uuid, Arc<Loaded<B>>)>,
    /// The ids in `cache`, for the router that picks a device for a request.
    cached_ids: Arc<Mutex<Vec<Uuid>>>,
}

/// A request's answer channel with its place in the inference queue. Answering releases the
/// place before the answer is sent, so a client that has its answer never finds its own images
/// still counted against `--max-queued-images`.
struct Pending<T> {
    ticket: Ticket,
    reply: tokio::sync::oneshot::Sender<Result<T, ApiError>>,
}

impl<T> Pending<T> {
    fn answer(self, result: Result<T, ApiError>) {
        drop(self.ticket);
        let _ = self.reply.send(result);
    }
}

/// The request if the device should work on it: `None` for one whose caller is gone
/// (cancelled, or timed out in tonic) and for one past its deadline (answered
/// DEADLINE_EXCEEDED), before any work is spent on them.
fn admit<T>(pending: Pending<T>) -> Option<Pending<T>> {
    let dropped = |reason| {
        metrics()
            .inference_dropped
            .with_label_values(&[reason])
            .inc()
    };
    if pending.reply.is_closed() {
        dropped("cancelled");
        return None;
    }
    let waited = pending.ticket.enqueued.elapsed();
    if pending.ticket.expired() {
        dropped("deadline");
        pending.answer(Err(ApiError::DeadlineExceeded(format!(
            "the deadline passed after {} ms waiting for the device; the request was dropped \
             unprocessed",
            waited.as_millis()
        ))));
        return None;
    }
    metrics()
        .inference_queue_seconds
        .observe(waited.as_secs_f64());
    Some(pending)
}

/// Runs `f`, turning a panic inside the engine into an internal error.
fn guarded<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> Result<T, ApiError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r.map_err(ApiError::internal),
        Err(_) => Err(ApiError::internal(anyhow::anyhow!("{what} panicked"))),
    }
}

impl<B: Backend> Inference<B> {
    pub fn new(device: B::Device, spec: &DeviceSpec) -> Self {
        Self {
            device,
            label: spec.to_string(),
            threads: spec.replicas().max(1),
            cache: Vec::new(),
            cached_ids: Arc::default(),
        }
    }

    /// Shares the ids of the cached models through `ids`.
    pub fn publish_cache_to(&mut self, ids: Arc<Mutex<Vec<Uuid>>>) {
        self.cached_ids = ids;
    }

    fn serve_all(&mut self, requests: Vec<Request>) {
        let started = Instant::now();
        // Classify requests grouped by model, in arrival order; each keeps its place in the
        // queue (its images counted) until it is answered.
        let mut groups: Vec<ClassifyGroup> = Vec::new();
        for request in requests {
            match request {
                Request::Classify {
                    model,
                    images,
                    ticket,
                    reply,
                } => {
                    if let Some(reply) = admit(Pending { ticket, reply }) {
                        match groups
                            .iter_mut()
                            .find(|(m, _)| m.checkpoint_id == model.checkpoint_id)
                        {
                            Some((_, g)) => g.push((images, reply)),
                            None => groups.push((model, vec![(images, reply)])),
                        }
                    }
                }
                Request::Attention {
                    model,
                    image,
                    ticket,
                    reply,
                } => {
                    if let Some(reply) = admit(Pending { ticket, reply }) {
                        metrics().inference_batch_images.observe(1.0);
                        let maps = self.attention(&model, image);
                        reply.answer(maps);
                    }
                }
                Request::Wake => {}
            }
        }
        for (model, group) in groups {
            self.classify_group(&model, group);
        }
        metrics()
            .device_busy_seconds
            .with_label_values(&[&self.label, "infer"])
            .inc_by(started.elapsed().as_secs_f64());
    }

    fn classify_group(&mut self, model: &ModelRef, group: Vec<(Vec<Vec<u8>>, ClassifyReply)>) {
        let loaded = match self.load(model) {
            Ok(l) => l,
            Err(e) => {
                for (_, reply) in group {
                    reply.answer(Err(e.clone()));
                }
                return;
            }
        };
        let sizes: Vec<usize> = group.iter().map(|(imgs, _)| imgs.len()).collect();
        tracing::debug!(
            requests = sizes.len(),
            images = sizes.iter().sum::<usize>(),
            "classify batch"
        );
        let all: Vec<&[u8]> = group
            .iter()
            .flat_map(|(imgs, _)| imgs.iter().map(Vec::as_slice))
            .collect();
        let probs = guarded("classification", || {
            let mut out = Vec::with_capacity(all.len());
            for slice in all.chunks(MAX_FORWARD) {
                let t = std::time::Instant::now();
                let batch = eval_batch(slice, STORE_SIDE, loaded.image_size);
                let prep = t.elapsed();
                out.extend(probabilities(
                    &loaded.model,
                    batch,
                    self.threads,
                    &self.device,
                ));
                tracing::debug!(images = slice.len(), ?prep, total = ?t.elapsed(), "forward");
            }
            Ok(out)
        });
        let batch_images = all.len();
        metrics()
            .inference_batch_images
            .observe(batch_images as f64);
        drop(all);
        let mut probs = match probs {
            Ok(p) => p.into_iter(),
            Err(e) => {
                for (_, reply) in group {
                    reply.answer(Err(e.clone()));
                }
                return;
            }
        };
        for ((_, reply), n) in group.into_iter().zip(sizes) {
            reply.answer(Ok(ClassifyResult {
                probabilities: probs.by_ref().take(n).collect(),
                labels: loaded.labels.clone(),
                checkpoint_id: model.checkpoint_id,
                batch_images,
            }));
        }
    }

    fn attention(&mut self, model: &ModelRef, image: Vec<u8>) -> Result<AttentionResult, ApiError> {
        let loaded = self.load(model)?;
        let maps = guarded("attention", || {
            let batch = eval_batch(&[&image], STORE_SIDE, loaded.image_size);
            Ok(attention_maps(&loaded.model, batch, &self.device))
        })?;
        Ok(AttentionResult {
            maps,
            labels: loaded.labels.clone(),
            grid: loaded.grid,
            checkpoint_id: model.checkpoint_id,
        })
    }

    /// The model, from the cache or its file. One rule for every path (and the same as
    /// ModelReady's): a checkpoint whose file is gone is not served, cached or not, so that
    /// replicas with and without it in memory answer alike.
    fn load(&mut self, model: &ModelRef) -> Result<Arc<Loaded<B>>, ApiError> {
        let path = model.file().to_path_buf();
        if !path.exists() {
            return Err(ApiError::FailedPrecondition(format!(
                "checkpoint {} has no file any more ({} was removed)",
                model.checkpoint_id,
                path.display()
            )));
        }
        if let Some(i) = self
            .cache
            .iter()
            .position(|(id, _)| *id == model.checkpoint_id)
        {
            let hit = self.cache.remove(i);
            self.cache.push(hit.clone());
            return Ok(hit.1);
        }
        let device = self.device.clone();
        let loaded = guarded("loading a checkpoint", move || {
            let ckpt = Checkpoint::read(&path)?;
            let cfg = ckpt.meta.config.model.clone();
            let labels = Arc::new(ckpt.meta.class_names.clone());
            Ok(Arc::new(Loaded {
                // Initialisation draws from burn's RNG: not while a training thread does.
                model: with_rng_lock(|| ckpt.into_model::<B>(&device))?,
                labels,
                image_size: cfg.image_size,
                grid: cfg.grid_size(),
            }))
        })?;
        if self.cache.len() >= CACHE_SIZE {
            self.cache.remove(0);
        }
        self.cache.push((model.checkpoint_id, loaded.clone()));
        *self.cached_ids.lock().expect("cache ids") = self.cache.iter().map(|c| c.0).collect();
        Ok(loaded)
    }
}

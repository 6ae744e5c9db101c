//! Loss, accuracy and evaluation over a split.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor, TensorData};

use crate::engine::data::{Batch, EpochPlan, Loader, Split};
use crate::engine::model::Tlb;

/// Moves a host batch onto the device: images `[n, 3, s, s]` and labels `[n]`.
pub fn batch_tensors<B: Backend>(
    batch: Batch,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let (n, s) = (batch.len(), batch.side);
    let images = TensorData::new(batch.images, [n, 3, s, s]);
    let labels = TensorData::new(batch.labels, [n]);
    (
        Tensor::from_data(images, device),
        Tensor::from_data(labels, device),
    )
}

/// Mean cross-entropy (with optional label smoothing) and the number of correct predictions.
pub fn loss_and_correct<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    label_smoothing: f64,
) -> (Tensor<B, 1>, usize) {
    let correct = logits
        .clone()
        .argmax(1)
        .squeeze_dim::<1>(1)
        .equal(labels.clone())
        .int()
        .sum()
        .into_scalar()
        .elem::<i64>() as usize;
    let log_probs = log_softmax(logits, 1);
    let nll = log_probs
        .clone()
        .gather(1, labels.unsqueeze_dim(1))
        .neg()
        .mean();
    let loss = if label_smoothing > 0.0 {
        let uniform = log_probs.neg().mean();
        nll * (1.0 - label_smoothing) + uniform * label_smoothing
    } else {
        nll
    };
    (loss, correct)
}

/// Threads for CPU data parallelism: `TLB_THREADS`, else one per core.
pub fn cpu_threads() -> usize {
    std::env::var("TLB_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// `model.forward` with the batch split across `threads` threads (inference only).
pub fn forward_sharded<B: Backend>(
    model: &Tlb<B>,
    images: Tensor<B, 4>,
    threads: usize,
) -> Tensor<B, 2> {
    let n = images.dims()[0];
    let per = n.div_ceil(threads.clamp(1, n.max(1)));
    if per >= n {
        return model.forward(images);
    }
    let outputs = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(per)
            .map(|s| {
                let (m, x) = (model.clone(), images.clone().narrow(0, s, per.min(n - s)));
                scope.spawn(move || m.forward(x))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("inference thread panicked"))
            .collect::<Vec<_>>()
    });
    Tensor::cat(outputs, 0)
}

/// Plain (unsmoothed) loss and accuracy of `model` on `split`, without augmentation.
/// `between_batches` runs after each batch (a server answers requests there).
pub fn evaluate<B: Backend>(
    model: &Tlb<B>,
    split: &Split,
    image_size: usize,
    batch_size: usize,
    threads: usize,
    device: &B::Device,
    between_batches: &mut dyn FnMut(),
) -> (f64, f64) {
    let plan = EpochPlan {
        batch_size,
        image_size,
        train: false,
        seed: 0,
        epoch: 0,
    };
    let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
    for batch in Loader::new(split.clone(), plan, 0, 1, 2) {
        let n = batch.len();
        let (images, labels) = batch_tensors::<B>(batch, device);
        let logits = forward_sharded(model, images, threads);
        let (loss, hits) = loss_and_correct(logits, labels, 0.0);
        loss_sum += loss.into_scalar().elem::<f64>() * n as f64;
        correct += hits;
        seen += n;
        between_batches();
    }
    (
        loss_sum / seen.max(1) as f64,
        correct as f64 / seen.max(1) as f64,
    )
}

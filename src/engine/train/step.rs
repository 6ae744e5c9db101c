//! One optimiser step's gradients, computed by replicas of the model on several threads.
//!
//! burn's autodiff keeps one graph per set of connected tensors; replicas whose parameters
//! are separate autodiff leaves (same `ParamId`s, same values) build separate graphs, so
//! their forward and backward passes run in parallel. Their gradients are summed by
//! `ParamId`, which makes the step the same as one over the whole batch.

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Int, Tensor};

use super::eval::loss_and_correct;
use crate::engine::data::mix64;
use crate::engine::model::{set_dropout_stream, Tlb};

struct Detach;

impl<B: AutodiffBackend> ModuleMapper<B> for Detach {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        param.map(|t| t.detach().require_grad())
    }
}

/// Replaces every parameter by its gradient (zeros where it has none).
struct ToGrads<'a>(&'a GradientsParams);

impl<B: Backend> ModuleMapper<B> for ToGrads<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let grad = self
            .0
            .get::<B, D>(id)
            .unwrap_or_else(|| tensor.zeros_like());
        Param::from_mapped_value(id, grad, mapper)
    }
}

/// The gradients of a step laid out as a model (each parameter replaced by its gradient), so
/// they can be read by name (`named_tensors`).
pub fn gradient_model<B: AutodiffBackend>(
    model: &Tlb<B>,
    grads: &GradientsParams,
) -> Tlb<B::InnerBackend> {
    model.valid().map(&mut ToGrads(grads))
}

/// A copy of `model` with fresh autodiff leaves: its graph is its own.
pub fn replica<B: AutodiffBackend>(model: &Tlb<B>) -> Tlb<B> {
    model.clone().map(&mut Detach)
}

/// Summed gradients, loss and hits of one step.
pub struct StepGrads {
    pub grads: GradientsParams,
    pub loss_sum: f64,
    pub correct: usize,
}

/// `images` and `labels` cut into consecutive pieces of at most `size` (no copy when one
/// piece holds everything).
fn pieces<B: AutodiffBackend>(
    images: Tensor<B, 4>,
    labels: Tensor<B, 1, Int>,
    size: usize,
) -> Vec<(Tensor<B, 4>, Tensor<B, 1, Int>)> {
    let n = images.dims()[0];
    if size >= n {
        return vec![(images, labels)];
    }
    (0..n)
        .step_by(size.max(1))
        .map(|start| {
            let len = size.min(n - start);
            (
                images.clone().narrow(0, start, len),
                labels.clone().narrow(0, start, len),
            )
        })
        .collect()
}

/// Gradients of `model` on one shard, `micro` images at a time, each micro-batch's loss
/// weighted by its share of the whole step (`total` images).
fn shard_grads<B: AutodiffBackend>(
    model: &Tlb<B>,
    images: Tensor<B, 4>,
    labels: Tensor<B, 1, Int>,
    total: usize,
    micro: usize,
    smoothing: f64,
    between_micro: &mut dyn FnMut(),
) -> StepGrads {
    let mut acc = GradientsAccumulator::<Tlb<B>>::new();
    let (mut loss_sum, mut correct) = (0.0, 0);
    let parts = pieces(images, labels, micro);
    let last = parts.len() - 1;
    for (i, (x, y)) in parts.into_iter().enumerate() {
        let len = x.dims()[0];
        let (loss, hits) = loss_and_correct(model.forward(x), y, smoothing);
        let weighted = loss.clone() * (len as f64 / total as f64);
        acc.accumulate(
            model,
            GradientsParams::from_grads(weighted.backward(), model),
        );
        loss_sum += loss.into_scalar().elem::<f64>() * len as f64;
        correct += hits;
        if i < last {
            between_micro();
        }
    }
    StepGrads {
        grads: acc.grads(),
        loss_sum,
        correct,
    }
}

/// Gradients of one step over `images`, split across `replicas` threads. Dropout masks are a
/// function of `stream` and the replica index, so the result is deterministic.
pub fn step_grads<B: AutodiffBackend>(
    model: &Tlb<B>,
    images: Tensor<B, 4>,
    labels: Tensor<B, 1, Int>,
    replicas: usize,
    micro: usize,
    smoothing: f64,
    stream: u64,
) -> StepGrads {
    step_grads_with(
        model,
        images,
        labels,
        replicas,
        micro,
        smoothing,
        stream,
        &mut || {},
    )
}

/// [`step_grads`], calling `between_micro` on this thread between micro-batches (a server
/// answers requests there, so a long accumulated step does not hold them up).
#[allow(clippy::too_many_arguments)]
pub fn step_grads_with<B: AutodiffBackend>(
    model: &Tlb<B>,
    images: Tensor<B, 4>,
    labels: Tensor<B, 1, Int>,
    replicas: usize,
    micro: usize,
    smoothing: f64,
    stream: u64,
    between_micro: &mut dyn FnMut(),
) -> StepGrads {
    let n = images.dims()[0];
    let per = n.div_ceil(replicas.clamp(1, n.max(1)));
    let micro = micro.min(per).max(1);
    if per >= n {
        set_dropout_stream(mix64(stream));
        return shard_grads(model, images, labels, n, micro, smoothing, between_micro);
    }
    let shards = pieces(images, labels, per);
    let results: Vec<StepGrads> = std::thread::scope(|scope| {
        let mut shards = shards.into_iter();
        let (x0, y0) = shards.next().expect("at least one shard");
        let handles: Vec<_> = shards
            .enumerate()
            .map(|(i, (x, y))| {
                let rep = replica(model);
                scope.spawn(move || {
                    set_dropout_stream(mix64(stream ^ (i as u64 + 1)));
                    shard_grads(&rep, x, y, n, micro, smoothing, &mut || {})
                })
            })
            .collect();
        set_dropout_stream(mix64(stream));
        let first = shard_grads(model, x0, y0, n, micro, smoothing, between_micro);
        std::iter::once(first)
            .chain(
                handles
                    .into_iter()
                    .map(|h| h.join().expect("replica thread panicked")),
            )
            .collect()
    });
    let mut acc = GradientsAccumulator::<Tlb<B>>::new();
    let (mut loss_sum, mut correct) = (0.0, 0);
    for r in results {
        acc.accumulate(model, r.grads);
        loss_sum += r.loss_sum;
        correct += r.correct;
    }
    StepGrads {
        grads: acc.grads(),
        loss_sum,
        correct,
    }
}

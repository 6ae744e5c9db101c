//! The fused block on the `flex` backend: dispatch, and the autodiff node with its backward.

use std::any::TypeId;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use super::attention::{Dims, Weights};
use super::block::{self, Saved};
use super::{interleave, parents, BlockInputs, CALLS};

type Ad = Autodiff<Flex>;

/// Whether `B` is the CPU backend this module computes on (plain or under autodiff).
pub fn is_host<B: Backend>() -> bool {
    let id = TypeId::of::<B>();
    id == TypeId::of::<Flex>() || id == TypeId::of::<Ad>()
}

/// `t` as the same tensor of backend `T` (which must be `B`).
fn same<B: Backend, T: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<T, D> {
    super::super::same_type(t)
}

/// Runs the block fused. Call only where [`enabled`] holds for `B`.
pub fn run<B: Backend>(inputs: BlockInputs<B>) -> Tensor<B, 3> {
    CALLS.with(|c| c.set(c.get() + 1));
    if TypeId::of::<B>() == TypeId::of::<Ad>() {
        same::<Ad, B, 3>(run_tracked(inputs.cast()))
    } else {
        same::<Flex, B, 3>(run_plain(inputs.cast()))
    }
}

fn dims(x: &FlexTensor, context: Option<&FlexTensor>, w1: &FlexTensor) -> Dims {
    use burn::tensor::TensorMetadata;
    let [n, tq, d] = x.shape().dims();
    let tk = context.map_or(tq, |c| c.shape().dims::<3>()[1]);
    Dims {
        n,
        tq,
        tk,
        d,
        f: w1.shape().dims::<2>()[1],
    }
}

/// The tensor itself when its values are one contiguous run (an offset is fine), else a
/// contiguous copy.
fn host(t: &FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t.clone()
    } else {
        t.to_contiguous()
    }
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("fused block: contiguous f32 tensors")
}

fn tensor(values: Vec<f32>, shape: [usize; 3]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Parameters kept alive for the backward pass, in [`interleave`]'s order.
#[derive(Clone, Debug)]
struct Params(Arc<[FlexTensor; 8]>);

impl Params {
    fn new(weights: [FlexTensor; 4], biases: [FlexTensor; 4]) -> Self {
        Self(Arc::new(interleave(weights, biases).map(|t| host(&t))))
    }

    fn w1(&self) -> &FlexTensor {
        &self.0[4]
    }

    fn weights(&self) -> Weights<'_> {
        let [wqkv, bqkv, wo, bo, w1, b1, w2, b2] = &*self.0;
        Weights {
            wqkv: slice(wqkv),
            bqkv: slice(bqkv),
            wo: slice(wo),
            bo: slice(bo),
            w1: slice(w1),
            b1: slice(b1),
            w2: slice(w2),
            b2: slice(b2),
        }
    }
}

/// The dropout masks of a training step (attention weights, FFN output), drawn in the same
/// order as the composition draws them.
fn masks(attn_p: f64, ffn_p: f64, dims: Dims) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let Dims { n, tq, tk, d, .. } = dims;
    let draw = |p: f64, len: usize| (p > 0.0).then(|| super::mask::host_mask(len, p));
    let attn = draw(attn_p, n * tq * tk);
    let ffn = draw(ffn_p, n * tq * d);
    (attn, ffn)
}

fn run_plain(i: BlockInputs<Flex>) -> Tensor<Flex, 3> {
    let prim = |t: Tensor<Flex, 3>| host(&t.into_primitive().tensor());
    let x = prim(i.x);
    let c = i.context.map(prim);
    let params = Params::new(
        i.weights.map(|t| t.into_primitive().tensor()),
        i.biases.map(|t| t.into_primitive().tensor()),
    );
    let dims = dims(&x, c.as_ref(), params.w1());
    let (out, _) = block::forward(
        slice(&x),
        c.as_ref().map(slice),
        &params.weights(),
        dims,
        (None, None),
        false,
    );
    Tensor::from_primitive(TensorPrimitive::Float(tensor(
        out,
        [dims.n, dims.tq, dims.d],
    )))
}

#[derive(Debug)]
struct FusedBlock;

#[derive(Clone, Debug)]
struct State {
    saved: Arc<Saved>,
    params: Params,
    dims: Dims,
}

impl Backward<Flex, 10> for FusedBlock {
    type State = State;

    fn backward(self, ops: Ops<State, 10>, grads: &mut Gradients, _: &mut Checkpointer) {
        let State {
            saved,
            params,
            dims,
        } = ops.state;
        let dout = host(&grads.consume::<Flex>(&ops.node));
        let g = block::backward(slice(&dout), &saved, &params.weights(), dims);
        let [px, pc, rest @ ..] = ops.parents;
        if let Some(node) = px {
            grads.register::<Flex>(node.id, tensor(g.x, [dims.n, dims.tq, dims.d]));
        }
        if let (Some(node), Some(dc)) = (pc, g.c) {
            grads.register::<Flex>(node.id, tensor(dc, [dims.n, dims.tk, dims.d]));
        }
        for ((parent, grad), like) in rest.into_iter().zip(g.params).zip(params.0.iter()) {
            if let Some(node) = parent {
                use burn::tensor::TensorMetadata;
                let data = TensorData::new(grad, like.shape());
                grads.register::<Flex>(node.id, FlexTensor::from_data(data));
            }
        }
    }
}

fn run_tracked(i: BlockInputs<Ad>) -> Tensor<Ad, 3> {
    let prim = |t: Tensor<Ad, 3>| t.into_primitive().tensor();
    let x = prim(i.x);
    let is_self = i.context.is_none();
    let c = i.context.map(prim).unwrap_or_else(|| x.clone());
    let w = i.weights.map(|t| t.into_primitive().tensor());
    let b = i.biases.map(|t| t.into_primitive().tensor());
    let node = |t: &FloatTensor<Ad>| t.node.clone();
    let nodes = parents(
        node(&x),
        node(&c),
        w.each_ref().map(node),
        b.each_ref().map(node),
    );
    let x_host = host(&x.primitive);
    let c_host = (!is_self).then(|| host(&c.primitive));
    let params = Params::new(w.map(|t| t.primitive), b.map(|t| t.primitive));
    let dims = dims(&x_host, c_host.as_ref(), params.w1());
    let masks = masks(i.attn_dropout, i.ffn_dropout, dims);
    let forward = |save| {
        block::forward(
            slice(&x_host),
            c_host.as_ref().map(slice),
            &params.weights(),
            dims,
            masks,
            save,
        )
    };
    let shape = [dims.n, dims.tq, dims.d];
    let out = match FusedBlock
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, saved) = forward(true);
            let state = State {
                saved: Arc::new(saved.expect("saved when asked")),
                params: params.clone(),
                dims,
            };
            prep.finish(state, tensor(out, shape))
        }
        OpsKind::UnTracked(prep) => prep.finish(tensor(forward(false).0, shape)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

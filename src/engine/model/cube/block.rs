//! The attention block (single head, f32) on a cube backend, forward and backward, with one
//! autodiff node for the whole block: the maths of the CPU's fused block (`fused::block`,
//! where it is written out), as CubeCL kernels ([`super::ops`]) for everything between
//! burn's matrix products.
//!
//! ```text
//! x̂ = std(x)    ĉ = std(c)                         1 kernel each
//! [Q | K | V] = [x̂ | ĉ]·Wqkv                      1 product (2 for cross-attention)
//! P, A = softmax(QKᵀ), (P ⊙ Ma)·V (biases added)   1 kernel
//! h, ĥ = x + A·Wo + bo, std(h)                     1 product, 1 kernel
//! G = gelu(ĥ·W1 + b1)                              1 product, 1 kernel
//! out = h + (G·W2 + b2) ⊙ Mf                       1 product, 1 kernel
//! ```
//!
//! Forward: 9 launches for self-attention (8 where the input comes with its standardisation,
//! a [`Hat`]) where burn's composition takes about 40; the backward computes every input's
//! gradient in about 16 where the composition's autodiff takes about 150
//! (`benches/launches.sh` counts them).

use std::sync::Arc;

use super::ops::{self, Attention, Dims};
use super::{prim, wrap, Cube, Hat, Plain};
use crate::engine::model::fused::mask::MaskKey;
use crate::engine::model::fused::{interleave, parents, BlockInputs};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// The folded parameters, in the order of the node's parents and gradients:
/// `[wqkv, bqkv, wo, bo, w1, b1, w2, b2]` (weights `[d_in, d_out]`).
#[derive(Clone, Debug)]
struct Params<B: Backend> {
    w: [Tensor<B, 2>; 4],
    b: [Tensor<B, 1>; 4],
}

/// A dropout mask's key (none without dropout).
type Mask = Option<MaskKey>;

/// What the backward pass needs from the forward pass.
#[derive(Clone)]
struct Saved<B: Plain> {
    x_hat: Tensor<B, 2>,
    x_rstd: Cube<B>,
    /// `ĉ` and its `1/σ`, for cross-attention.
    c: Option<(Tensor<B, 2>, Cube<B>)>,
    attention: Attention<B::Runtime>,
    p: Cube<B>,
    a: Tensor<B, 2>,
    h_hat: Tensor<B, 2>,
    h_rstd: Cube<B>,
    /// `ĥ·W1 + b1` and its GELU.
    ux: Cube<B>,
    g: Tensor<B, 2>,
    mask_ffn: Mask,
}

/// `(std(x), 1/σ)` of a `[rows, d]` tensor.
type Std<B> = (Cube<B>, Cube<B>);

/// The standardisation a [`Hat`] carries, where it was computed on this backend.
fn given<B: Plain>(hat: Option<&Hat>) -> Option<Std<B>> {
    hat.and_then(|h| h.0.downcast_ref::<Std<B>>().cloned())
}

/// `(std(t), 1/σ)` from `hat` where given, else computed (one launch).
fn standardized<B: Plain>(t: Tensor<B, 2>, hat: Option<&Hat>) -> Std<B> {
    given::<B>(hat).unwrap_or_else(|| {
        let d = t.dims()[1];
        ops::standardize(prim(t), d)
    })
}

/// The forward pass: `x` `[n, tq, d]`, `c` `[n, tk, d]` (cross-attention) → `[n, tq, d]`
/// with its [`Hat`], and what the backward needs when `save`. `hats`: those of `x` and `c`
/// where a block computed them.
fn forward<B: Plain>(
    x: Tensor<B, 3>,
    c: Option<Tensor<B, 3>>,
    w: &Params<B>,
    (mask_attn, mask_ffn): (Mask, Mask),
    save: bool,
    hats: [Option<&Hat>; 2],
) -> (Tensor<B, 3>, Hat, Option<Saved<B>>) {
    let dims = dims(&x, c.as_ref());
    let Dims { n, tq, tk, d, .. } = dims;
    let [wqkv, wo, w1, w2] = w.w.clone();
    let [bqkv, bo, b1, b2] = w.b.clone();
    let x = x.reshape([n * tq, d]);
    let (x_hat, x_rstd) = standardized(x.clone(), hats[0]);
    let x_hat: Tensor<B, 2> = wrap(x_hat);
    let (qs, kvs, c) = match c {
        None => (x_hat.clone().matmul(wqkv), None, None),
        Some(c) => {
            let (c_hat, c_rstd) = standardized(c.reshape([n * tk, d]), hats[1]);
            let c_hat: Tensor<B, 2> = wrap(c_hat);
            let q = x_hat.clone().matmul(wqkv.clone().narrow(1, 0, d));
            let kv = c_hat.clone().matmul(wqkv.narrow(1, d, 2 * d));
            (q, Some(prim(kv)), Some((c_hat, c_rstd)))
        }
    };
    let attention = Attention {
        qs: prim(qs),
        kvs,
        bias: prim(bqkv),
        mask: mask_attn,
    };
    let (p, a) = ops::attention(&attention, dims);
    let a: Tensor<B, 2> = wrap(a);
    let y = a.clone().matmul(wo);
    let [h, h_hat, h_rstd] = ops::residual_norm(prim(x), prim(y), prim(bo));
    let h_hat: Tensor<B, 2> = wrap(h_hat);
    let u = h_hat.clone().matmul(w1);
    let (ux, g) = super::gelu::forward(prim(u), prim(b1));
    let g: Tensor<B, 2> = wrap(g);
    let y = g.clone().matmul(w2);
    let [out, out_hat, out_rstd] = ops::ffn_out(&h, prim(y), prim(b2), mask_ffn);
    let out = wrap::<B, 2>(out).reshape([n, tq, d]);
    let hat = Hat(std::rc::Rc::new((out_hat, out_rstd)));
    let saved = save.then(|| Saved {
        x_hat,
        x_rstd,
        c,
        attention,
        p,
        a,
        h_hat,
        h_rstd,
        ux,
        g,
        mask_ffn,
    });
    (out, hat, saved)
}

fn dims<B: Backend>(x: &Tensor<B, 3>, c: Option<&Tensor<B, 3>>) -> Dims {
    let [n, tq, d] = x.dims();
    Dims {
        n,
        tq,
        tk: c.map_or(tq, |c| c.dims()[1]),
        d,
    }
}

/// The gradients of `x`, of the context (cross-attention), and of the parameters in
/// [`Params`]' order, from the output's gradient `dout` `[n, tq, d]`.
#[allow(clippy::type_complexity)]
fn backward<B: Plain>(
    dout: Tensor<B, 3>,
    s: &Saved<B>,
    w: &Params<B>,
    dims: Dims,
) -> (
    Tensor<B, 3>,
    Option<Tensor<B, 3>>,
    [Tensor<B, 2>; 4],
    [Tensor<B, 1>; 4],
) {
    let Dims { n, tq, tk, d, .. } = dims;
    let [wqkv, wo, w1, w2] = w.w.clone();
    let dout = dout.reshape([n * tq, d]);
    // FFN half: out = h + (G·W2 + b2) ⊙ Mf, G = gelu(ĥ·W1 + b1).
    let d_ffn: Tensor<B, 2> = match &s.mask_ffn {
        Some(m) => wrap(ops::masked(prim(dout.clone()), *m)),
        None => dout.clone(),
    };
    let dg = d_ffn.clone().matmul(w2.transpose());
    let du: Tensor<B, 2> = wrap(super::gelu::backward(s.ux.clone(), prim(dg)));
    let dw2 = s.g.clone().transpose().matmul(d_ffn.clone());
    let dw1 = s.h_hat.clone().transpose().matmul(du.clone());
    let dh_hat = du.clone().matmul(w1.transpose());
    let h_hat = prim(s.h_hat.clone());
    let dh = ops::standardize_backward(prim(dh_hat), &h_hat, &s.h_rstd, Some(prim(dout)));
    let dh: Tensor<B, 2> = wrap(dh);
    // Attention half: h = x + A·Wo + bo.
    let dwo = s.a.clone().transpose().matmul(dh.clone());
    let da = dh.clone().matmul(wo.transpose());
    let (dq, dkv) = ops::attention_backward(&s.attention, &s.p, prim(da), dims);
    let biases = ops::bias_grads(
        &dq,
        dkv.as_ref(),
        &prim(dh.clone()),
        &prim(du),
        &prim(d_ffn),
    );
    let [dbqkv, dbo, db1, db2] = biases.map(wrap::<B, 1>);
    let dq: Tensor<B, 2> = wrap(dq);
    let x_hat_t = s.x_hat.clone().transpose();
    let (dwqkv, dx_hat, dc) = match (dkv, &s.c) {
        (Some(dkv), Some((c_hat, c_rstd))) => {
            let dkv: Tensor<B, 2> = wrap(dkv);
            let dw = Tensor::cat(
                vec![
                    x_hat_t.matmul(dq.clone()),
                    c_hat.clone().transpose().matmul(dkv.clone()),
                ],
                1,
            );
            let dx_hat = dq.matmul(wqkv.clone().narrow(1, 0, d).transpose());
            let dc_hat = dkv.matmul(wqkv.narrow(1, d, 2 * d).transpose());
            let dc = ops::standardize_backward(prim(dc_hat), &prim(c_hat.clone()), c_rstd, None);
            (dw, dx_hat, Some(wrap::<B, 2>(dc).reshape([n, tk, d])))
        }
        _ => (
            x_hat_t.matmul(dq.clone()),
            dq.matmul(wqkv.transpose()),
            None,
        ),
    };
    let x_hat = prim(s.x_hat.clone());
    let dx = ops::standardize_backward(prim(dx_hat), &x_hat, &s.x_rstd, Some(prim(dh)));
    let dx = wrap::<B, 2>(dx).reshape([n, tq, d]);
    (dx, dc, [dwqkv, dwo, dw1, dw2], [dbqkv, dbo, db1, db2])
}

/// Inference: the block without a graph or dropout.
pub(super) fn run_plain<B: Plain>(
    i: BlockInputs<B>,
    hats: [Option<&Hat>; 2],
) -> (Tensor<B, 3>, Hat) {
    let params = Params {
        w: i.weights,
        b: i.biases,
    };
    let (out, hat, _) = forward(i.x, i.context, &params, (None, None), false, hats);
    (out, hat)
}

#[derive(Debug)]
struct CubeBlock;

#[derive(Clone)]
struct State<B: Plain> {
    saved: Arc<Saved<B>>,
    params: Params<B>,
    dims: Dims,
}

impl<B: Plain> std::fmt::Debug for State<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("dims", &self.dims)
            .finish_non_exhaustive()
    }
}

impl<B: Plain> Backward<B, 10> for CubeBlock {
    type State = State<B>;

    fn backward(self, ops: Ops<State<B>, 10>, grads: &mut Gradients, _: &mut Checkpointer) {
        let State {
            saved,
            params,
            dims,
        } = ops.state;
        let dout: Tensor<B, 3> =
            Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let (dx, dc, dw, db) = backward(dout, &saved, &params, dims);
        let [px, pc, rest @ ..] = ops.parents;
        let float = |t: Tensor<B, 3>| t.into_primitive().tensor();
        if let Some(node) = px {
            grads.register::<B>(node.id, float(dx));
        }
        if let (Some(node), Some(dc)) = (pc, dc) {
            grads.register::<B>(node.id, float(dc));
        }
        let dw = dw.map(|t| t.into_primitive().tensor());
        let db = db.map(|t| t.into_primitive().tensor());
        for (parent, grad) in rest.into_iter().zip(interleave(dw, db)) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// The key of the next dropout mask of this thread's stream (none at `p` = 0): drawn as
/// burn's composition draws it (`model::dropout`), so that both drop the same values.
fn mask(p: f64) -> Mask {
    (p > 0.0).then(|| MaskKey::next(p))
}

/// Training: the block as one autodiff node, with dropout.
pub(super) fn run_tracked<B: Plain>(
    i: BlockInputs<Autodiff<B>>,
    hats: [Option<&Hat>; 2],
) -> (Tensor<Autodiff<B>, 3>, Hat) {
    let ad = |t: Tensor<Autodiff<B>, 3>| t.into_primitive().tensor();
    let x = ad(i.x);
    let is_self = i.context.is_none();
    let c = i.context.map(ad).unwrap_or_else(|| x.clone());
    let w = i.weights.map(|t| t.into_primitive().tensor());
    let b = i.biases.map(|t| t.into_primitive().tensor());
    let node = |t: &FloatTensor<Autodiff<B>>| t.node.clone();
    let nodes = parents(
        node(&x),
        node(&c),
        w.each_ref().map(node),
        b.each_ref().map(node),
    );
    let params = Params::<B> {
        w: w.map(|t| Tensor::from_primitive(TensorPrimitive::Float(t.primitive))),
        b: b.map(|t| Tensor::from_primitive(TensorPrimitive::Float(t.primitive))),
    };
    let x: Tensor<B, 3> = Tensor::from_primitive(TensorPrimitive::Float(x.primitive));
    let c: Option<Tensor<B, 3>> =
        (!is_self).then(|| Tensor::from_primitive(TensorPrimitive::Float(c.primitive)));
    let dims = dims(&x, c.as_ref());
    let masks = (mask(i.attn_dropout), mask(i.ffn_dropout));
    let (out, hat) = match CubeBlock
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, hat, saved) = forward(x, c, &params, masks, true, hats);
            let state = State {
                saved: Arc::new(saved.expect("saved when asked")),
                params,
                dims,
            };
            (prep.finish(state, out.into_primitive().tensor()), hat)
        }
        OpsKind::UnTracked(prep) => {
            let (out, hat, _) = forward(x, c, &params, masks, false, hats);
            (prep.finish(out.into_primitive().tensor()), hat)
        }
    };
    (Tensor::from_primitive(TensorPrimitive::Float(out)), hat)
}

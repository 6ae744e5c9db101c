//! Launches of [`super::kernels`] on a cube backend's tensors: each function allocates its
//! outputs, makes its inputs contiguous and launches one kernel (`attention_backward` two).

use burn::tensor::{Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::{calculate_cube_count_elemwise, CubeCount, CubeDim};

use super::attention;
use super::kernels::{self, MaskArgsLaunch};
use crate::engine::model::fused::mask::MaskKey;

/// A mask's key as launch arguments (no mask: unread).
fn key_args<R: CubeRuntime>(key: Option<MaskKey>) -> MaskArgsLaunch<R> {
    let k = key.unwrap_or(MaskKey {
        k0: 0,
        k1: 0,
        threshold: 0,
        keep: 1.0,
    });
    MaskArgsLaunch::new(k.k0, k.k1, k.threshold, k.keep)
}

/// Sizes: `n` samples, `tq` query tokens, `tk` key tokens, width `d`.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub n: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
}

/// A new tensor of `shape`, of `like`'s dtype on its device.
pub(super) fn empty<R: CubeRuntime>(
    like: &CubeTensor<R>,
    shape: impl Into<Shape>,
) -> CubeTensor<R> {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        like.dtype,
    )
}

/// A one-value stand-in for an input a kernel's variant does not read (no mask, no base).
fn unused<R: CubeRuntime>(like: &CubeTensor<R>) -> CubeTensor<R> {
    empty(like, [1])
}

/// One unit per item, `units` of them.
pub(super) fn grid<R: CubeRuntime>(t: &CubeTensor<R>, units: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&t.client, units);
    (calculate_cube_count_elemwise(&t.client, units, dim), dim)
}

/// `(std(x), 1/σ)` row by row, `x` `[rows, d]`.
pub fn standardize<R: CubeRuntime>(x: CubeTensor<R>, d: usize) -> (CubeTensor<R>, CubeTensor<R>) {
    let x = into_contiguous(x);
    let rows = x.shape().num_elements() / d;
    let (y, rstd) = (empty(&x, x.shape()), empty(&x, [rows]));
    let (count, dim) = grid(&x, rows);
    kernels::standardize_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.clone().into_tensor_arg(),
        y.clone().into_tensor_arg(),
        rstd.clone().into_tensor_arg(),
        d,
        x.dtype.into(),
    );
    (y, rstd)
}

/// `h = x + y + bias`, `(h, std(h), 1/σ)`.
pub fn residual_norm<R: CubeRuntime>(
    x: CubeTensor<R>,
    y: CubeTensor<R>,
    bias: CubeTensor<R>,
) -> [CubeTensor<R>; 3] {
    let (x, y, bias) = (
        into_contiguous(x),
        into_contiguous(y),
        into_contiguous(bias),
    );
    let d = bias.shape().num_elements();
    let rows = x.shape().num_elements() / d;
    let (h, h_hat, rstd) = (
        empty(&x, x.shape()),
        empty(&x, x.shape()),
        empty(&x, [rows]),
    );
    let (count, dim) = grid(&x, rows);
    kernels::residual_norm_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.clone().into_tensor_arg(),
        y.into_tensor_arg(),
        bias.into_tensor_arg(),
        h.clone().into_tensor_arg(),
        h_hat.clone().into_tensor_arg(),
        rstd.clone().into_tensor_arg(),
        d,
        x.dtype.into(),
    );
    [h, h_hat, rstd]
}

/// `base + ∂std(x)/∂x · dy` (no `base`: zero), from `y = std(x)` and its `1/σ`.
pub fn standardize_backward<R: CubeRuntime>(
    dy: CubeTensor<R>,
    y: &CubeTensor<R>,
    rstd: &CubeTensor<R>,
    base: Option<CubeTensor<R>>,
) -> CubeTensor<R> {
    let dy = into_contiguous(dy);
    let rows = rstd.shape().num_elements();
    let d = dy.shape().num_elements() / rows;
    let dx = empty(&dy, dy.shape());
    let has_base = base.is_some();
    let base = base.map_or_else(|| unused(&dy), into_contiguous);
    let (count, dim) = grid(&dy, rows);
    kernels::standardize_backward_kernel::launch::<R>(
        &dy.client.clone(),
        count,
        dim,
        dy.clone().into_tensor_arg(),
        y.clone().into_tensor_arg(),
        rstd.clone().into_tensor_arg(),
        base.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        d,
        has_base,
        dy.dtype.into(),
    );
    dx
}

/// The attention's inputs: Q, K, V before their biases (self-attention: `qs` `[rows, 3d]`;
/// cross-attention: `qs` `[rows, d]` and `kvs` `[n·tk, 2d]`), the biases `[3d]`, and the key
/// of the attention dropout's mask (`[n, tq, tk]`).
#[derive(Clone, Debug)]
pub struct Attention<R: CubeRuntime> {
    pub qs: CubeTensor<R>,
    pub kvs: Option<CubeTensor<R>>,
    pub bias: CubeTensor<R>,
    pub mask: Option<MaskKey>,
}

/// The launch arguments every attention kernel shares.
struct Args<R: CubeRuntime> {
    kvs: CubeTensor<R>,
    is_self: bool,
    has_mask: bool,
}

impl<R: CubeRuntime> Attention<R> {
    fn args(&self) -> Args<R> {
        Args {
            kvs: self.kvs.clone().unwrap_or_else(|| unused(&self.qs)),
            is_self: self.kvs.is_none(),
            has_mask: self.mask.is_some(),
        }
    }
}

/// `(P, A)`: the attention weights before dropout `[n, tq, tk]` and `(P ⊙ Ma)·V`
/// `[n·tq, d]`.
pub fn attention<R: CubeRuntime>(at: &Attention<R>, dims: Dims) -> (CubeTensor<R>, CubeTensor<R>) {
    let Dims { n, tq, tk, d, .. } = dims;
    let qs = &at.qs;
    let (p, a) = (empty(qs, [n, tq, tk]), empty(qs, [n * tq, d]));
    let args = at.args();
    let (count, dim) = grid(qs, n * tq);
    attention::attention_kernel::launch::<R>(
        &qs.client.clone(),
        count,
        dim,
        qs.clone().into_tensor_arg(),
        args.kvs.into_tensor_arg(),
        at.bias.clone().into_tensor_arg(),
        key_args(at.mask),
        p.clone().into_tensor_arg(),
        a.clone().into_tensor_arg(),
        tq,
        tk,
        d,
        args.is_self,
        args.has_mask,
        qs.dtype.into(),
    );
    (p, a)
}

/// The gradients of Q, K and V from `da`, the gradient of `A`: self-attention's one
/// `[rows, 3d]` (`dQ | dK | dV`), or cross-attention's `dQ` `[rows, d]` and `[dK | dV]`
/// `[n·tk, 2d]`.
pub fn attention_backward<R: CubeRuntime>(
    at: &Attention<R>,
    p: &CubeTensor<R>,
    da: CubeTensor<R>,
    dims: Dims,
) -> (CubeTensor<R>, Option<CubeTensor<R>>) {
    let Dims { n, tq, tk, d, .. } = dims;
    let (qs, da) = (&at.qs, into_contiguous(da));
    let args = at.args();
    let ds = empty(qs, [n, tq, tk]);
    let (dq, dkv) = if args.is_self {
        let g = empty(qs, [n * tq, 3 * d]);
        (g.clone(), g)
    } else {
        (empty(qs, [n * tq, d]), empty(qs, [n * tk, 2 * d]))
    };
    let (count, dim) = grid(qs, n * tq);
    attention::attention_backward_query_kernel::launch::<R>(
        &qs.client.clone(),
        count,
        dim,
        qs.clone().into_tensor_arg(),
        args.kvs.into_tensor_arg(),
        at.bias.clone().into_tensor_arg(),
        key_args(at.mask),
        p.clone().into_tensor_arg(),
        da.clone().into_tensor_arg(),
        ds.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        tq,
        tk,
        d,
        args.is_self,
        args.has_mask,
        qs.dtype.into(),
    );
    let (count, dim) = grid(qs, n * tk);
    attention::attention_backward_key_kernel::launch::<R>(
        &qs.client.clone(),
        count,
        dim,
        qs.clone().into_tensor_arg(),
        at.bias.clone().into_tensor_arg(),
        key_args(at.mask),
        p.clone().into_tensor_arg(),
        da.into_tensor_arg(),
        ds.into_tensor_arg(),
        dkv.clone().into_tensor_arg(),
        tq,
        tk,
        d,
        args.is_self,
        args.has_mask,
        qs.dtype.into(),
    );
    (dq, (!args.is_self).then_some(dkv))
}

/// `out = h + (y + bias) ⊙ mask` (no mask: `h + y + bias`), `[out, std(out), 1/σ]`.
pub fn ffn_out<R: CubeRuntime>(
    h: &CubeTensor<R>,
    y: CubeTensor<R>,
    bias: CubeTensor<R>,
    mask: Option<MaskKey>,
) -> [CubeTensor<R>; 3] {
    let (y, bias) = (into_contiguous(y), into_contiguous(bias));
    let d = bias.shape().num_elements();
    let rows = h.shape().num_elements() / d;
    let (out, out_hat, rstd) = (empty(h, h.shape()), empty(h, h.shape()), empty(h, [rows]));
    let (count, dim) = grid(h, rows);
    kernels::ffn_out_kernel::launch::<R>(
        &h.client.clone(),
        count,
        dim,
        h.clone().into_tensor_arg(),
        y.into_tensor_arg(),
        bias.into_tensor_arg(),
        key_args(mask),
        out.clone().into_tensor_arg(),
        out_hat.clone().into_tensor_arg(),
        rstd.clone().into_tensor_arg(),
        d,
        mask.is_some(),
        h.dtype.into(),
    );
    [out, out_hat, rstd]
}

/// `g ⊙ mask`.
pub fn masked<R: CubeRuntime>(g: CubeTensor<R>, mask: MaskKey) -> CubeTensor<R> {
    let g = into_contiguous(g);
    let out = empty(&g, g.shape());
    let units = out.shape().num_elements();
    let (count, dim) = grid(&g, units);
    kernels::masked_kernel::launch::<R>(
        &g.client.clone(),
        count,
        dim,
        g.clone().into_tensor_arg(),
        key_args(Some(mask)),
        out.clone().into_tensor_arg(),
        g.dtype.into(),
    );
    out
}

/// The mask of `key` (0 or `keep`) as a tensor of `like`'s dtype on its device.
pub fn mask<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, key: MaskKey) -> CubeTensor<R> {
    let out = empty(like, shape);
    let units = out.shape().num_elements();
    let (count, dim) = grid(like, units);
    kernels::mask_kernel::launch::<R>(
        &like.client.clone(),
        count,
        dim,
        key_args(Some(key)),
        out.clone().into_tensor_arg(),
        like.dtype.into(),
    );
    out
}

/// The gradients of the block's biases `[bqkv, bo, b1, b2]` in one launch: column sums of
/// the gradients of Q, K, V (`dq` self-attention's `[rows, 3d]`, or cross-attention's
/// `[rows, d]` with `dkv` `[n·tk, 2d]`), of `h` (`dh`), of `ĥ·W1 + b1` (`du` `[rows, f]`) and
/// of the FFN's output (`d_ffn`).
pub fn bias_grads<R: CubeRuntime>(
    dq: &CubeTensor<R>,
    dkv: Option<&CubeTensor<R>>,
    dh: &CubeTensor<R>,
    du: &CubeTensor<R>,
    d_ffn: &CubeTensor<R>,
) -> [CubeTensor<R>; 4] {
    let dims = |t: &CubeTensor<R>| t.shape().dims::<2>();
    let ([_, d], [_, f]) = (dims(dh), dims(du));
    let out = [3 * d, d, f, d].map(|n| empty(dh, [n]));
    let units = 5 * d + f;
    let (count, dim) = grid(dh, units);
    let [db_qkv, db_o, db_1, db_2] = out.clone();
    let contiguous = |t: &CubeTensor<R>| into_contiguous(t.clone()).into_tensor_arg();
    kernels::bias_grads_kernel::launch::<R>(
        &dh.client.clone(),
        count,
        dim,
        contiguous(dq),
        dkv.map_or_else(|| unused(dh).into_tensor_arg(), contiguous),
        contiguous(dh),
        contiguous(du),
        contiguous(d_ffn),
        db_qkv.into_tensor_arg(),
        db_o.into_tensor_arg(),
        db_1.into_tensor_arg(),
        db_2.into_tensor_arg(),
        d,
        f,
        dkv.is_none(),
        dh.dtype.into(),
    );
    out
}

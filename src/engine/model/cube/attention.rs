//! The per-chunk attention in CubeCL: scores, softmax, dropout mask and weighted sum
//! forward, and the gradients of Q, K and V backward (`fused::attention` on the CPU).
//!
//! The chunk problems are tiny (8 queries × 8 keys × D), so one unit computes one row: no
//! shared memory, no synchronisation, and the same code on every backend CubeCL compiles to.
//! Self-attention reads Q, K and V from one `[rows, 3d]` buffer (`qs`); cross-attention reads
//! Q from `qs` `[rows, d]` and K, V from `kvs` `[n·tk, 2d]`. The projections' biases
//! `[bq | bk | bv]` are added where the values are read, so the products before need no pass
//! of their own.

use cubecl::prelude::*;

use super::kernels::{drop, MaskArgs};

/// Key (`part` 1) or value (`part` 2) `j` of sample `s`, column `c`, bias included.
#[cube]
fn key_value<F: Float>(
    qs: &Tensor<F>,
    kvs: &Tensor<F>,
    bias: &Tensor<F>,
    row: usize,
    c: usize,
    #[comptime] part: usize,
    #[comptime] d: usize,
    #[comptime] is_self: bool,
) -> F {
    let b = bias[part * d + c];
    if is_self {
        qs[row * 3 * d + part * d + c] + b
    } else {
        kvs[row * 2 * d + (part - 1) * d + c] + b
    }
}

/// Query `row`, column `c`, bias included.
#[cube]
fn query<F: Float>(
    qs: &Tensor<F>,
    bias: &Tensor<F>,
    row: usize,
    c: usize,
    #[comptime] d: usize,
    #[comptime] is_self: bool,
) -> F {
    let stride = if is_self { 3 * d } else { d };
    qs[row * stride + c] + bias[c]
}

/// One unit per query row `(s, i)`: `P = softmax(q·Kᵀ)` (scale folded into Wq) written to
/// `p` `[n, tq, tk]`, and `A = (P ⊙ Ma)·V` to `a` `[n·tq, d]`.
#[cube(launch)]
pub fn attention_kernel<F: Float>(
    qs: &Tensor<F>,
    kvs: &Tensor<F>,
    bias: &Tensor<F>,
    key: MaskArgs,
    p: &mut Tensor<F>,
    a: &mut Tensor<F>,
    #[comptime] tq: usize,
    #[comptime] tk: usize,
    #[comptime] d: usize,
    #[comptime] is_self: bool,
    #[comptime] has_mask: bool,
    #[define(F)] _dtype: StorageType,
) {
    let unit = ABSOLUTE_POS;
    if unit * tk >= p.len() {
        terminate!();
    }
    let s = unit / tq;
    let prow = unit * tk;
    let mut max = F::new(-3.0e38);
    for j in 0..tk {
        let mut acc = F::new(0.0);
        for c in 0..d {
            let k = key_value::<F>(qs, kvs, bias, s * tk + j, c, 1usize, d, is_self);
            acc += query::<F>(qs, bias, unit, c, d, is_self) * k;
        }
        p[prow + j] = acc;
        max = F::max(max, acc);
    }
    let mut sum = F::new(0.0);
    for j in 0..tk {
        let e = F::exp(p[prow + j] - max);
        p[prow + j] = e;
        sum += e;
    }
    let inv = F::new(1.0) / sum;
    for j in 0..tk {
        p[prow + j] = p[prow + j] * inv;
    }
    for c in 0..d {
        let mut acc = F::new(0.0);
        for j in 0..tk {
            let w = p[prow + j] * drop::<F>(&key, prow + j, has_mask);
            acc += w * key_value::<F>(qs, kvs, bias, s * tk + j, c, 2usize, d, is_self);
        }
        a[unit * d + c] = acc;
    }
}

/// Backward, one unit per query row `(s, i)`: `dS = P ⊙ (dP − rowsum(dP ⊙ P))` with
/// `dP = (dA·Vᵀ) ⊙ Ma`, written to `ds` `[n, tq, tk]`, and `dQ = dS·K` to `dq` (the Q
/// columns of `[rows, 3d]` for self-attention, `[rows, d]` for cross-attention).
#[cube(launch)]
pub fn attention_backward_query_kernel<F: Float>(
    qs: &Tensor<F>,
    kvs: &Tensor<F>,
    bias: &Tensor<F>,
    key: MaskArgs,
    p: &Tensor<F>,
    da: &Tensor<F>,
    ds: &mut Tensor<F>,
    dq: &mut Tensor<F>,
    #[comptime] tq: usize,
    #[comptime] tk: usize,
    #[comptime] d: usize,
    #[comptime] is_self: bool,
    #[comptime] has_mask: bool,
    #[define(F)] _dtype: StorageType,
) {
    let unit = ABSOLUTE_POS;
    if unit * tk >= p.len() {
        terminate!();
    }
    let s = unit / tq;
    let prow = unit * tk;
    let mut inner = F::new(0.0);
    for j in 0..tk {
        let mut acc = F::new(0.0);
        for c in 0..d {
            acc +=
                da[unit * d + c] * key_value::<F>(qs, kvs, bias, s * tk + j, c, 2usize, d, is_self);
        }
        let dp = acc * drop::<F>(&key, prow + j, has_mask);
        ds[prow + j] = dp;
        inner += dp * p[prow + j];
    }
    for j in 0..tk {
        ds[prow + j] = p[prow + j] * (ds[prow + j] - inner);
    }
    let stride = if is_self { 3 * d } else { d };
    for c in 0..d {
        let mut acc = F::new(0.0);
        for j in 0..tk {
            acc += ds[prow + j] * key_value::<F>(qs, kvs, bias, s * tk + j, c, 1usize, d, is_self);
        }
        dq[unit * stride + c] = acc;
    }
}

/// Backward, one unit per key row `(s, j)`: `dK = dSᵀ·Q` and `dV = (P ⊙ Ma)ᵀ·dA`, written to
/// `dkv` (the K and V columns of `[rows, 3d]` for self-attention, `[n·tk, 2d]` for
/// cross-attention).
#[cube(launch)]
pub fn attention_backward_key_kernel<F: Float>(
    qs: &Tensor<F>,
    bias: &Tensor<F>,
    key: MaskArgs,
    p: &Tensor<F>,
    da: &Tensor<F>,
    ds: &Tensor<F>,
    dkv: &mut Tensor<F>,
    #[comptime] tq: usize,
    #[comptime] tk: usize,
    #[comptime] d: usize,
    #[comptime] is_self: bool,
    #[comptime] has_mask: bool,
    #[define(F)] _dtype: StorageType,
) {
    let unit = ABSOLUTE_POS;
    if unit * tq >= p.len() {
        terminate!();
    }
    let s = unit / tk;
    let j = unit % tk;
    let (stride, k_col) = if is_self { (3 * d, d) } else { (2 * d, 0) };
    for c in 0..d {
        let mut dk = F::new(0.0);
        let mut dv = F::new(0.0);
        for i in 0..tq {
            let q_row = s * tq + i;
            let at = q_row * tk + j;
            dk += ds[at] * query::<F>(qs, bias, q_row, c, d, is_self);
            dv += p[at] * drop::<F>(&key, at, has_mask) * da[q_row * d + c];
        }
        dkv[unit * stride + k_col + c] = dk;
        dkv[unit * stride + k_col + d + c] = dv;
    }
}

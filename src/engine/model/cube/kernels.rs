//! The attention block's kernels in CubeCL, the same maths as the CPU's fused block
//! (`fused::block`, where it is written out): row standardisation (LayerNorm without its
//! affine part, which is folded into the next projection) forward and backward, the per-chunk
//! attention (scores, softmax, dropout mask, weighted sum) forward and backward, and the two
//! element-wise passes that close the block (bias + residual + norm; bias + dropout +
//! residual).
//!
//! Every tensor is contiguous and row-major. The chunk problems are tiny (8 queries × 8 keys
//! × D), so one unit computes one row: no shared memory, no synchronisation, and the same
//! code on every backend CubeCL compiles to. Self-attention reads Q, K and V from one
//! `[rows, 3d]` buffer (`qs`); cross-attention reads Q from `qs` `[rows, d]` and K, V from
//! `kvs` `[n·tk, 2d]`. The projections' biases `[bq | bk | bv]` are added where the values
//! are read, so the products before need no pass of their own.

use cubecl::prelude::*;

/// A dropout mask's key (`fused::mask::MaskKey`) as launch arguments.
#[derive(CubeType, CubeLaunch)]
pub struct MaskArgs {
    pub k0: u32,
    pub k1: u32,
    pub threshold: u32,
    pub keep: f32,
}

/// LayerNorm's epsilon (`block::LN_EPS`).
const EPS: f32 = 1e-5;

/// Standardises the row of `x` at `base` (width `d`) into `y`; returns `1/σ`.
#[cube]
fn standardize_row<F: Float>(
    x: &Tensor<F>,
    y: &mut Tensor<F>,
    base: usize,
    #[comptime] d: usize,
) -> F {
    let inv_d = F::new(1.0) / F::cast_from(d);
    let mut sum = F::new(0.0);
    for k in 0..d {
        sum += x[base + k];
    }
    let mean = sum * inv_d;
    let mut sq = F::new(0.0);
    for k in 0..d {
        let c = x[base + k] - mean;
        sq += c * c;
    }
    let r = F::new(1.0) / F::sqrt(sq * inv_d + F::new(EPS));
    for k in 0..d {
        y[base + k] = (x[base + k] - mean) * r;
    }
    r
}

/// `y = std(x)` row by row, and each row's `1/σ`.
#[cube(launch)]
pub fn standardize_kernel<F: Float>(
    x: &Tensor<F>,
    y: &mut Tensor<F>,
    rstd: &mut Tensor<F>,
    #[comptime] d: usize,
    #[define(F)] _dtype: StorageType,
) {
    let row = ABSOLUTE_POS;
    if row >= rstd.len() {
        terminate!();
    }
    rstd[row] = standardize_row::<F>(x, y, row * d, d);
}

/// `h = x + y + bias` (the attention's residual and output bias), `ĥ = std(h)`, `1/σ`.
#[cube(launch)]
pub fn residual_norm_kernel<F: Float>(
    x: &Tensor<F>,
    y: &Tensor<F>,
    bias: &Tensor<F>,
    h: &mut Tensor<F>,
    h_hat: &mut Tensor<F>,
    rstd: &mut Tensor<F>,
    #[comptime] d: usize,
    #[define(F)] _dtype: StorageType,
) {
    let row = ABSOLUTE_POS;
    if row >= rstd.len() {
        terminate!();
    }
    let base = row * d;
    for k in 0..d {
        h[base + k] = x[base + k] + y[base + k] + bias[k];
    }
    rstd[row] = standardize_row::<F>(h, h_hat, base, d);
}

/// The gradient through `y = std(x)`: `dx = base + r·(dy − mean(dy) − y·mean(dy ⊙ y))` per
/// row (`base` the residual's gradient where `has_base`).
#[cube(launch)]
pub fn standardize_backward_kernel<F: Float>(
    dy: &Tensor<F>,
    y: &Tensor<F>,
    rstd: &Tensor<F>,
    base: &Tensor<F>,
    dx: &mut Tensor<F>,
    #[comptime] d: usize,
    #[comptime] has_base: bool,
    #[define(F)] _dtype: StorageType,
) {
    let row = ABSOLUTE_POS;
    if row >= rstd.len() {
        terminate!();
    }
    let o = row * d;
    let inv_d = F::new(1.0) / F::cast_from(d);
    let mut s = F::new(0.0);
    let mut sy = F::new(0.0);
    for k in 0..d {
        let g = dy[o + k];
        s += g;
        sy += g * y[o + k];
    }
    let (mean, mean_y, r) = (s * inv_d, sy * inv_d, rstd[row]);
    for k in 0..d {
        let v = r * (dy[o + k] - mean - y[o + k] * mean_y);
        if has_base {
            dx[o + k] = base[o + k] + v;
        } else {
            dx[o + k] = v;
        }
    }
}

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

/// Wellons' "lowbias32" integer hash (`fused::mask`'s).
#[cube]
fn hash32(x: u32) -> u32 {
    let mut x = x;
    x ^= x >> 16u32;
    x *= 0x7feb_352du32;
    x ^= x >> 15u32;
    x *= 0x846c_a68bu32;
    x ^ (x >> 16u32)
}

/// Dropout factor of value `at` of a mask (0 or `keep`): the CPU's `fused::mask` function of
/// the mask's key, computed where it is needed instead of read from a mask tensor; 1 without
/// a mask.
#[cube]
fn drop<F: Float>(key: &MaskArgs, at: usize, #[comptime] has_mask: bool) -> F {
    let mut factor = F::new(1.0);
    if has_mask {
        let bits = hash32(hash32(u32::cast_from(at) ^ key.k0) + key.k1) >> 8u32;
        factor = F::cast_from(key.keep);
        if bits < key.threshold {
            factor = F::new(0.0);
        }
    }
    factor
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

/// The block's end: `out = h + (y + bias) ⊙ Mf` (FFN bias, dropout, residual).
#[cube(launch)]
pub fn ffn_out_kernel<F: Float>(
    h: &Tensor<F>,
    y: &Tensor<F>,
    bias: &Tensor<F>,
    key: MaskArgs,
    out: &mut Tensor<F>,
    #[comptime] has_mask: bool,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let v = y[i] + bias[i % bias.len()];
    out[i] = h[i] + v * drop::<F>(&key, i, has_mask);
}

/// `out = g ⊙ mask` (the gradient through a dropout).
#[cube(launch)]
pub fn masked_kernel<F: Float>(
    g: &Tensor<F>,
    key: MaskArgs,
    out: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    out[i] = g[i] * drop::<F>(&key, i, true);
}

/// `Σ` over the rows of column `c` of `t` (`w` columns), summed in blocks of 64 rows (the
/// block sums then summed) so that the rounding grows with √rows, not rows.
#[cube]
fn column_sum<F: Float>(t: &Tensor<F>, c: usize, #[comptime] w: usize) -> F {
    let rows = t.len() / w;
    let mut total = F::new(0.0);
    for block in 0..rows.div_ceil(64) {
        let start = block * 64;
        let mut end = start + 64;
        if end > rows {
            end = rows;
        }
        let mut part = F::new(0.0);
        for r in start..end {
            part += t[r * w + c];
        }
        total += part;
    }
    total
}

/// The block's four bias gradients at once, one unit per column: `[bq | bk | bv]` from the
/// gradient of Q, K, V (self-attention: `dq` `[rows, 3d]`; cross-attention: `dq` `[rows, d]`
/// and `dkv` `[n·tk, 2d]`), `bo` from `dh`, `b1` from `du` `[rows, f]`, `b2` from `d_ffn`.
#[cube(launch)]
pub fn bias_grads_kernel<F: Float>(
    dq: &Tensor<F>,
    dkv: &Tensor<F>,
    dh: &Tensor<F>,
    du: &Tensor<F>,
    d_ffn: &Tensor<F>,
    db_qkv: &mut Tensor<F>,
    db_o: &mut Tensor<F>,
    db_1: &mut Tensor<F>,
    db_2: &mut Tensor<F>,
    #[comptime] d: usize,
    #[comptime] f: usize,
    #[comptime] is_self: bool,
    #[define(F)] _dtype: StorageType,
) {
    let c = ABSOLUTE_POS;
    if c < 3 * d {
        if is_self {
            db_qkv[c] = column_sum::<F>(dq, c, 3 * d);
        } else if c < d {
            db_qkv[c] = column_sum::<F>(dq, c, d);
        } else {
            db_qkv[c] = column_sum::<F>(dkv, c - d, 2 * d);
        }
    } else if c < 4 * d {
        db_o[c - 3 * d] = column_sum::<F>(dh, c - 3 * d, d);
    } else if c < 4 * d + f {
        db_1[c - 4 * d] = column_sum::<F>(du, c - 4 * d, f);
    } else if c < 5 * d + f {
        db_2[c - 4 * d - f] = column_sum::<F>(d_ffn, c - 4 * d - f, d);
    }
}

/// The mask itself, `out[i]` = 0 or `keep`: burn's composition on a cube backend multiplies by
/// it (`model::dropout`), so that it and the block's kernels drop the same values.
#[cube(launch)]
pub fn mask_kernel<F: Float>(key: MaskArgs, out: &mut Tensor<F>, #[define(F)] _dtype: StorageType) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    out[i] = drop::<F>(&key, i, true);
}

//! The attention block's kernels in CubeCL, the same maths as the CPU's fused block
//! (`fused::block`, where it is written out): row standardisation (LayerNorm without its
//! affine part, which is folded into the next projection) forward and backward, the passes
//! that close each half of the block (bias + residual + norm; bias + dropout + residual +
//! norm), the bias gradients, and the dropout masks. The per-chunk attention is in
//! [`super::attention`].
//!
//! Every tensor is contiguous and row-major; one unit computes one row (or one column, for
//! the bias gradients): rows are short (D values), and there are many.

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
pub(super) fn drop<F: Float>(key: &MaskArgs, at: usize, #[comptime] has_mask: bool) -> F {
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

/// The block's end, one unit per row: `out = h + (y + bias) ⊙ Mf` (FFN bias, dropout,
/// residual), with `std(out)` and `1/σ` for the next block that normalises `out`.
#[cube(launch)]
pub fn ffn_out_kernel<F: Float>(
    h: &Tensor<F>,
    y: &Tensor<F>,
    bias: &Tensor<F>,
    key: MaskArgs,
    out: &mut Tensor<F>,
    out_hat: &mut Tensor<F>,
    rstd: &mut Tensor<F>,
    #[comptime] d: usize,
    #[comptime] has_mask: bool,
    #[define(F)] _dtype: StorageType,
) {
    let row = ABSOLUTE_POS;
    if row >= rstd.len() {
        terminate!();
    }
    let base = row * d;
    for k in 0..d {
        let i = base + k;
        out[i] = h[i] + (y[i] + bias[k]) * drop::<F>(&key, i, has_mask);
    }
    rstd[row] = standardize_row::<F>(out, out_hat, base, d);
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

//! The attention half of the fused block on host slices: the Q, K, V projections as one
//! buffer, the per-sample scores, softmax and weighted sum, and their gradients.
//!
//! Q, K and V come from one product with `[Wq | Wk | Wv]` `[d, 3d]` (self-attention) or two
//! (`x̂·Wq`, `ĉ·[Wk | Wv]`), and so do their gradients: fewer, wider products. The 8×8 scores
//! and weighted sums are small `gemm` calls on strided views of that buffer.

use std::borrow::Cow;

use super::kernels::{add_rows, col_sum, dot, softmax_rows};
use super::matrix::{append_product, matmul_ld, product, product_ld, Mat};

/// The block's parameters, already folded: weights `[d_in, d_out]`, biases `[d_out]`.
pub struct Weights<'a> {
    /// `[Wq | Wk | Wv]`, `[d, 3d]`, and `[bq | bk | bv]`.
    pub wqkv: &'a [f32],
    pub bqkv: &'a [f32],
    pub wo: &'a [f32],
    pub bo: &'a [f32],
    pub w1: &'a [f32],
    pub b1: &'a [f32],
    pub w2: &'a [f32],
    pub b2: &'a [f32],
}

/// Sizes: `n` samples, `tq` query tokens, `tk` key tokens, width `d`, FFN width `f`.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub n: usize,
    pub tq: usize,
    pub tk: usize,
    pub d: usize,
    pub f: usize,
}

/// Rows of `d` values starting at `base`, `stride` values apart, in a wider buffer.
#[derive(Clone, Copy, Debug)]
struct View {
    base: usize,
    stride: usize,
}

impl View {
    #[inline(always)]
    fn at(self, row: usize) -> usize {
        self.base + row * self.stride
    }
}

/// Where Q, K and V (and their gradients) sit in one buffer: self-attention's `[rows, 3d]`
/// (`Q | K | V` side by side in every row), or cross-attention's `[n·tq, d]` Q followed by
/// `[n·tk, 2d]` (`K | V`).
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    q: View,
    k: View,
    v: View,
    pub len: usize,
}

impl Layout {
    pub fn new(dims: Dims, is_self: bool) -> Self {
        let Dims { n, tq, tk, d, .. } = dims;
        let view = |base, stride| View { base, stride };
        if is_self {
            let s = 3 * d;
            Self {
                q: view(0, s),
                k: view(d, s),
                v: view(2 * d, s),
                len: n * tq * s,
            }
        } else {
            let q_len = n * tq * d;
            Self {
                q: view(0, d),
                k: view(q_len, 2 * d),
                v: view(q_len + d, 2 * d),
                len: q_len + n * tk * 2 * d,
            }
        }
    }
}

/// `[Q | K | V]` as `layout` places them (bias included); `layout` is
/// `Layout::new(dims, c_hat.is_none())`.
pub fn project(
    x_hat: &[f32],
    c_hat: Option<&[f32]>,
    w: &Weights,
    dims: Dims,
    layout: Layout,
) -> Vec<f32> {
    let Dims { n, tq, tk, d, .. } = dims;
    let mut out = Vec::with_capacity(layout.len);
    let x = Mat::dense(x_hat, d, false);
    match c_hat {
        None => {
            append_product(
                &mut out,
                n * tq,
                3 * d,
                d,
                x,
                Mat::dense(w.wqkv, 3 * d, false),
            );
            add_rows(&mut out, w.bqkv);
        }
        Some(c) => {
            let (wq, wkv) = (w.wqkv, &w.wqkv[d..]);
            let cols = |data| Mat {
                data,
                ld: 3 * d,
                t: false,
            };
            append_product(&mut out, n * tq, d, d, x, cols(wq));
            append_product(
                &mut out,
                n * tk,
                2 * d,
                d,
                Mat::dense(c, d, false),
                cols(wkv),
            );
            let (q, kv) = out.split_at_mut(n * tq * d);
            add_rows(q, &w.bqkv[..d]);
            add_rows(kv, &w.bqkv[d..]);
        }
    }
    out
}

/// Gradients through [`project`].
pub struct ProjectGrads {
    /// Of `[Wq | Wk | Wv]` and of its bias.
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub x_hat: Vec<f32>,
    /// Of `ĉ`; `None` for self-attention (it is in `x_hat`).
    pub c_hat: Option<Vec<f32>>,
}

/// The projections' backward from `g`, the gradient of [`project`]'s output.
pub fn project_backward(
    g: &[f32],
    x_hat: &[f32],
    c_hat: Option<&[f32]>,
    w: &Weights,
    dims: Dims,
) -> ProjectGrads {
    let Dims { n, tq, tk, d, .. } = dims;
    let rows = n * tq;
    let Some(c_hat) = c_hat else {
        return ProjectGrads {
            w: product(d, 3 * d, rows, x_hat, true, g, false),
            b: col_sum(g, 3 * d),
            x_hat: product(rows, d, 3 * d, g, false, w.wqkv, true),
            c_hat: None,
        };
    };
    let (gq, gkv) = g.split_at(rows * d);
    let (gq, gkv) = (Mat::dense(gq, d, false), Mat::dense(gkv, 2 * d, false));
    let ctx_rows = n * tk;
    let mut dw = vec![0.0f32; 3 * d * d];
    let x_t = Mat::dense(x_hat, d, true);
    matmul_ld(d, d, rows, x_t, gq, &mut dw, 3 * d, false);
    let c_t = Mat::dense(c_hat, d, true);
    matmul_ld(d, 2 * d, ctx_rows, c_t, gkv, &mut dw[d..], 3 * d, false);
    let mut db = col_sum(gq.data, d);
    db.extend(col_sum(gkv.data, 2 * d));
    let cols_t = |data| Mat {
        data,
        ld: 3 * d,
        t: true,
    };
    ProjectGrads {
        w: dw,
        b: db,
        x_hat: product_ld(rows, d, d, gq, cols_t(w.wqkv)),
        c_hat: Some(product_ld(ctx_rows, d, 2 * d, gkv, cols_t(&w.wqkv[d..]))),
    }
}

/// Rows `first..` of `view` in `qkv` as a matrix operand (transposed when `t`).
fn rows(qkv: &[f32], view: View, first: usize, t: bool) -> Mat<'_> {
    Mat {
        data: &qkv[view.at(first)..],
        ld: view.stride,
        t,
    }
}

/// `P·V` per sample (`p` `[n, tq, tk]`, V in `qkv` at `l.v`) → `[n·tq, d]`.
pub fn weighted_sum(p: &[f32], qkv: &[f32], l: Layout, dims: Dims) -> Vec<f32> {
    let Dims { n, tq, tk, d, .. } = dims;
    let mut out = Vec::with_capacity(n * tq * d);
    for (i, ps) in p.chunks_exact(tq * tk).enumerate() {
        let v = rows(qkv, l.v, i * tk, false);
        append_product(&mut out, tq, d, tk, Mat::dense(ps, tk, false), v);
    }
    out
}

/// Scores `Q·Kᵀ` per sample (Q, K in `qkv` at `l.q`, `l.k`), softmax over the keys:
/// `[n, tq, tk]`.
pub fn attention_weights(qkv: &[f32], l: Layout, dims: Dims) -> Vec<f32> {
    let Dims { n, tq, tk, d, .. } = dims;
    let mut p = vec![0.0f32; n * tq * tk];
    for (i, ps) in p.chunks_exact_mut(tq * tk).enumerate() {
        let (q, k) = (rows(qkv, l.q, i * tq, false), rows(qkv, l.k, i * tk, true));
        matmul_ld(tq, tk, d, q, k, ps, tk, false);
    }
    softmax_rows(&mut p, tk);
    p
}

/// `x ⊙ mask`, or `x` itself without a mask (no copy).
pub fn apply_mask<'a>(x: &'a [f32], mask: Option<&[f32]>) -> Cow<'a, [f32]> {
    match mask {
        Some(m) => Cow::Owned(x.iter().zip(m).map(|(a, b)| a * b).collect()),
        None => Cow::Borrowed(x),
    }
}

/// Gradients of `Q`, `K`, `V` (placed as `l` places them) from the gradient of
/// `A = (P ⊙ Ma)·V` (`da` `[n·tq, d]`).
pub fn attention_backward(
    da: &[f32],
    p: &[f32],
    mask_attn: Option<&[f32]>,
    qkv: &[f32],
    l: Layout,
    dims: Dims,
) -> Vec<f32> {
    let Dims { n, tq, tk, d, .. } = dims;
    let mut g = vec![0.0f32; l.len];
    let mut dp = vec![0.0f32; tq * tk];
    for i in 0..n {
        let po = i * tq * tk;
        let p = &p[po..po + tq * tk];
        let mask = mask_attn.map(|m| &m[po..po + tq * tk]);
        let pm = apply_mask(p, mask);
        let da = Mat::dense(&da[i * tq * d..], d, false);
        // dPm = dA·Vᵀ; dV = Pmᵀ·dA.
        matmul_ld(
            tq,
            tk,
            d,
            da,
            rows(qkv, l.v, i * tk, true),
            &mut dp,
            tk,
            false,
        );
        let pm_t = Mat::dense(&pm, tk, true);
        matmul_ld(
            tk,
            d,
            tq,
            pm_t,
            da,
            &mut g[l.v.at(i * tk)..],
            l.v.stride,
            false,
        );
        // dP = dPm ⊙ Ma; softmax backward: dS = P ⊙ (dP − rowsum(dP ⊙ P)).
        if let Some(m) = mask {
            dp.iter_mut().zip(m).for_each(|(g, m)| *g *= m);
        }
        for (dprow, prow) in dp.chunks_exact_mut(tk).zip(p.chunks_exact(tk)) {
            let inner = dot(dprow, prow);
            dprow
                .iter_mut()
                .zip(prow)
                .for_each(|(g, pv)| *g = pv * (*g - inner));
        }
        // dQ = dS·K; dK = dSᵀ·Q.
        let (ds, ds_t) = (Mat::dense(&dp, tk, false), Mat::dense(&dp, tk, true));
        let k = rows(qkv, l.k, i * tk, false);
        matmul_ld(
            tq,
            d,
            tk,
            ds,
            k,
            &mut g[l.q.at(i * tq)..],
            l.q.stride,
            false,
        );
        let q = rows(qkv, l.q, i * tq, false);
        matmul_ld(
            tk,
            d,
            tq,
            ds_t,
            q,
            &mut g[l.k.at(i * tk)..],
            l.k.stride,
            false,
        );
    }
    g
}

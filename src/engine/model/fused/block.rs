//! One attention block (single head), forward and backward, on host slices.
//!
//! The same maths as [`super::super::block::FoldedBlock`]'s composition of burn ops, with the
//! norms' affine parts already folded into the projections:
//!
//! ```text
//! x̂ = std(x)                 ĉ = std(c)  (ĉ = x̂ for self-attention)
//! [Q | K | V] = [x̂·Wq | ĉ·Wk | ĉ·Wv] + [bq | bk | bv]                 (Wq carries 1/√d)
//! P = softmax(Q·Kᵀ)          A = (P ⊙ Ma)·V                           (per sample)
//! h = x + A·Wo + bo
//! U = std(h)·W1 + b1         out = h + (gelu(U)·W2 + b2) ⊙ Mf
//! ```
//!
//! `Ma`, `Mf` are the dropout masks (0 or 1/(1−p)), absent outside training. The three
//! projections are one product with `[Wq | Wk | Wv]` `[d, 3d]` (self-attention) or two
//! (`x̂·Wq`, `ĉ·[Wk | Wv]`), and so are their gradients: fewer, wider products.

use std::borrow::Cow;

use super::gelu::{bias_gelu, bias_gelu_in_place, gelu_and_backward};
use super::kernels::{
    add_rows, append_product, col_sum, dot, linear, matmul, matmul_ld, product, product_ld,
    softmax_rows, standardize, standardize_backward, with_bias, Mat,
};

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
struct Layout {
    q: View,
    k: View,
    v: View,
    len: usize,
}

impl Layout {
    fn new(dims: Dims, is_self: bool) -> Self {
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

/// What the backward pass needs from the forward pass.
#[derive(Default)]
pub struct Saved {
    x_hat: Vec<f32>,
    x_rstd: Vec<f32>,
    /// Standardised context and its statistics; empty for self-attention (then `x_hat`).
    c_hat: Vec<f32>,
    c_rstd: Vec<f32>,
    /// Q, K and V as [`Layout`] places them.
    qkv: Vec<f32>,
    /// Attention weights before dropout, `[n, tq, tk]`.
    p: Vec<f32>,
    mask_attn: Option<Vec<f32>>,
    /// `(P ⊙ Ma)·V`, `[n·tq, d]`.
    a: Vec<f32>,
    h_hat: Vec<f32>,
    h_rstd: Vec<f32>,
    u: Vec<f32>,
    mask_ffn: Option<Vec<f32>>,
}

impl std::fmt::Debug for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Sizes only: the buffers hold megabytes.
        f.debug_struct("Saved")
            .field("self_attention", &self.c_hat.is_empty())
            .field(
                "values",
                &(self.x_hat.len() + self.c_hat.len() + self.u.len()),
            )
            .finish_non_exhaustive()
    }
}

/// Gradients of every input of [`forward`], in its order.
pub struct Grads {
    pub x: Vec<f32>,
    /// Gradient of the context; `None` for self-attention (it is in `x`).
    pub c: Option<Vec<f32>>,
    /// `[wqkv, bqkv, wo, bo, w1, b1, w2, b2]`.
    pub params: [Vec<f32>; 8],
}

/// `[Q | K | V]` as [`Layout`] places them (bias included).
fn project(x_hat: &[f32], c_hat: Option<&[f32]>, w: &Weights, dims: Dims) -> Vec<f32> {
    let Dims { n, tq, tk, d, .. } = dims;
    let layout = Layout::new(dims, c_hat.is_none());
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
struct ProjectGrads {
    /// Of `[Wq | Wk | Wv]` and of its bias.
    w: Vec<f32>,
    b: Vec<f32>,
    x_hat: Vec<f32>,
    /// Of `ĉ`; `None` for self-attention (it is in `x_hat`).
    c_hat: Option<Vec<f32>>,
}

/// The projections' backward from `g`, the gradient of [`project`]'s output.
fn project_backward(g: &[f32], s: &Saved, w: &Weights, dims: Dims) -> ProjectGrads {
    let Dims { n, tq, tk, d, .. } = dims;
    let rows = n * tq;
    if s.c_hat.is_empty() {
        return ProjectGrads {
            w: product(d, 3 * d, rows, &s.x_hat, true, g, false),
            b: col_sum(g, 3 * d),
            x_hat: product(rows, d, 3 * d, g, false, w.wqkv, true),
            c_hat: None,
        };
    }
    let (gq, gkv) = g.split_at(rows * d);
    let (gq, gkv) = (Mat::dense(gq, d, false), Mat::dense(gkv, 2 * d, false));
    let ctx_rows = n * tk;
    let mut dw = vec![0.0f32; 3 * d * d];
    let x_t = Mat::dense(&s.x_hat, d, true);
    matmul_ld(d, d, rows, x_t, gq, &mut dw, 3 * d, false);
    let c_t = Mat::dense(&s.c_hat, d, true);
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
fn weighted_sum(p: &[f32], qkv: &[f32], l: Layout, dims: Dims) -> Vec<f32> {
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
fn attention_weights(qkv: &[f32], l: Layout, dims: Dims) -> Vec<f32> {
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
fn apply_mask<'a>(x: &'a [f32], mask: Option<&[f32]>) -> Cow<'a, [f32]> {
    match mask {
        Some(m) => Cow::Owned(x.iter().zip(m).map(|(a, b)| a * b).collect()),
        None => Cow::Borrowed(x),
    }
}

/// Gradients of `Q`, `K`, `V` (placed as `l` places them) from the gradient of
/// `A = (P ⊙ Ma)·V` (`da` `[n·tq, d]`).
fn attention_backward(da: &[f32], s: &Saved, l: Layout, dims: Dims) -> Vec<f32> {
    let Dims { n, tq, tk, d, .. } = dims;
    let mut g = vec![0.0f32; l.len];
    let mut dp = vec![0.0f32; tq * tk];
    for i in 0..n {
        let po = i * tq * tk;
        let p = &s.p[po..po + tq * tk];
        let mask = s.mask_attn.as_ref().map(|m| &m[po..po + tq * tk]);
        let pm = apply_mask(p, mask);
        let da = Mat::dense(&da[i * tq * d..], d, false);
        // dPm = dA·Vᵀ; dV = Pmᵀ·dA.
        matmul_ld(
            tq,
            tk,
            d,
            da,
            rows(&s.qkv, l.v, i * tk, true),
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
        let k = rows(&s.qkv, l.k, i * tk, false);
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
        let q = rows(&s.qkv, l.q, i * tq, false);
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

/// The block's output `[n·tq, d]`, and what its backward pass needs when `save`.
/// `c` is `None` for self-attention.
pub fn forward(
    x: &[f32],
    c: Option<&[f32]>,
    w: &Weights,
    dims: Dims,
    masks: (Option<Vec<f32>>, Option<Vec<f32>>),
    save: bool,
) -> (Vec<f32>, Option<Saved>) {
    let Dims { n, tq, d, f, .. } = dims;
    let rows = n * tq;
    let (x_hat, x_rstd) = standardize(x, d);
    let (c_hat, c_rstd) = match c {
        Some(c) => standardize(c, d),
        None => (Vec::new(), Vec::new()),
    };
    let layout = Layout::new(dims, c.is_none());
    let qkv = project(&x_hat, c.is_some().then_some(&c_hat[..]), w, dims);

    let p = attention_weights(&qkv, layout, dims);
    let (mask_attn, mask_ffn) = masks;
    let a = weighted_sum(&apply_mask(&p, mask_attn.as_deref()), &qkv, layout, dims);

    // h = x + A·Wo + bo: `x + bo` written once, the product added onto it.
    let mut h = with_bias(x, w.bo);
    matmul(rows, d, d, &a, false, w.wo, false, &mut h, true);
    let (h_hat, h_rstd) = standardize(&h, d);
    // U = ĥ·W1 + b1, the bias added in the GELU's pass. Training keeps U for the backward
    // pass; inference overwrites it.
    let mut u = product(rows, f, d, &h_hat, false, w.w1, false);
    let g = if save {
        bias_gelu(&mut u, w.b1)
    } else {
        bias_gelu_in_place(&mut u, w.b1);
        std::mem::take(&mut u)
    };
    let mut out = h;
    match &mask_ffn {
        Some(m) => {
            let ffn = linear(&g, rows, w.w2, w.b2);
            out.iter_mut()
                .zip(ffn.iter().zip(m))
                .for_each(|(o, (y, k))| *o += y * k);
        }
        // Without dropout the FFN's product is added straight onto the residual.
        None => {
            add_rows(&mut out, w.b2);
            matmul(rows, d, f, &g, false, w.w2, false, &mut out, true);
        }
    }
    let saved = save.then_some(Saved {
        x_hat,
        x_rstd,
        c_hat,
        c_rstd,
        qkv,
        p,
        mask_attn,
        a,
        h_hat,
        h_rstd,
        u,
        mask_ffn,
    });
    debug_assert_eq!(g.len(), rows * f);
    (out, saved)
}

/// Gradients of every input given the output's gradient `dout` `[n·tq, d]`.
pub fn backward(dout: &[f32], s: &Saved, w: &Weights, dims: Dims) -> Grads {
    let Dims { n, tq, tk, d, f } = dims;
    let rows = n * tq;
    let layout = Layout::new(dims, s.c_hat.is_empty());

    // FFN half: out = h + (gelu(U)·W2 + b2) ⊙ Mf.
    let d_ffn = apply_mask(dout, s.mask_ffn.as_deref());
    let mut dg = product(rows, f, d, &d_ffn, false, w.w2, true);
    let g = gelu_and_backward(&s.u, &mut dg); // dg is now dU
    let du = dg;
    let dw2 = product(f, d, rows, &g, true, &d_ffn, false);
    let db2 = col_sum(&d_ffn, d);
    let dw1 = product(d, f, rows, &s.h_hat, true, &du, false);
    let db1 = col_sum(&du, f);
    let dh_hat = product(rows, d, f, &du, false, w.w1, true);
    let mut dh = dout.to_vec();
    standardize_backward(&dh_hat, &s.h_hat, &s.h_rstd, d, &mut dh);

    // Attention half: h = x + A·Wo + bo.
    let dwo = product(d, d, rows, &s.a, true, &dh, false);
    let dbo = col_sum(&dh, d);
    let da = product(rows, d, d, &dh, false, w.wo, true);
    let dqkv = attention_backward(&da, s, layout, dims);
    let proj = project_backward(&dqkv, s, w, dims);

    let mut dx = dh; // the residual
    let dc = proj.c_hat.map(|dc_hat| {
        let mut dc = vec![0.0f32; n * tk * d];
        standardize_backward(&dc_hat, &s.c_hat, &s.c_rstd, d, &mut dc);
        dc
    });
    standardize_backward(&proj.x_hat, &s.x_hat, &s.x_rstd, d, &mut dx);
    Grads {
        x: dx,
        c: dc,
        params: [proj.w, proj.b, dwo, dbo, dw1, db1, dw2, db2],
    }
}

//! One attention block (single head), forward and backward, on host slices.
//!
//! The same maths as [`super::super::block::FoldedBlock`]'s composition of burn ops, with the
//! norms' affine parts already folded into the projections:
//!
//! ```text
//! x̂ = std(x)                 ĉ = std(c)  (ĉ = x̂ for self-attention)
//! Q = x̂·Wq + bq              K = ĉ·Wk + bk        V = ĉ·Wv + bv      (Wq carries 1/√d)
//! P = softmax(Q·Kᵀ)          A = (P ⊙ Ma)·V                           (per sample)
//! h = x + A·Wo + bo
//! U = std(h)·W1 + b1         out = h + (gelu(U)·W2 + b2) ⊙ Mf
//! ```
//!
//! `Ma`, `Mf` are the dropout masks (0 or 1/(1−p)), absent outside training.

use std::borrow::Cow;

use super::kernels::{
    bias_gelu, bias_gelu_in_place, col_sum, dot, gelu_and_backward, linear, matmul, multiversion,
    product, softmax_rows, standardize, standardize_backward,
};

/// The block's parameters, already folded: weights `[d_in, d_out]`, biases `[d_out]`.
pub struct Weights<'a> {
    pub wq: &'a [f32],
    pub bq: &'a [f32],
    pub wk: &'a [f32],
    pub bk: &'a [f32],
    pub wv: &'a [f32],
    pub bv: &'a [f32],
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

/// What the backward pass needs from the forward pass.
#[derive(Default)]
pub struct Saved {
    x_hat: Vec<f32>,
    x_rstd: Vec<f32>,
    /// Standardised context and its statistics; empty for self-attention (then `x_hat`).
    c_hat: Vec<f32>,
    c_rstd: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
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
    /// `[wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2]`.
    pub params: [Vec<f32>; 12],
}

multiversion! {
/// `P·V` per sample (`p` `[n, tq, tk]`, `v` `[n·tk, d]`) → `[n·tq, d]`.
fn weighted_sum(p: &[f32], v: &[f32], dims: Dims) -> Vec<f32> {
    let Dims { tq, tk, d, .. } = dims;
    let mut out = vec![0.0f32; dims.n * tq * d];
    for ((ps, vs), os) in p
        .chunks_exact(tq * tk)
        .zip(v.chunks_exact(tk * d))
        .zip(out.chunks_exact_mut(tq * d))
    {
        for (prow, orow) in ps.chunks_exact(tk).zip(os.chunks_exact_mut(d)) {
            for (&w, vrow) in prow.iter().zip(vs.chunks_exact(d)) {
                for (o, x) in orow.iter_mut().zip(vrow) {
                    *o += w * x;
                }
            }
        }
    }
    out
}
}

multiversion! {
/// Scores `Q·Kᵀ` per sample (`q` `[n·tq, d]`, `k` `[n·tk, d]`), softmax over the keys:
/// `[n, tq, tk]`.
fn attention_weights(q: &[f32], k: &[f32], dims: Dims) -> Vec<f32> {
    let Dims { n, tq, tk, d, .. } = dims;
    let mut p = vec![0.0f32; n * tq * tk];
    for ((ps, qs), ks) in p
        .chunks_exact_mut(tq * tk)
        .zip(q.chunks_exact(tq * d))
        .zip(k.chunks_exact(tk * d))
    {
        for (prow, qrow) in ps.chunks_exact_mut(tk).zip(qs.chunks_exact(d)) {
            for (s, krow) in prow.iter_mut().zip(ks.chunks_exact(d)) {
                *s = dot(qrow, krow);
            }
        }
    }
    softmax_rows(&mut p, tk);
    p
}
}

/// `x ⊙ mask`, or `x` itself without a mask (no copy).
fn apply_mask<'a>(x: &'a [f32], mask: Option<&Vec<f32>>) -> Cow<'a, [f32]> {
    match mask {
        Some(m) => Cow::Owned(x.iter().zip(m).map(|(a, b)| a * b).collect()),
        None => Cow::Borrowed(x),
    }
}

multiversion! {
/// Gradients of `Q`, `K`, `V` from the gradient of `A = (P ⊙ Ma)·V` (`da` `[n·tq, d]`).
fn attention_backward(da: &[f32], s: &Saved, dims: Dims) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { n, tq, tk, d, .. } = dims;
    let mut dq = vec![0.0f32; n * tq * d];
    let mut dk = vec![0.0f32; n * tk * d];
    let mut dv = vec![0.0f32; n * tk * d];
    let mut dp = vec![0.0f32; tq * tk];
    for i in 0..n {
        let (qo, ko) = (i * tq * d, i * tk * d);
        let po = i * tq * tk;
        let p = &s.p[po..po + tq * tk];
        let das = &da[qo..qo + tq * d];
        let vs = &s.v[ko..ko + tk * d];
        // dPm = dA·Vᵀ; dV = Pmᵀ·dA; dP = dPm ⊙ Ma.
        for (r, (dprow, darow)) in dp.chunks_exact_mut(tk).zip(das.chunks_exact(d)).enumerate() {
            for (j, (dpj, vrow)) in dprow.iter_mut().zip(vs.chunks_exact(d)).enumerate() {
                let m = s.mask_attn.as_ref().map_or(1.0, |m| m[po + r * tk + j]);
                *dpj = dot(darow, vrow) * m;
                let weight = p[r * tk + j] * m;
                let dvrow = &mut dv[ko + j * d..ko + (j + 1) * d];
                dvrow
                    .iter_mut()
                    .zip(darow)
                    .for_each(|(o, g)| *o += weight * g);
            }
        }
        // Softmax backward: dS = P ⊙ (dP − rowsum(dP ⊙ P)); then dQ = dS·K, dK = dSᵀ·Q.
        for r in 0..tq {
            let prow = &p[r * tk..(r + 1) * tk];
            let dprow = &mut dp[r * tk..(r + 1) * tk];
            let inner = dot(dprow, prow);
            dprow
                .iter_mut()
                .zip(prow)
                .for_each(|(g, pv)| *g = pv * (*g - inner));
            let qrow = &s.q[qo + r * d..qo + (r + 1) * d];
            for (j, &ds) in dprow.iter().enumerate() {
                let krow = &s.k[ko + j * d..ko + (j + 1) * d];
                let dqrow = &mut dq[qo + r * d..qo + (r + 1) * d];
                dqrow.iter_mut().zip(krow).for_each(|(o, kv)| *o += ds * kv);
                let dkrow = &mut dk[ko + j * d..ko + (j + 1) * d];
                dkrow.iter_mut().zip(qrow).for_each(|(o, qv)| *o += ds * qv);
            }
        }
    }

    (dq, dk, dv)
}
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
    let Dims { n, tq, tk, d, f } = dims;
    let (x_hat, x_rstd) = standardize(x, d);
    let (c_hat, c_rstd) = match c {
        Some(c) => standardize(c, d),
        None => (Vec::new(), Vec::new()),
    };
    let ctx = if c.is_some() { &c_hat } else { &x_hat };
    let q = linear(&x_hat, n * tq, w.wq, w.bq);
    let k = linear(ctx, n * tk, w.wk, w.bk);
    let v = linear(ctx, n * tk, w.wv, w.bv);

    let p = attention_weights(&q, &k, dims);
    let (mask_attn, mask_ffn) = masks;
    let a = weighted_sum(&apply_mask(&p, mask_attn.as_ref()), &v, dims);

    let mut h = linear(&a, n * tq, w.wo, w.bo);
    h.iter_mut().zip(x).for_each(|(o, xi)| *o += xi);
    let (h_hat, h_rstd) = standardize(&h, d);
    // U = ĥ·W1 + b1, the bias added in the GELU's pass. Training keeps U for the backward
    // pass; inference overwrites it.
    let mut u = product(n * tq, f, d, &h_hat, false, w.w1, false);
    let g = if save {
        bias_gelu(&mut u, w.b1)
    } else {
        bias_gelu_in_place(&mut u, w.b1);
        std::mem::take(&mut u)
    };
    let ffn = linear(&g, n * tq, w.w2, w.b2);
    let mut out = h;
    match &mask_ffn {
        Some(m) => out
            .iter_mut()
            .zip(ffn.iter().zip(m))
            .for_each(|(o, (y, k))| *o += y * k),
        None => out.iter_mut().zip(&ffn).for_each(|(o, y)| *o += y),
    }
    let saved = save.then_some(Saved {
        x_hat,
        x_rstd,
        c_hat,
        c_rstd,
        q,
        k,
        v,
        p,
        mask_attn,
        a,
        h_hat,
        h_rstd,
        u,
        mask_ffn,
    });
    debug_assert_eq!(g.len(), n * tq * f);
    (out, saved)
}

/// Gradients of every input given the output's gradient `dout` `[n·tq, d]`.
pub fn backward(dout: &[f32], s: &Saved, w: &Weights, dims: Dims) -> Grads {
    let Dims { n, tq, tk, d, f } = dims;
    let rows = n * tq;
    let is_self = s.c_hat.is_empty();
    let ctx = if is_self { &s.x_hat } else { &s.c_hat };

    // FFN half: out = h + (gelu(U)·W2 + b2) ⊙ Mf.
    let d_ffn = apply_mask(dout, s.mask_ffn.as_ref());
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

    let (dq, dk, dv) = attention_backward(&da, s, dims);

    // Projections back to the standardised inputs.
    let ctx_rows = n * tk;
    let dwq = product(d, d, rows, &s.x_hat, true, &dq, false);
    let dwk = product(d, d, ctx_rows, ctx, true, &dk, false);
    let dwv = product(d, d, ctx_rows, ctx, true, &dv, false);
    let (dbq, dbk, dbv) = (col_sum(&dq, d), col_sum(&dk, d), col_sum(&dv, d));
    let mut dx_hat = product(rows, d, d, &dq, false, w.wq, true);
    let mut dc_hat = product(ctx_rows, d, d, &dk, false, w.wk, true);
    matmul(ctx_rows, d, d, &dv, false, w.wv, true, &mut dc_hat, true);

    let mut dx = dh; // the residual
    let dc = if is_self {
        dx_hat.iter_mut().zip(&dc_hat).for_each(|(a, b)| *a += b);
        None
    } else {
        let mut dc = vec![0.0f32; ctx_rows * d];
        standardize_backward(&dc_hat, &s.c_hat, &s.c_rstd, d, &mut dc);
        Some(dc)
    };
    standardize_backward(&dx_hat, &s.x_hat, &s.x_rstd, d, &mut dx);
    Grads {
        x: dx,
        c: dc,
        params: [dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, dw1, db1, dw2, db2],
    }
}

//! One attention block (single head), forward and backward, on host slices.
//!
//! The same maths as [`FoldedBlock`](crate::engine::model::FoldedBlock)'s composition of burn ops, with the
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
//! `Ma`, `Mf` are the dropout masks (0 or 1/(1−p)), absent outside training. The attention
//! half (projections, scores, weighted sum) is in [`super::attention`].

use super::attention::{
    apply_mask, attention_backward, attention_weights, project, project_backward, weighted_sum,
    Dims, Layout, Weights,
};
use super::gelu::{bias_gelu, bias_gelu_in_place, gelu_and_backward};
use super::kernels::{add_rows, col_sum, linear, standardize, standardize_backward, with_bias};
use super::matrix::{matmul, product};

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
    let qkv = project(&x_hat, c.is_some().then_some(&c_hat[..]), w, dims, layout);

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
    let mask_attn = s.mask_attn.as_deref();
    let dqkv = attention_backward(&da, &s.p, mask_attn, &s.qkv, layout, dims);
    let c_hat = (!s.c_hat.is_empty()).then_some(&s.c_hat[..]);
    let proj = project_backward(&dqkv, &s.x_hat, c_hat, w, dims);

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

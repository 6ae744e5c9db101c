//! The one attention block the whole model is built from (pre-norm attention + FFN).
//!
//! Every LayerNorm here feeds straight into a linear projection, so its affine part is folded
//! into that projection: `LN(x)·W + b = x̂·(diag(γ)·W) + (β·W + b)` with `x̂` the standardised
//! input. The maths (and the parameters, which stay separate) is exactly the paper's block;
//! the fold saves the affine pass over the activations for every norm, and computes the
//! normalisation statistics once for query, key and value (self-attention) or for key and
//! value (cross-attention). In burn's composition Q, K and V stay separate matmuls (a fused
//! QKV matmul must be cut apart again, and the backward of each cut writes a zero-filled
//! full-width gradient); the fused CPU block takes them as one `[Wq | Wk | Wv]`, concatenated
//! once per fold, and cuts nothing.

use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{backend::Backend, Tensor};

use super::dropout::dropout;

pub use super::fused::kernels::LN_EPS;

/// Projection without its own normalisation: `x·W + b`, weights stored `[d_in, d_out]`.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> Projection<B> {
    /// Glorot-uniform weights (as Keras, which the reference results come from), zero bias.
    pub fn new(d_in: usize, d_out: usize, device: &B::Device) -> Self {
        let weight = Initializer::XavierUniform { gain: 1.0 }.init_with(
            [d_in, d_out],
            Some(d_in),
            Some(d_out),
            device,
        );
        Self {
            weight,
            bias: Param::from_tensor(Tensor::zeros([d_out], device)),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        linear_rows(x, self.weight.val(), Some(self.bias.val()))
    }

    /// `(W', b')` such that `x̂·W' + b' = LN(x)·W + b`, optionally scaled by `scale`.
    fn folded(&self, norm: &LayerNorm<B>, scale: f64) -> Affine<B> {
        let w = self.weight.val();
        let gamma = norm.gamma.val();
        let beta = norm
            .beta
            .as_ref()
            .expect("layer norms are built with a bias")
            .val();
        let w_eff = gamma.unsqueeze_dim::<2>(1) * w.clone();
        let b_eff = beta.unsqueeze_dim::<2>(0).matmul(w).squeeze_dim::<1>(0) + self.bias.val();
        if scale == 1.0 {
            Affine(w_eff, b_eff)
        } else {
            Affine(w_eff * scale, b_eff * scale)
        }
    }
}

/// `x̂ → x̂·W + b`: a projection with its LayerNorm's affine part folded in.
#[derive(Clone, Debug)]
pub struct Affine<B: Backend>(Tensor<B, 2>, Tensor<B, 1>);

impl<B: Backend> Affine<B> {
    /// `[W₁ | W₂ | …]` and `[b₁ | b₂ | …]`: the projections side by side.
    fn concat(parts: [&Self; 3]) -> Self {
        Self(
            Tensor::cat(parts.iter().map(|a| a.0.clone()).collect(), 1),
            Tensor::cat(parts.iter().map(|a| a.1.clone()).collect(), 0),
        )
    }

    fn apply(&self, x_hat: Tensor<B, 3>) -> Tensor<B, 3> {
        linear_rows(x_hat, self.0.clone(), Some(self.1.clone()))
    }

    /// `gelu(x̂·W + b)`: the bias and GELU as one fused kernel where the backend has it
    /// ([`super::cube`]), else [`Self::apply`] and burn's GELU.
    fn apply_gelu(&self, x_hat: Tensor<B, 3>) -> Tensor<B, 3> {
        if super::cube::gelu_applies::<B>(x_hat.dtype()) {
            let u = linear_rows(x_hat, self.0.clone(), None);
            super::cube::bias_gelu(u, self.1.clone())
        } else {
            gelu(self.apply(x_hat))
        }
    }
}

/// `x·W + b` over the last dimension, computed on `x` viewed as one `[rows, d_in]` matrix:
/// the weight gradient is then one large matmul instead of a batch of tiny ones plus a sum.
fn linear_rows<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let rows = x.shape().num_elements() / d_in.max(1);
    dims[D - 1] = weight.dims()[1];
    burn::tensor::module::linear(x.reshape([rows, d_in]), weight, bias).reshape(dims)
}

/// Zero-mean, unit-variance over the last dimension (LayerNorm without its affine part).
pub fn standardize<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let (var, mean) = x.clone().var_mean_bias(2);
    (x - mean) * (var + LN_EPS).sqrt().recip()
}

fn layer_norm<B: Backend>(d: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(d).with_epsilon(LN_EPS).init(device)
}

/// Pre-norm block: `h = q + MHA(LN_q(q), LN_k(c), LN_v(c))`, `out = h + FFN(LN(h))`.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub norm_query: LayerNorm<B>,
    pub norm_key: LayerNorm<B>,
    pub norm_value: LayerNorm<B>,
    pub query: Projection<B>,
    pub key: Projection<B>,
    pub value: Projection<B>,
    pub output: Projection<B>,
    pub norm_ffn: LayerNorm<B>,
    pub ffn_in: Projection<B>,
    pub ffn_out: Projection<B>,
    #[module(skip)]
    attn_dropout: f64,
    #[module(skip)]
    ffn_dropout: f64,
    num_heads: usize,
}

impl<B: Backend> Block<B> {
    pub fn new(
        dim: usize,
        num_heads: usize,
        attn_dropout: f64,
        ffn_dropout: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            norm_query: layer_norm(dim, device),
            norm_key: layer_norm(dim, device),
            norm_value: layer_norm(dim, device),
            query: Projection::new(dim, dim, device),
            key: Projection::new(dim, dim, device),
            value: Projection::new(dim, dim, device),
            output: Projection::new(dim, dim, device),
            norm_ffn: layer_norm(dim, device),
            ffn_in: Projection::new(dim, 4 * dim, device),
            ffn_out: Projection::new(4 * dim, dim, device),
            attn_dropout,
            ffn_dropout,
            num_heads,
        }
    }

    /// Folds the norms into the projections. Do it once per forward pass: the recurrence
    /// applies the same block to every chunk.
    pub fn fold(&self) -> FoldedBlock<'_, B> {
        let dim = self.query.weight.dims()[0];
        let scale = 1.0 / ((dim / self.num_heads) as f64).sqrt();
        let query = self.query.folded(&self.norm_query, scale);
        let key = self.key.folded(&self.norm_key, 1.0);
        let value = self.value.folded(&self.norm_value, 1.0);
        // The fused block computes in f32 (under bf16 the composition runs).
        let fused = self.num_heads == 1
            && (super::fused::enabled::<B>() || super::cube::block_applies::<B>())
            && query.0.dtype() == burn::tensor::DType::F32;
        FoldedBlock {
            qkv: fused.then(|| Affine::concat([&query, &key, &value])),
            query,
            key,
            value,
            ffn_in: self.ffn_in.folded(&self.norm_ffn, 1.0),
            block: self,
        }
    }
}

/// A block's input or output `[batch, tokens, D]`, with the standardisation of its rows
/// where a fused block computed it alongside ([`super::cube::Hat`]): the next block's norm of
/// the same tensor then costs no pass of its own.
#[derive(Clone)]
pub struct Normed<B: Backend> {
    x: Tensor<B, 3>,
    hat: Option<super::cube::Hat>,
}

impl<B: Backend> Normed<B> {
    pub fn new(x: Tensor<B, 3>) -> Self {
        Self { x, hat: None }
    }

    pub fn into_tensor(self) -> Tensor<B, 3> {
        self.x
    }
}

/// A [`Block`] with its norms folded into its projections, ready to run over many chunks.
pub struct FoldedBlock<'a, B: Backend> {
    query: Affine<B>,
    key: Affine<B>,
    value: Affine<B>,
    /// `[Wq | Wk | Wv]` when the block runs as one fused operation (see [`super::fused`]).
    qkv: Option<Affine<B>>,
    ffn_in: Affine<B>,
    block: &'a Block<B>,
}

impl<B: Backend> FoldedBlock<'_, B> {
    /// The block as one fused operation where the backend has it (single head, no weights
    /// wanted): see [`super::fused`] (CPU) and [`super::cube`] (wgpu, CUDA).
    fn fused(&self, qkv: &Affine<B>, x: &Normed<B>, context: Option<&Normed<B>>) -> Normed<B> {
        let b = self.block;
        let (o, f2) = (&b.output, &b.ffn_out);
        let Affine(wqkv, bqkv) = qkv.clone();
        let inputs = super::fused::BlockInputs {
            x: x.x.clone(),
            context: context.map(|c| c.x.clone()),
            weights: [wqkv, o.weight.val(), self.ffn_in.0.clone(), f2.weight.val()],
            biases: [bqkv, o.bias.val(), self.ffn_in.1.clone(), f2.bias.val()],
            attn_dropout: b.attn_dropout,
            ffn_dropout: b.ffn_dropout,
        };
        if super::cube::block_applies::<B>() {
            let hats = [x.hat.as_ref(), context.and_then(|c| c.hat.as_ref())];
            let (x, hat) = super::cube::run_block(inputs, hats);
            Normed { x, hat: Some(hat) }
        } else {
            Normed::new(super::fused::run(inputs))
        }
    }

    /// Self-attention block: query, key and value all come from `x` (normalised once).
    pub fn forward_self(&self, x: Normed<B>) -> Normed<B> {
        if let Some(qkv) = &self.qkv {
            return self.fused(qkv, &x, None);
        }
        let x = x.x;
        let x_hat = standardize(x.clone());
        let q = self.query.apply(x_hat.clone());
        let k = self.key.apply(x_hat.clone());
        let v = self.value.apply(x_hat);
        Normed::new(self.attend_and_ffn(x, q, k, v, false).0)
    }

    /// Cross-attention block: the query comes from `x`, key and value from `context`.
    /// Also returns the attention weights `[batch, heads, queries, keys]` before dropout
    /// when `want_weights` is set.
    pub fn forward_cross(
        &self,
        x: Normed<B>,
        context: &Normed<B>,
        want_weights: bool,
    ) -> (Normed<B>, Option<Tensor<B, 4>>) {
        if let (Some(qkv), false) = (&self.qkv, want_weights) {
            return (self.fused(qkv, &x, Some(context)), None);
        }
        let x = x.x;
        let q = self.query.apply(standardize(x.clone()));
        // One normalisation pass serves both key and value.
        let c_hat = standardize(context.x.clone());
        let k = self.key.apply(c_hat.clone());
        let v = self.value.apply(c_hat);
        let (out, weights) = self.attend_and_ffn(x, q, k, v, want_weights);
        (Normed::new(out), weights)
    }

    /// Scaled dot-product attention (the scale is already in `q`), output projection,
    /// residual, then the feed-forward half of the block.
    fn attend_and_ffn(
        &self,
        residual: Tensor<B, 3>,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        want_weights: bool,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 4>>) {
        let b = self.block;
        let [batch, n_q, dim] = q.dims();
        let n_k = k.dims()[1];
        let (context, weights) = if b.num_heads == 1 {
            let weights = softmax(q.matmul(k.swap_dims(1, 2)), 2);
            let context = dropout(weights.clone(), b.attn_dropout).matmul(v);
            (context, weights.unsqueeze_dim::<4>(1))
        } else {
            let h = b.num_heads;
            let split =
                |t: Tensor<B, 3>, n: usize| t.reshape([batch, n, h, dim / h]).swap_dims(1, 2);
            let (q, k, v) = (split(q, n_q), split(k, n_k), split(v, n_k));
            let weights = softmax(q.matmul(k.swap_dims(2, 3)), 3);
            let context = dropout(weights.clone(), b.attn_dropout).matmul(v);
            (context.swap_dims(1, 2).reshape([batch, n_q, dim]), weights)
        };
        let h = residual + b.output.forward(context);
        let hidden = self.ffn_in.apply_gelu(standardize(h.clone()));
        let out = h + dropout(b.ffn_out.forward(hidden), b.ffn_dropout);
        (out, want_weights.then_some(weights))
    }
}

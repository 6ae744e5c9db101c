//! The Temporal Latent Bottleneck classifier (Didolkar et al., 2022).

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, PaddingConfig2d};
use burn::tensor::{backend::Backend, Tensor};

use super::block::{Block, Projection, LN_EPS};
use super::config::{ConfigError, Readout, TlbConfig};

/// Per-chunk attention of the temporal latent bottleneck:
/// `[batch, chunks, heads, latents, chunk_size]`, each row a softmax over the chunk's tokens.
pub type TlbAttention<B> = Tensor<B, 5>;

#[derive(Module, Debug)]
pub struct Tlb<B: Backend> {
    pub patch_embed: Conv2d<B>,
    /// Learned position embedding, `[1, tokens, D]`.
    pub pos_embed: Param<Tensor<B, 3>>,
    pub embed_norm: LayerNorm<B>,
    /// Fast-stream self-attention blocks, one per perceptual layer.
    pub perceptual: Vec<Block<B>>,
    /// Fast-stream cross-attention (query fast, key/value slow) after layers 0, r, 2r, ...
    pub perceptual_cross: Vec<Block<B>>,
    /// The bottleneck: query slow, key/value fast; writes the new slow state.
    pub bottleneck: Block<B>,
    pub readout_norm: LayerNorm<B>,
    pub head: Projection<B>,
    #[module(skip)]
    config: TlbConfig,
}

impl TlbConfig {
    /// Builds the model after validating the configuration.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Tlb<B>, ConfigError> {
        self.validate()?;
        let d = self.embed_dim;
        let block = || {
            Block::new(
                d,
                self.num_heads,
                self.attn_dropout,
                self.ffn_dropout,
                device,
            )
        };
        let patch = [self.patch_size, self.patch_size];
        let patch_embed = Conv2dConfig::new([3, d], patch)
            .with_stride(patch)
            .with_padding(PaddingConfig2d::Valid)
            .with_initializer(Initializer::XavierUniform { gain: 1.0 })
            .init(device);
        let pos_embed = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        }
        .init([1, self.num_tokens(), d], device);
        Ok(Tlb {
            patch_embed,
            pos_embed,
            embed_norm: LayerNormConfig::new(d).with_epsilon(LN_EPS).init(device),
            perceptual: (0..self.num_layers).map(|_| block()).collect(),
            perceptual_cross: (0..self.num_layers)
                .filter(|l| l % self.r == 0)
                .map(|_| block())
                .collect(),
            bottleneck: block(),
            readout_norm: LayerNormConfig::new(d).with_epsilon(LN_EPS).init(device),
            head: Projection::new(d, self.num_classes, device),
            config: self.clone(),
        })
    }
}

/// What one forward pass produces.
pub struct TlbOutput<B: Backend> {
    /// Class logits, `[batch, classes]`.
    pub logits: Tensor<B, 2>,
    /// Bottleneck attention per chunk, when asked for.
    pub attention: Option<TlbAttention<B>>,
}

impl<B: Backend> Tlb<B> {
    pub fn config(&self) -> &TlbConfig {
        &self.config
    }

    /// Images `[batch, 3, S, S]` in [0, 1] → tokens `[batch, S/p * S/p, D]` (row-major patches).
    pub fn embed(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = self.patch_embed.forward(images);
        let [batch, dim, gh, gw] = x.dims();
        let tokens = x.reshape([batch, dim, gh * gw]).swap_dims(1, 2);
        self.embed_norm.forward(tokens + self.pos_embed.val())
    }

    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_with(images, false).logits
    }

    /// The recurrence over chunks. With `want_attention`, also returns the bottleneck's
    /// attention weights for every chunk (serve them from a model in eval mode: in training
    /// mode the weights are still pre-dropout, but the state they produced saw dropout).
    pub fn forward_with(&self, images: Tensor<B, 4>, want_attention: bool) -> TlbOutput<B> {
        let cfg = &self.config;
        let tokens = self.embed(images);
        let [batch, _, dim] = tokens.dims();
        let device = tokens.device();
        let mut slow = Tensor::<B, 3>::zeros([batch, cfg.num_latents(), dim], &device);
        let mut fast = tokens.clone();
        let mut maps = Vec::with_capacity(if want_attention { cfg.num_chunks() } else { 0 });
        let perceptual: Vec<_> = self.perceptual.iter().map(Block::fold).collect();
        let perceptual_cross: Vec<_> = self.perceptual_cross.iter().map(Block::fold).collect();
        let bottleneck = self.bottleneck.fold();
        for c in 0..cfg.num_chunks() {
            fast = tokens.clone().narrow(1, c * cfg.chunk_size, cfg.chunk_size);
            for (l, block) in perceptual.iter().enumerate() {
                fast = block.forward_self(fast);
                if l % cfg.r == 0 {
                    fast = perceptual_cross[l / cfg.r]
                        .forward_cross(fast, slow.clone(), false)
                        .0;
                }
            }
            let (new_slow, weights) = bottleneck.forward_cross(slow, fast.clone(), want_attention);
            slow = new_slow;
            if let Some(w) = weights {
                maps.push(w.unsqueeze_dim::<5>(1));
            }
        }
        let pooled = match cfg.readout {
            Readout::LastFast => fast.mean_dim(1),
            Readout::Slow => self.readout_norm.forward(slow).mean_dim(1),
        };
        let logits = self.head.forward(pooled.squeeze_dim::<2>(1));
        TlbOutput {
            logits,
            attention: want_attention.then(|| Tensor::cat(maps, 1)),
        }
    }
}

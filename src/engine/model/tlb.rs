//! The Temporal Latent Bottleneck classifier (Didolkar et al., 2022).

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, PaddingConfig2d};
use burn::tensor::{backend::Backend, Tensor};

use super::block::{Block, Normed, Projection, LN_EPS};
use super::config::{ConfigError, Readout, TlbConfig};
use super::precision::{cast_params, Precision};

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
    /// What the passes compute in (not part of the model: checkpoints do not store it).
    #[module(skip)]
    precision: Precision,
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
            precision: Precision::F32,
        })
    }
}

/// The most rows (batch × chunk size) a chunk may have for perceptual layer 0 to run on all
/// chunks in one call (inference only; see [`Tlb::forward_with`]).
pub const MERGE_MAX_ROWS: usize = 64;

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

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The same model computing its passes in `precision` (its parameters stay f32).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Images `[batch, 3, S, S]` in [0, 1] → tokens `[batch, S/p * S/p, D]` (row-major patches).
    pub fn embed(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let x = self.patch_embed.forward(images);
        let [batch, dim, gh, gw] = x.dims();
        let tokens = x.reshape([batch, dim, gh * gw]).swap_dims(1, 2);
        self.embed_norm.forward(tokens + self.pos_embed.val())
    }

    /// The same tokens as [`Self::embed`], one tensor `[batch, chunk_size, D]` per chunk:
    /// the patch convolution written as its matrix product over each chunk's patches. The
    /// recurrence takes its chunks from these, so no gradient flows through a slice of one
    /// large token tensor (whose backward writes a zero-filled full-size tensor per chunk).
    pub fn embed_chunks(&self, images: Tensor<B, 4>) -> Vec<Tensor<B, 3>> {
        let [batch, ..] = images.dims();
        let (cs, chunks) = (self.config.chunk_size, self.config.num_chunks());
        let (patches, weight, bias) = self.patch_rows(images);
        let dim = weight.dims()[1];
        let pos = self.pos_embed.val();
        (0..chunks)
            .map(|c| {
                let rows = patches.clone().narrow(0, c * batch * cs, batch * cs);
                let x = burn::tensor::module::linear(rows, weight.clone(), bias.clone())
                    .reshape([batch, cs, dim]);
                // The chunk's positions repeated over the batch: a same-shape add (a broadcast
                // one walks the CPU backend's strided path).
                let pos = pos.clone().narrow(1, c * cs, cs).repeat_dim(0, batch);
                self.embed_norm.forward(x + pos)
            })
            .collect()
    }

    /// The same tokens as [`Self::embed_chunks`] in one tensor `[chunks · batch,
    /// chunk_size, D]`, chunk-major: one matrix product and one norm for all chunks.
    pub fn embed_merged(&self, images: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, ..] = images.dims();
        let (cs, chunks) = (self.config.chunk_size, self.config.num_chunks());
        let (patches, weight, bias) = self.patch_rows(images);
        let dim = weight.dims()[1];
        let x =
            burn::tensor::module::linear(patches, weight, bias).reshape([chunks, batch, cs, dim]);
        let pos = self
            .pos_embed
            .val()
            .reshape([chunks, 1, cs, dim])
            .repeat_dim(1, batch);
        self.embed_norm
            .forward((x + pos).reshape([chunks * batch, cs, dim]))
    }

    /// Images `[batch, 3, S, S]` → the patches as chunk-major rows `[chunks · batch ·
    /// chunk_size, 3·p·p]`, and the patch convolution as a projection `(W [3·p·p, D], b)`.
    #[allow(clippy::type_complexity)]
    fn patch_rows(
        &self,
        images: Tensor<B, 4>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>, Option<Tensor<B, 1>>) {
        let cfg = &self.config;
        let [batch, channels, side, _] = images.dims();
        let (p, g, cs) = (cfg.patch_size, side / cfg.patch_size, cfg.chunk_size);
        let k = channels * p * p;
        let chunks = cfg.num_chunks();
        // [batch, tokens, (channel, dy, dx)] → chunk-major rows [chunks · batch · cs, k].
        let patches = images
            .reshape([batch, channels, g, p, g, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([batch, chunks, cs, k])
            .swap_dims(0, 1)
            .reshape([chunks * batch * cs, k]);
        let conv = &self.patch_embed;
        let dim = conv.weight.dims()[0];
        let weight = conv.weight.val().reshape([dim, k]).transpose();
        (patches, weight, conv.bias.as_ref().map(|b| b.val()))
    }

    pub fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        self.forward_with(images, false).logits
    }

    /// The recurrence over chunks. With `want_attention`, also returns the bottleneck's
    /// attention weights for every chunk (serve them from a model in eval mode: in training
    /// mode the weights are still pre-dropout, but the state they produced saw dropout).
    /// Logits and attention come back in f32 whatever the precision.
    pub fn forward_with(&self, images: Tensor<B, 4>, want_attention: bool) -> TlbOutput<B> {
        if self.precision == Precision::F32 {
            return self.recurrence(images, want_attention);
        }
        let dtype = self.precision.dtype();
        let out = cast_params(self.clone(), dtype).recurrence(images.cast(dtype), want_attention);
        let f32 = burn::tensor::DType::F32;
        TlbOutput {
            logits: out.logits.cast(f32),
            attention: out.attention.map(|a| a.cast(f32)),
        }
    }

    /// [`Self::forward_with`] in the dtype of the parameters and `images`.
    fn recurrence(&self, images: Tensor<B, 4>, want_attention: bool) -> TlbOutput<B> {
        let cfg = &self.config;
        let device = images.device();
        let perceptual: Vec<_> = self.perceptual.iter().map(Block::fold).collect();
        let perceptual_cross: Vec<_> = self.perceptual_cross.iter().map(Block::fold).collect();
        let bottleneck = self.bottleneck.fold();
        // Perceptual layer 0 comes before the first cross-attention, so it sees no slow
        // state: it can run on all chunks in one call, the chunks then views of its output.
        // That pays where a chunk's call is mostly overhead (a launch-bound GPU serving small
        // batches) and there only: with a gradient to track, each view's backward would write
        // a zero-filled full-size gradient (see `embed_chunks`); and on the CPU the merged
        // call measured faster up to 64 rows a chunk (batch 8 of 8-token chunks) and slower
        // above (`tlb bench --batch B`, inference, both presets).
        let [batch, ..] = images.dims();
        let merged = !B::ad_enabled(&device) && batch * cfg.chunk_size <= MERGE_MAX_ROWS;
        let chunks = if merged {
            let all = perceptual[0].forward_self(Normed::new(self.embed_merged(images)));
            all.into_tensor().chunk(cfg.num_chunks(), 0)
        } else {
            self.embed_chunks(images)
        };
        let [_, _, dim] = chunks[0].dims();
        let dtype = chunks[0].dtype();
        let zeros = Tensor::<B, 3>::zeros([batch, cfg.num_latents(), dim], (&device, dtype));
        let mut slow = Normed::new(zeros);
        let mut fast = Normed::new(chunks[0].clone());
        let mut maps = Vec::with_capacity(if want_attention { cfg.num_chunks() } else { 0 });
        for chunk in chunks {
            fast = Normed::new(chunk);
            for (l, block) in perceptual.iter().enumerate() {
                if l > 0 || !merged {
                    fast = block.forward_self(fast);
                }
                if l % cfg.r == 0 {
                    fast = perceptual_cross[l / cfg.r]
                        .forward_cross(fast, &slow, false)
                        .0;
                }
            }
            let (new_slow, weights) = bottleneck.forward_cross(slow, &fast, want_attention);
            slow = new_slow;
            if let Some(w) = weights {
                maps.push(w.unsqueeze_dim::<5>(1));
            }
        }
        let pooled = match cfg.readout {
            Readout::LastFast => fast.into_tensor().mean_dim(1),
            Readout::Slow => self.readout_norm.forward(slow.into_tensor()).mean_dim(1),
        };
        let logits = self.head.forward(pooled.squeeze_dim::<2>(1));
        TlbOutput {
            logits,
            attention: want_attention.then(|| Tensor::cat(maps, 1)),
        }
    }
}

//! Model hyper-parameters and their validation.

use burn::config::Config;
use serde::{Deserialize, Serialize};

/// How the classifier reads the recurrence out.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    Default,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    strum::Display,
    strum::EnumIter,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case", parse_err_ty = String, parse_err_fn = unknown_readout)]
pub enum Readout {
    /// Mean of the last chunk's fast-stream tokens, then a linear head (the Keras reference).
    LastFast,
    /// LayerNorm of the final slow-stream state, mean over latents, then a linear head
    /// (the authors' own code).
    #[default]
    Slow,
}

fn unknown_readout(name: &str) -> String {
    crate::names::unknown::<Readout>("readout", name)
}

/// Architecture of a Temporal Latent Bottleneck classifier.
#[derive(Config, Debug, PartialEq)]
pub struct TlbConfig {
    /// Side of the (square) image the model sees, after resizing.
    #[config(default = 32)]
    pub image_size: usize,
    /// Side of a square patch; one patch is one token.
    #[config(default = 4)]
    pub patch_size: usize,
    /// Token width D.
    #[config(default = 64)]
    pub embed_dim: usize,
    /// Tokens per chunk; also the number of slow-stream latents.
    #[config(default = 8)]
    pub chunk_size: usize,
    /// A fast→slow cross-attention block follows every r-th perceptual block.
    #[config(default = 2)]
    pub r: usize,
    /// Perceptual (self-attention) blocks per chunk, L.
    #[config(default = 4)]
    pub num_layers: usize,
    #[config(default = 1)]
    pub num_heads: usize,
    #[config(default = 0.2)]
    pub ffn_dropout: f64,
    #[config(default = 0.2)]
    pub attn_dropout: f64,
    #[config(default = 10)]
    pub num_classes: usize,
    #[config(default = "Readout::Slow")]
    pub readout: Readout,
}

/// A configuration the model cannot be built from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid model config: {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: String) -> Result<(), ConfigError> {
    Err(ConfigError { field, message })
}

/// Upper bounds that keep a request from asking for an absurd model.
pub const MAX_IMAGE_SIZE: usize = 512;
pub const MAX_EMBED_DIM: usize = 4096;
pub const MAX_LAYERS: usize = 64;
pub const MAX_CLASSES: usize = 100_000;
pub const MAX_TOKENS: usize = 16_384;

impl TlbConfig {
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn num_tokens(&self) -> usize {
        self.grid_size() * self.grid_size()
    }
    pub fn num_chunks(&self) -> usize {
        self.num_tokens() / self.chunk_size
    }
    /// Number of slow-stream latent vectors.
    pub fn num_latents(&self) -> usize {
        self.chunk_size
    }
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Checks every constraint the architecture relies on, with a message naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let in_range = |field, v: usize, max: usize| {
            if v == 0 || v > max {
                err(field, format!("must be in 1..={max}, got {v}"))
            } else {
                Ok(())
            }
        };
        in_range("image_size", self.image_size, MAX_IMAGE_SIZE)?;
        in_range("patch_size", self.patch_size, self.image_size)?;
        in_range("embed_dim", self.embed_dim, MAX_EMBED_DIM)?;
        in_range("num_layers", self.num_layers, MAX_LAYERS)?;
        in_range("r", self.r, MAX_LAYERS)?;
        in_range("num_heads", self.num_heads, self.embed_dim)?;
        in_range("num_classes", self.num_classes, MAX_CLASSES)?;
        if !self.image_size.is_multiple_of(self.patch_size) {
            return err(
                "image_size",
                format!(
                    "image_size {} is not divisible by patch_size {}",
                    self.image_size, self.patch_size
                ),
            );
        }
        in_range("num_tokens", self.num_tokens(), MAX_TOKENS)?;
        in_range("chunk_size", self.chunk_size, self.num_tokens())?;
        if !self.num_tokens().is_multiple_of(self.chunk_size) {
            return err(
                "chunk_size",
                format!(
                    "the token count {} ({}x{} patches) is not divisible by chunk_size {}",
                    self.num_tokens(),
                    self.grid_size(),
                    self.grid_size(),
                    self.chunk_size
                ),
            );
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return err(
                "num_heads",
                format!(
                    "embed_dim {} is not divisible by num_heads {}",
                    self.embed_dim, self.num_heads
                ),
            );
        }
        for (field, p) in [
            ("ffn_dropout", self.ffn_dropout),
            ("attn_dropout", self.attn_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return err(field, format!("must be in [0, 1), got {p}"));
            }
        }
        Ok(())
    }
}

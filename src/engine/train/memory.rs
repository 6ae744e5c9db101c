//! What a training run will need, worked out from its config before anything is allocated:
//! parameter count, the memory of one optimiser step and the size of a checkpoint.

use super::config::TrainConfig;
use crate::engine::model::TlbConfig;

/// f32 everywhere.
const F32: u64 = 4;
/// Activations autodiff keeps per token, per block, in units of the width D: the block's
/// input, its normalised forms, Q/K/V, the attention output and projection, the 4·D-wide FFN
/// input and GELU output, and the residual sums. Calibrated on peak RSS (`tlb bench --batch
/// 256`, CPU, 256 images in flight): `reference` 3,854 MiB measured vs 3,760 MiB estimated,
/// `cpu-small` 595 vs 598.
const SAVED_PER_TOKEN_PER_BLOCK: u64 = 20;

/// The parameters of a model built from `cfg` (the same count as `Tlb::num_params`).
pub fn param_count(cfg: &TlbConfig) -> u64 {
    let (d, p) = (cfg.embed_dim as u64, cfg.patch_size as u64);
    let layers = cfg.num_layers as u64;
    let blocks = layers + layers.div_ceil(cfg.r as u64) + 1;
    // norms of query, key, value and FFN (2·D each), Q/K/V/output (D² + D each),
    // FFN in (4·D² + 4·D) and out (4·D² + D).
    let block = 12 * d * d + 17 * d;
    let patch_embed = 3 * p * p * d + d;
    let pos_embed = cfg.num_tokens() as u64 * d;
    let head = d * cfg.num_classes as u64 + cfg.num_classes as u64;
    patch_embed + pos_embed + 2 * d + blocks * block + 2 * d + head
}

/// Memory and disk a run needs (bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footprint {
    pub params: u64,
    /// Weights, AdamW's two moments, the summed gradients and one gradient set per replica.
    pub state_bytes: u64,
    /// Activations kept for the backward pass of the images in flight at once.
    pub activation_bytes: u64,
    /// Images in flight at once: the micro-batch on each replica.
    pub images_in_flight: u64,
    /// One checkpoint file (weights and both moments).
    pub checkpoint_bytes: u64,
    /// Checkpoint files that can exist at once: kept epochs, the best, the mid-epoch one, and
    /// the one being written.
    pub checkpoint_files: u64,
}

impl Footprint {
    pub fn memory_bytes(&self) -> u64 {
        self.state_bytes + self.activation_bytes
    }
    pub fn disk_bytes(&self) -> u64 {
        self.checkpoint_bytes * self.checkpoint_files
    }
}

impl TrainConfig {
    /// The run's footprint with `replicas` model replicas computing a step (0: the config's).
    pub fn footprint(&self, replicas: usize) -> Footprint {
        let m = &self.model;
        let params = param_count(m);
        let replicas = match (self.replicas, replicas) {
            (0, 0) => 1,
            (0, r) => r,
            (r, _) => r,
        } as u64;
        let batch = self.batch_size as u64;
        let micro = self.micro_batch_size() as u64;
        let images_in_flight = batch.min(micro * replicas);
        let layers = m.num_layers as u64;
        let blocks = layers + layers.div_ceil(m.r as u64) + 1;
        let (tokens, d, c) = (
            m.num_tokens() as u64,
            m.embed_dim as u64,
            m.chunk_size as u64,
        );
        // Per image: every block runs once per chunk over chunk-size tokens (its attention
        // weights are chunk × chunk per head); plus the patch embedding and its norm.
        let per_image =
            (tokens * blocks * (SAVED_PER_TOKEN_PER_BLOCK * d + 3 * c * m.num_heads as u64)
                + 4 * tokens * d
                + 3 * (m.image_size as u64).pow(2))
                * F32;
        Footprint {
            params,
            state_bytes: params * F32 * (4 + replicas),
            activation_bytes: per_image * images_in_flight,
            images_in_flight,
            checkpoint_bytes: params * F32 * 3,
            checkpoint_files: self.keep_last.max(1) as u64 + 3,
        }
    }
}

/// Bytes in a readable unit ("1.5 GiB").
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::Tlb;
    use burn::module::Module;
    use strum::IntoEnumIterator;

    type B = crate::engine::backend::Cpu;

    #[test]
    fn param_count_matches_the_built_model() {
        for preset in super::super::Preset::iter() {
            let cfg = preset.config().model;
            let model: Tlb<B> = cfg.init(&Default::default()).unwrap();
            assert_eq!(param_count(&cfg), model.num_params() as u64, "{cfg:?}");
        }
        let odd = TlbConfig::new()
            .with_num_layers(5)
            .with_r(2)
            .with_num_classes(7);
        let model: Tlb<B> = odd.init(&Default::default()).unwrap();
        assert_eq!(param_count(&odd), model.num_params() as u64);
    }

    #[test]
    fn an_absurd_model_needs_hundreds_of_gigabytes() {
        let mut cfg = super::super::Preset::Tiny.config();
        (cfg.model.embed_dim, cfg.model.num_layers) = (4096, 64);
        let f = cfg.footprint(2);
        assert!(f.params > 19_000_000_000, "{f:?}");
        assert!(f.memory_bytes() > 300 << 30, "{f:?}");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn the_estimate_matches_the_measured_peak_of_the_reference_preset() {
        // `tlb bench --preset reference --batch 256` peaked at 3,854 MiB RSS on 2 replicas.
        let mut cfg = super::super::Preset::Reference.config();
        (cfg.batch_size, cfg.micro_batch) = (256, 256);
        let f = cfg.footprint(2);
        assert_eq!(f.images_in_flight, 256);
        let mib = f.memory_bytes() >> 20;
        assert!((3_300..4_300).contains(&mib), "{mib} MiB");
        // Accumulation bounds the activations: 4 × 256 in flight is not 1024 at once.
        let full = super::super::Preset::Reference.config().footprint(2);
        assert_eq!(full.images_in_flight, 512);
    }
}

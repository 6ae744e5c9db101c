//! Training recipes and the named presets.

use serde::{Deserialize, Serialize};

use crate::engine::model::{ConfigError, Precision, Readout, TlbConfig};

/// Learning-rate schedule over the whole run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// The reference: a constant rate.
    #[default]
    Constant,
    /// Linear warm-up over `warmup_epochs`, then cosine decay to `min_lr_ratio · lr`.
    Cosine,
}

/// Everything a training run needs besides the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    pub model: TlbConfig,
    pub epochs: usize,
    /// Effective batch size (one optimiser step).
    pub batch_size: usize,
    /// Largest batch pushed through the model at once; gradients of the micro-batches of one
    /// step are accumulated, so the step equals one over the whole batch. 0 = batch_size.
    pub micro_batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub warmup_epochs: f64,
    pub min_lr_ratio: f64,
    pub label_smoothing: f64,
    pub seed: u64,
    /// Stop training after this many minutes (then validate, checkpoint and test). 0 = none.
    pub max_minutes: f64,
    /// Epoch checkpoints kept besides the best one.
    pub keep_last: usize,
    /// Threads preparing batches ahead of the step.
    pub data_workers: usize,
    /// Model replicas computing one step's gradients in parallel (CPU: one per core);
    /// 0 means "choose for the device".
    pub replicas: usize,
    /// What the training passes compute in (parameters and optimiser state stay f32).
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Preset::CpuSmall.config()
    }
}

/// Named, tested recipes.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    strum::Display,
    strum::EnumIter,
)]
#[strum(serialize_all = "kebab-case", parse_err_ty = String, parse_err_fn = unknown_preset)]
pub enum Preset {
    /// The paper's CIFAR-10 configuration as in the Keras reference.
    Reference,
    /// The most accurate recipe found for 25 minutes on 2 CPU cores.
    CpuSmall,
    /// For tests: an epoch of cifar10-mini in seconds.
    Tiny,
}

fn unknown_preset(name: &str) -> String {
    crate::names::unknown::<Preset>("preset", name)
}

impl Preset {
    pub fn config(self) -> TrainConfig {
        match self {
            Self::Reference => TrainConfig {
                model: TlbConfig::new()
                    .with_image_size(48)
                    .with_patch_size(4)
                    .with_embed_dim(128)
                    .with_chunk_size(8)
                    .with_r(2)
                    .with_num_layers(6)
                    .with_num_heads(1)
                    .with_ffn_dropout(0.2)
                    .with_attn_dropout(0.2)
                    .with_readout(Readout::LastFast),
                epochs: 100,
                batch_size: 1024,
                // A CPU batch of 1024 at 48px would need ~20 GiB of activations.
                micro_batch: 256,
                lr: 1e-4,
                weight_decay: 1e-4,
                schedule: Schedule::Constant,
                warmup_epochs: 0.0,
                min_lr_ratio: 1.0,
                label_smoothing: 0.0,
                precision: Precision::F32,
                seed: 42,
                max_minutes: 0.0,
                keep_last: 3,
                data_workers: 1,
                replicas: 0,
            },
            Self::CpuSmall => TrainConfig {
                model: TlbConfig::new()
                    .with_image_size(32)
                    .with_patch_size(4)
                    .with_embed_dim(64)
                    .with_chunk_size(8)
                    .with_r(2)
                    .with_num_layers(4)
                    .with_num_heads(1)
                    .with_ffn_dropout(0.0)
                    .with_attn_dropout(0.0)
                    .with_readout(Readout::Slow),
                // A cap: the time budget below plans the count (≈20 epochs on a 2-core
                // AVX-512 host at ~590 images/s), so a faster host trains longer.
                epochs: 40,
                batch_size: 128,
                micro_batch: 0,
                lr: 1.5e-3,
                weight_decay: 0.05,
                schedule: Schedule::Cosine,
                warmup_epochs: 0.5,
                min_lr_ratio: 0.02,
                label_smoothing: 0.1,
                precision: Precision::F32,
                seed: 42,
                max_minutes: 24.5,
                keep_last: 3,
                data_workers: 1,
                replicas: 0,
            },
            Self::Tiny => TrainConfig {
                model: TlbConfig::new()
                    .with_image_size(16)
                    .with_patch_size(4)
                    .with_embed_dim(16)
                    .with_chunk_size(4)
                    .with_r(1)
                    .with_num_layers(1)
                    .with_num_heads(1)
                    .with_ffn_dropout(0.0)
                    .with_attn_dropout(0.0)
                    .with_readout(Readout::Slow),
                epochs: 2,
                batch_size: 64,
                micro_batch: 0,
                lr: 3e-3,
                weight_decay: 1e-4,
                schedule: Schedule::Constant,
                warmup_epochs: 0.0,
                min_lr_ratio: 1.0,
                label_smoothing: 0.0,
                precision: Precision::F32,
                seed: 7,
                max_minutes: 0.0,
                keep_last: 2,
                data_workers: 1,
                replicas: 0,
            },
        }
    }
}

impl TrainConfig {
    pub fn micro_batch_size(&self) -> usize {
        if self.micro_batch == 0 {
            self.batch_size
        } else {
            self.micro_batch.min(self.batch_size)
        }
    }

    /// Epochs that fit a time budget of `budget_seconds` when one epoch (training and
    /// validation) takes `epoch_seconds`: a 5 % margin is kept for the test evaluation and the
    /// checkpoints; at least one, at most `self.epochs`.
    pub fn epochs_within(&self, budget_seconds: f64, epoch_seconds: f64) -> usize {
        let fit = (budget_seconds * 0.95 / epoch_seconds.max(1e-9)).floor();
        (fit.max(1.0) as usize).min(self.epochs.max(1))
    }

    /// Validates the model and the recipe, naming the offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.model.validate()?;
        let bad = |field, message: String| Err(ConfigError { field, message });
        if self.epochs == 0 || self.epochs > 10_000 {
            return bad(
                "epochs",
                format!("must be in 1..=10000, got {}", self.epochs),
            );
        }
        if self.batch_size == 0 || self.batch_size > 65_536 {
            return bad(
                "batch_size",
                format!("must be in 1..=65536, got {}", self.batch_size),
            );
        }
        if !(self.lr > 0.0 && self.lr <= 10.0) {
            return bad("lr", format!("must be in (0, 10], got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.weight_decay) {
            return bad(
                "weight_decay",
                format!("must be in [0, 1], got {}", self.weight_decay),
            );
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(
                "label_smoothing",
                format!("must be in [0, 1), got {}", self.label_smoothing),
            );
        }
        let finite_non_negative = |v: f64| v.is_finite() && v >= 0.0;
        if !(0.0..=1.0).contains(&self.min_lr_ratio) || !finite_non_negative(self.warmup_epochs) {
            return bad(
                "schedule",
                "min_lr_ratio must be in [0, 1] and warmup_epochs ≥ 0".into(),
            );
        }
        if !finite_non_negative(self.max_minutes) {
            return bad(
                "max_minutes",
                format!("must be ≥ 0, got {}", self.max_minutes),
            );
        }
        Ok(())
    }

    /// Learning rate at optimiser step `step` of a run of `epochs` epochs.
    pub fn lr_at(&self, step: usize, steps_per_epoch: usize, epochs: usize) -> f64 {
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let warmup = (self.warmup_epochs * steps_per_epoch as f64).round() as usize;
                let total = (epochs * steps_per_epoch).max(1);
                if step < warmup {
                    return self.lr * (step + 1) as f64 / warmup as f64;
                }
                let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
                let min = self.lr * self.min_lr_ratio;
                min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
            }
        }
    }
}

//! What a training run logs for TensorBoard, and when: its hyper-parameters when it opens,
//! step scalars every [`STEP_EVERY`] steps, epoch scalars and an attention picture per epoch,
//! and its final figures and status at the end. Every scalar is at the global step, so step
//! and epoch curves share one axis.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use burn::tensor::backend::Backend;
use prost_types::value::Kind;

use super::{EventWriter, Status};
use crate::engine::data::{planar_to_rgb, Split};
use crate::engine::infer::{attention_maps, eval_batch};
use crate::engine::model::{Tlb, TlbConfig};
use crate::engine::train::{EpochMetrics, FinalMetrics, TrainConfig};
use crate::engine::viz::{attention_picture, png_bytes, token_scores};

/// Steps between two step-scalar events.
pub const STEP_EVERY: usize = 10;
/// Side of each half of the attention picture (image | overlay), in pixels.
const PICTURE_SIDE: u32 = 128;
/// The tag of the per-epoch attention picture.
pub const ATTENTION_TAG: &str = "attention/validation_image_0";

/// One attempt's event file in a run's folder.
pub struct RunLog {
    writer: EventWriter,
}

impl RunLog {
    /// Opens the attempt's event file (`suffix` names the attempt) in `dir`. A run that
    /// resumes after `step` says so first, so TensorBoard drops what an earlier attempt
    /// logged past it (TensorBoard drops the events at and after a START's step: this one is
    /// at `step + 1`, keeping the figures of the checkpoint resumed from); then the run's
    /// hyper-parameters.
    pub fn open(dir: &Path, suffix: &str, step: u64, config: &TrainConfig) -> Result<Self> {
        let mut writer = EventWriter::create(dir, suffix)?;
        if step > 0 {
            writer.session_start(step + 1)?;
        }
        writer.hparams(
            hparams_of(config),
            &dir.join("checkpoints").display().to_string(),
        )?;
        Ok(Self { writer })
    }

    pub fn path(&self) -> &Path {
        self.writer.path()
    }

    /// One step's figures.
    pub fn step(
        &mut self,
        step: u64,
        loss: f64,
        accuracy: f64,
        lr: f64,
        images_per_sec: f64,
    ) -> Result<()> {
        self.writer.scalars(
            step,
            &[
                ("step/loss", loss),
                ("step/accuracy", accuracy),
                ("step/lr", lr),
                ("step/images_per_sec", images_per_sec),
            ],
        )
    }

    /// An epoch's figures (the same as its `metrics.jsonl` line) and its attention picture.
    pub fn epoch(&mut self, step: u64, m: &EpochMetrics, picture: Option<Picture>) -> Result<()> {
        self.writer.scalars(
            step,
            &[
                ("epoch/train_loss", m.train_loss),
                ("epoch/train_accuracy", m.train_accuracy),
                ("epoch/val_loss", m.val_loss),
                ("epoch/val_accuracy", m.val_accuracy),
                ("epoch/lr", m.lr),
                ("epoch/images_per_sec", m.images_per_sec),
                ("epoch/seconds", m.seconds),
                ("epoch/epoch", m.epoch as f64),
            ],
        )?;
        if let Some(p) = picture {
            self.writer
                .image(step, ATTENTION_TAG, p.png, p.width, p.height)?;
        }
        self.writer.sync()
    }

    /// The run's final figures and its end, for the HParams view.
    pub fn finish(&mut self, step: u64, f: &FinalMetrics) -> Result<()> {
        let mut values = vec![("final/epochs", f.epochs_completed as f64)];
        values.extend(f.best_val_accuracy.map(|v| ("final/best_val_accuracy", v)));
        values.extend(f.test_accuracy.map(|v| ("final/test_accuracy", v)));
        values.extend(f.test_loss.map(|v| ("final/test_loss", v)));
        self.writer.scalars(step, &values)?;
        self.writer.session_end(Status::Success)?;
        self.writer.sync()
    }

    /// The run failed (best effort: the failure is what gets reported).
    pub fn failed(&mut self) {
        let _ = self.writer.session_end(Status::Failure);
        let _ = self.writer.sync();
    }
}

/// A PNG and its size.
pub struct Picture {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// The config's fields as TensorBoard hyper-parameters, named as in `TrainingConfig` (the
/// model's fields unprefixed).
pub fn hparams_of(config: &TrainConfig) -> BTreeMap<String, prost_types::Value> {
    let mut out = BTreeMap::new();
    let json = serde_json::to_value(config).unwrap_or_default();
    let mut add = |name: &str, v: &serde_json::Value| {
        let kind = match v {
            serde_json::Value::Number(n) => n.as_f64().map(Kind::NumberValue),
            serde_json::Value::String(s) => Some(Kind::StringValue(s.clone())),
            serde_json::Value::Bool(b) => Some(Kind::BoolValue(*b)),
            _ => None,
        };
        if let Some(kind) = kind {
            out.insert(name.to_string(), prost_types::Value { kind: Some(kind) });
        }
    };
    for (name, v) in json.as_object().into_iter().flatten() {
        match v.as_object() {
            Some(inner) => inner.iter().for_each(|(n, v)| add(n, v)),
            None => add(name, v),
        }
    }
    out
}

/// The attention picture of the split's first image under `model` (eval mode): the image and
/// its overlay side by side, as GetAttention draws them.
pub fn attention_png<B: Backend>(
    model: &Tlb<B>,
    split: &Split,
    config: &TlbConfig,
    device: &B::Device,
) -> Option<Picture> {
    if split.is_empty() {
        return None;
    }
    let (planar, _) = split.get(0);
    let side = split.set.side;
    let maps = attention_maps(
        model,
        eval_batch(&[planar], side, config.image_size),
        device,
    );
    let scores = token_scores(&maps.weights, maps.dims);
    let rgb = planar_to_rgb(planar, side);
    let picture = attention_picture(&rgb, &scores, config.grid_size(), PICTURE_SIDE, true);
    Some(Picture {
        width: picture.width(),
        height: picture.height(),
        png: png_bytes(&picture),
    })
}

//! Checkpoints: model and optimiser state plus where the run stands, in one file written
//! atomically (temp file, fsync, rename, fsync of the directory).
//!
//! Layout: `TLBCKPT1`, then three length-prefixed (u64 LE) sections: the JSON
//! [`CheckpointMeta`], the model record and the optimiser record (burn's bincode records).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use crate::engine::model::Tlb;

const MAGIC: &[u8; 8] = b"TLBCKPT1";

/// Where a run stands. The run's randomness is a pure function of `(seed, epoch, step)`
/// (shuffling, augmentation and dropout are re-seeded from them), so this *is* its RNG state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub config: TrainConfig,
    pub class_names: Vec<String>,
    /// Epochs fully completed.
    pub epoch: usize,
    /// Batches of epoch `epoch` already trained (0 at an epoch boundary).
    pub step_in_epoch: usize,
    /// Optimiser steps taken over the whole run.
    pub global_step: usize,
    pub val_accuracy: Option<f64>,
    pub best_val_accuracy: Option<f64>,
    pub best_epoch: Option<usize>,
}

/// A checkpoint in memory: its metadata and the raw records.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub model: Vec<u8>,
    pub optimizer: Vec<u8>,
}

fn recorder() -> BinBytesRecorder<FullPrecisionSettings> {
    BinBytesRecorder::default()
}

/// Serialises a burn record to bytes.
pub fn record_bytes<B: Backend, R: burn::record::Record<B>>(record: R) -> Result<Vec<u8>> {
    Recorder::<B>::record(&recorder(), record, ()).context("serialising record")
}

/// Reads a burn record back.
pub fn load_record<B: Backend, R: burn::record::Record<B>>(
    bytes: Vec<u8>,
    device: &B::Device,
) -> Result<R> {
    Recorder::<B>::load(&recorder(), bytes, device).context("deserialising record")
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("meta", &self.meta)
            .field("model_bytes", &self.model.len())
            .field("optimizer_bytes", &self.optimizer.len())
            .finish()
    }
}

impl Checkpoint {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let meta = serde_json::to_vec(&self.meta)?;
        let mut out =
            Vec::with_capacity(8 + 24 + meta.len() + self.model.len() + self.optimizer.len());
        out.extend_from_slice(MAGIC);
        for section in [&meta, &self.model, &self.optimizer] {
            out.extend_from_slice(&(section.len() as u64).to_le_bytes());
            out.extend_from_slice(section);
        }
        Ok(out)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 8 || &bytes[..8] != MAGIC {
            bail!("not a tlb checkpoint (bad magic)");
        }
        let mut rest = &bytes[8..];
        let mut sections = Vec::with_capacity(3);
        for name in ["metadata", "model", "optimizer"] {
            if rest.len() < 8 {
                bail!("checkpoint truncated before its {name} section");
            }
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            rest = &rest[8..];
            if rest.len() < len {
                bail!("checkpoint truncated inside its {name} section");
            }
            sections.push(rest[..len].to_vec());
            rest = &rest[len..];
        }
        let optimizer = sections.pop().unwrap();
        let model = sections.pop().unwrap();
        let meta = serde_json::from_slice(&sections[0]).context("checkpoint metadata")?;
        Ok(Self {
            meta,
            model,
            optimizer,
        })
    }

    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::decode(&bytes).with_context(|| format!("{}", path.display()))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.encode()?)
    }

    /// Builds the model this checkpoint holds (copies the record; see [`Self::into_model`]).
    pub fn load_model<B: Backend>(&self, device: &B::Device) -> Result<Tlb<B>> {
        model_from(&self.meta, self.model.clone(), device)
    }

    /// Builds the model this checkpoint holds, consuming the checkpoint (no copy).
    pub fn into_model<B: Backend>(self, device: &B::Device) -> Result<Tlb<B>> {
        model_from(&self.meta, self.model, device)
    }
}

fn model_from<B: Backend>(
    meta: &CheckpointMeta,
    record: Vec<u8>,
    device: &B::Device,
) -> Result<Tlb<B>> {
    let model: Tlb<B> = meta.config.model.init(device)?;
    Ok(model.load_record(load_record::<B, _>(record, device)?))
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes a value as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value)?)
}

/// The checkpoint files of a run directory.
#[derive(Debug, Clone)]
pub struct CheckpointDir(pub PathBuf);

impl CheckpointDir {
    pub fn epoch_path(&self, epoch: usize) -> PathBuf {
        self.0.join(format!("epoch-{epoch:04}.ckpt"))
    }
    pub fn best_path(&self) -> PathBuf {
        self.0.join("best.ckpt")
    }
    /// Written when a run stops mid-epoch (cancel, time budget, shutdown).
    pub fn interrupted_path(&self) -> PathBuf {
        self.0.join("last.ckpt")
    }

    /// Epoch checkpoints, oldest first.
    pub fn epochs(&self) -> Vec<(usize, PathBuf)> {
        let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&self.0)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let n = name
                    .strip_prefix("epoch-")?
                    .strip_suffix(".ckpt")?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect();
        found.sort();
        found
    }

    /// The newest state to resume from: the mid-epoch one if it is ahead of the last epoch.
    pub fn latest(&self) -> Result<Option<Checkpoint>> {
        let mut best: Option<Checkpoint> = None;
        let candidates = self
            .epochs()
            .last()
            .map(|(_, p)| p.clone())
            .into_iter()
            .chain(std::iter::once(self.interrupted_path()).filter(|p| p.exists()));
        for path in candidates {
            let ckpt = Checkpoint::read(&path)?;
            let ahead = best
                .as_ref()
                .is_none_or(|b| ckpt.meta.global_step > b.meta.global_step);
            if ahead {
                best = Some(ckpt);
            }
        }
        Ok(best)
    }

    /// Deletes epoch checkpoints beyond the newest `keep`.
    pub fn prune(&self, keep: usize) {
        let all = self.epochs();
        let n = all.len().saturating_sub(keep.max(1));
        for (_, path) in all.into_iter().take(n) {
            let _ = std::fs::remove_file(path);
        }
    }
}

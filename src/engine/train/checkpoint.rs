//! Checkpoints: model and optimiser state plus where the run stands, in one file written
//! atomically (temp file, fsync, rename, fsync of the directory).
//!
//! Layout: `TLBCKPT2`, then three length-prefixed (u64 LE) sections: the JSON
//! [`CheckpointMeta`], the model record and the optimiser record (burn's bincode records),
//! then the CRC-32 (u32 LE) of every byte before it. Reading verifies it, so a file whose
//! bytes changed on disk is refused instead of loaded as garbage weights. `TLBCKPT1` files
//! (no checksum, written before it existed) are still read.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use crate::engine::model::Tlb;

const MAGIC: &[u8; 8] = b"TLBCKPT2";
/// The format before checksums: read, never written.
const MAGIC_V1: &[u8; 8] = b"TLBCKPT1";
/// Temp files of [`write_atomic`] are named `.<file>.tmp-<random>`.
const TEMP_MARKER: &str = ".tmp-";
/// Suffix a checkpoint that failed verification is renamed to.
pub const CORRUPT_SUFFIX: &str = ".corrupt";

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
    /// Epochs the run plans to train under its time budget (`max_minutes`), fixed after its
    /// first epoch from that epoch's measured time, so the schedule anneals by the end of the
    /// budget on any host. `None`: no budget, or not planned yet; then `config.epochs`.
    #[serde(default)]
    pub planned_epochs: Option<usize>,
}

impl CheckpointMeta {
    /// Where a run stands before its first step.
    pub fn start(config: TrainConfig, class_names: Vec<String>) -> Self {
        Self {
            config,
            class_names,
            epoch: 0,
            step_in_epoch: 0,
            global_step: 0,
            val_accuracy: None,
            best_val_accuracy: None,
            best_epoch: None,
            planned_epochs: None,
        }
    }
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
            Vec::with_capacity(8 + 28 + meta.len() + self.model.len() + self.optimizer.len());
        out.extend_from_slice(MAGIC);
        for section in [&meta, &self.model, &self.optimizer] {
            out.extend_from_slice(&(section.len() as u64).to_le_bytes());
            out.extend_from_slice(section);
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Parses and verifies a checkpoint file's bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let [meta, model, optimizer] = match bytes.get(..8) {
            Some(m) if m == MAGIC => {
                let (body, tail) = bytes.split_at(bytes.len().saturating_sub(4).max(8));
                let stored = <[u8; 4]>::try_from(tail).ok().map(u32::from_le_bytes);
                if stored != Some(crc32fast::hash(body)) {
                    // Say what else is wrong, if the layout shows it (a cut-short file).
                    let detail = split_sections(&body[8..])
                        .err()
                        .map_or("its bytes changed".into(), |e| e.to_string());
                    bail!("checksum mismatch: the file is corrupt ({detail})");
                }
                split_sections(&body[8..])?
            }
            Some(m) if m == MAGIC_V1 => split_sections(&bytes[8..])?,
            _ => bail!("not a tlb checkpoint (bad magic)"),
        };
        Ok(Self {
            meta: serde_json::from_slice(meta).context("checkpoint metadata")?,
            model: model.to_vec(),
            optimizer: optimizer.to_vec(),
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

/// The three length-prefixed sections (metadata, model, optimizer) that make up `body`.
fn split_sections(mut body: &[u8]) -> Result<[&[u8]; 3]> {
    let mut sections = [&[][..]; 3];
    for (slot, name) in sections.iter_mut().zip(["metadata", "model", "optimizer"]) {
        let Some((len, rest)) = body.split_first_chunk::<8>() else {
            bail!("checkpoint truncated before its {name} section");
        };
        let len = u64::from_le_bytes(*len) as usize;
        if rest.len() < len {
            bail!("checkpoint truncated inside its {name} section");
        }
        (*slot, body) = rest.split_at(len);
    }
    if !body.is_empty() {
        bail!(
            "checkpoint has {} unexpected bytes after its sections",
            body.len()
        );
    }
    Ok(sections)
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one. A
/// write that fails (a full disk, say) removes its temp file; one cut short by a crash leaves
/// it for [`remove_stale_temp_files`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_pending(path, bytes)?.commit()
}

/// A file written and synced under a temp name beside `path`, not in place yet:
/// [`Pending::commit`] renames it onto `path`; dropped uncommitted, it is deleted.
pub fn write_pending(path: &Path, bytes: &[u8]) -> Result<Pending> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let prefix = format!(
        ".{}{TEMP_MARKER}",
        path.file_name().unwrap_or_default().to_string_lossy()
    );
    // Dropped on any error below, which deletes the file.
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    Ok(Pending {
        tmp,
        path: path.to_path_buf(),
    })
}

/// See [`write_pending`].
#[derive(Debug)]
pub struct Pending {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl Pending {
    /// Renames the file onto its path (replacing what was there atomically) and syncs the
    /// directory.
    pub fn commit(self) -> Result<()> {
        let Self { tmp, path } = self;
        tmp.persist(&path)
            .map_err(|e| e.error)
            .with_context(|| format!("renaming onto {}", path.display()))?;
        if let Ok(d) = std::fs::File::open(path.parent().unwrap_or(Path::new("."))) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Deletes the temp files that writes cut short by a crash left under `root` (recursively);
/// returns how many. Only for a directory no other process writes to.
pub fn remove_stale_temp_files(root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            removed += remove_stale_temp_files(&entry.path());
        } else if name.starts_with('.')
            && name.contains(TEMP_MARKER)
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Writes a value as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value)?)
}

/// A checkpoint file that was passed over, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

/// Renames a checkpoint that failed to read to `<name>.corrupt` (kept for a post-mortem, never
/// read again) and says why it was skipped.
pub(super) fn quarantine(path: &Path, error: anyhow::Error) -> Skipped {
    let mut aside = path.as_os_str().to_owned();
    aside.push(CORRUPT_SUFFIX);
    let _ = std::fs::rename(path, &aside);
    Skipped {
        path: path.to_path_buf(),
        reason: format!("{error:#}"),
    }
}

//! A run's directory: `config.json`, `metrics.jsonl` (one line per epoch, each once) and
//! `checkpoints/`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

use super::checkpoint::write_atomic;
use super::ckpt_dir::CheckpointDir;
use super::events::EpochMetrics;

/// Files of one run: `config.json`, `metrics.jsonl`, `checkpoints/`.
#[derive(Debug, Clone)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    /// The checkpoints of one attempt (`None`: a local run).
    pub fn checkpoints(&self, attempt: Option<u32>) -> CheckpointDir {
        CheckpointDir {
            dir: self.0.join("checkpoints"),
            attempt,
        }
    }
    pub fn metrics_path(&self) -> PathBuf {
        self.0.join("metrics.jsonl")
    }
    /// Keeps the metrics of epochs `1..=epoch` only, each once (the last line written for it):
    /// a resumed run re-runs what came after its checkpoint, and its lines replace these.
    pub(super) fn keep_metrics_through(&self, epoch: usize) -> Result<()> {
        let path = self.metrics_path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let mut kept: Vec<Option<&str>> = vec![None; epoch];
        for line in text.lines() {
            if let Ok(m) = serde_json::from_str::<EpochMetrics>(line) {
                if (1..=epoch).contains(&m.epoch) {
                    kept[m.epoch - 1] = Some(line);
                }
            }
        }
        let out: String = kept
            .into_iter()
            .flatten()
            .map(|l| format!("{l}\n"))
            .collect();
        if out != text {
            write_atomic(&path, out.as_bytes())?;
        }
        Ok(())
    }

    pub(super) fn append_metrics(&self, line: &impl serde::Serialize) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.metrics_path())?;
        writeln!(f, "{}", serde_json::to_string(line)?)?;
        f.sync_data()?;
        Ok(())
    }
}

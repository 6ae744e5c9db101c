//! A run's directory: `config.json`, `metrics.jsonl` (one line per epoch, each once) and
//! `checkpoints/`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};

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
    /// Opens the metrics file for `attempt`, which starts after epoch `epoch`: keeps the
    /// metrics of epochs `1..=epoch` only, each once (a resumed run re-runs what came after
    /// its checkpoint, and its lines replace these), and for a server attempt records where it
    /// starts, so a line that an older attempt appends after this (it had not yet seen that
    /// the job was taken over) is not read as this run's.
    pub fn start_metrics(&self, attempt: Option<u32>, epoch: usize) -> Result<()> {
        let path = self.metrics_path();
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines = parse_lines(&text);
        if let Some(attempt) = attempt {
            lines.push(Line::Start(AttemptStart {
                attempt,
                from_epoch: epoch,
            }));
        }
        let kept = current_epochs(&lines);
        let mut out = String::new();
        for line in &lines {
            let keep = match line {
                Line::Start(_) => true,
                Line::Epoch(e) => {
                    e.metrics.epoch <= epoch && kept.iter().any(|k| std::ptr::eq(*k, e))
                }
                Line::Other(_) => false,
            };
            if keep {
                out.push_str(&line.to_json()?);
                out.push('\n');
            }
        }
        if out != text {
            write_atomic(&path, out.as_bytes())?;
        }
        Ok(())
    }

    /// Appends one epoch's metrics, tagged with the attempt that measured them.
    pub fn append_epoch(&self, attempt: Option<u32>, metrics: &EpochMetrics) -> Result<()> {
        self.append_metrics(&EpochLine {
            metrics: metrics.clone(),
            attempt,
        })
    }

    /// Appends one line (the run's summary, or an epoch through [`Self::append_epoch`]).
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

/// The epochs a metrics file's text holds, one line each (see [`current_epochs`]).
pub fn read_epochs_text(text: &str) -> Vec<EpochMetrics> {
    current_epochs(&parse_lines(text))
        .into_iter()
        .map(|l| l.metrics.clone())
        .collect()
}

/// One epoch's line: the metrics and, in a server job, the attempt that measured them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EpochLine {
    #[serde(flatten)]
    metrics: EpochMetrics,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
}

/// Where a server attempt started: after epoch `from_epoch`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttemptStart {
    attempt: u32,
    from_epoch: usize,
}

enum Line<'a> {
    Epoch(EpochLine),
    Start(AttemptStart),
    /// Anything else (the summary line): kept out of the epochs.
    Other(&'a str),
}

impl Line<'_> {
    fn to_json(&self) -> Result<String> {
        Ok(match self {
            Line::Epoch(e) => serde_json::to_string(e)?,
            Line::Start(s) => serde_json::to_string(s)?,
            Line::Other(s) => s.to_string(),
        })
    }
}

fn parse_lines(text: &str) -> Vec<Line<'_>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            if let Ok(s) = serde_json::from_str::<AttemptStart>(l) {
                Line::Start(s)
            } else if let Ok(e) = serde_json::from_str::<EpochLine>(l) {
                Line::Epoch(e)
            } else {
                Line::Other(l)
            }
        })
        .collect()
}

/// The line that stands for each epoch, in epoch order. A line of attempt `a` (0: untagged)
/// for epoch `e` is void when a later attempt started at or before `e - 1` (it re-runs that
/// epoch, and an older attempt's line, whenever it was appended, is not the job's); of the
/// valid lines of an epoch the latest attempt's, then the last written, stands.
fn current_epochs<'l>(lines: &'l [Line<'_>]) -> Vec<&'l EpochLine> {
    let starts: Vec<&AttemptStart> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Start(s) => Some(s),
            _ => None,
        })
        .collect();
    let mut by_epoch: std::collections::BTreeMap<usize, &EpochLine> = Default::default();
    for line in lines {
        let Line::Epoch(e) = line else { continue };
        let attempt = e.attempt.unwrap_or(0);
        let void = starts
            .iter()
            .any(|s| s.attempt > attempt && s.from_epoch < e.metrics.epoch);
        if void {
            continue;
        }
        let newer = by_epoch
            .get(&e.metrics.epoch)
            .is_none_or(|old| old.attempt.unwrap_or(0) <= attempt);
        if newer {
            by_epoch.insert(e.metrics.epoch, e);
        }
    }
    by_epoch.into_values().collect()
}

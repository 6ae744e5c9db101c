//! The checkpoint files of a run directory, and which of them a run resumes from.
//!
//! A run of a server job is one *attempt* (a claim of the job by a worker); its files carry the
//! attempt in their names (`epoch-0002.a3.ckpt`, `best.a3.ckpt`, `last.a3.ckpt`), so two
//! attempts never overwrite each other's files: a worker that lost its job cannot replace the
//! new owner's checkpoints. Which files are the job's checkpoints is then the job store's
//! word ([`Start::From`]). A local run (`tlb train`) has no attempts: `epoch-0002.ckpt`.

use std::path::{Path, PathBuf};

use super::checkpoint::{quarantine, Checkpoint, Skipped};

/// The checkpoint files of a run directory, as one attempt names and sees them.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    pub dir: PathBuf,
    /// The attempt whose files these are; `None`: a local run, untagged names.
    pub attempt: Option<u32>,
}

/// Where a run starts.
#[derive(Debug, Clone, Default)]
pub enum Start {
    /// From scratch; a local run's older files in the directory are removed.
    #[default]
    Fresh,
    /// From the newest intact checkpoint in the directory (`tlb train --resume`).
    Newest,
    /// From the newest intact of these files, newest first (the checkpoints a job store
    /// committed), with `best`: the files that may hold the best epoch's model. Empty lists
    /// start from scratch.
    From {
        newest_first: Vec<PathBuf>,
        best: Vec<PathBuf>,
    },
}

impl Start {
    pub fn resumes(&self) -> bool {
        !matches!(self, Self::Fresh)
    }
}

/// The attempt tag of a checkpoint file name (`a3` in `epoch-0002.a3.ckpt`); 0 when untagged.
fn attempt_of(stem_rest: &str) -> Option<u32> {
    match stem_rest {
        "" => Some(0),
        tag => tag.strip_prefix(".a")?.parse().ok(),
    }
}

impl CheckpointDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            attempt: None,
        }
    }

    fn named(&self, stem: &str) -> PathBuf {
        match self.attempt {
            Some(a) => self.dir.join(format!("{stem}.a{a}.ckpt")),
            None => self.dir.join(format!("{stem}.ckpt")),
        }
    }
    /// Whether a file of this name is rewritten by its run (the `best` and `last` copies);
    /// epoch files are written once.
    pub fn is_rewritten(name: &str) -> bool {
        ["best", "last"]
            .iter()
            .any(|stem| name.strip_prefix(stem).is_some_and(|r| r.starts_with('.')))
    }
    pub fn epoch_path(&self, epoch: usize) -> PathBuf {
        self.named(&format!("epoch-{epoch:04}"))
    }
    pub fn best_path(&self) -> PathBuf {
        self.named("best")
    }
    /// Written when a run stops mid-epoch (cancel, time budget, shutdown).
    pub fn interrupted_path(&self) -> PathBuf {
        self.named("last")
    }

    /// Epoch checkpoints of this attempt and earlier ones (untagged counting as 0), oldest
    /// first: never a later attempt's, which this one must not touch.
    pub fn epochs(&self) -> Vec<(usize, PathBuf)> {
        self.epochs_of(self.names())
            .into_iter()
            .map(|(n, name)| (n, self.dir.join(name)))
            .collect()
    }

    /// The file names in the directory.
    fn names(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// [`Self::epochs`] among `names`: (epoch, name), oldest first.
    fn epochs_of(&self, names: impl IntoIterator<Item = String>) -> Vec<(usize, String)> {
        let mine = self.attempt.unwrap_or(0);
        let mut found: Vec<(usize, u32, String)> = names
            .into_iter()
            .filter_map(|name| {
                let stem = name.strip_prefix("epoch-")?.strip_suffix(".ckpt")?;
                let (digits, rest) = stem.split_at(stem.find('.').unwrap_or(stem.len()));
                let attempt = attempt_of(rest).filter(|a| *a <= mine)?;
                Some((digits.parse().ok()?, attempt, name))
            })
            .collect();
        found.sort();
        found.into_iter().map(|(n, _, name)| (n, name)).collect()
    }

    /// The newest intact state to resume from: the mid-epoch one (written only when it is
    /// ahead of the last epoch file), else the epoch files newest first; `best.ckpt` (a copy
    /// of the best epoch, written separately) when it is further ahead than those. A file
    /// that fails verification is renamed aside (`*.corrupt`) and reported in `skipped`.
    pub fn latest(&self) -> Resume {
        let newest_first: Vec<PathBuf> = std::iter::once(self.interrupted_path())
            .chain(self.epochs().into_iter().rev().map(|(_, p)| p))
            .collect();
        Resume::newest_of(&newest_first, &[self.best_path()])
    }

    /// The checkpoint of the best epoch `epoch` among `candidates` (the first holding it). A
    /// file that fails verification is renamed aside and reported in `skipped`. When it came
    /// from another file than this attempt's best copy, it is copied there again.
    pub fn best_of(
        &self,
        candidates: &[PathBuf],
        epoch: usize,
        skipped: &mut Vec<Skipped>,
    ) -> Option<Checkpoint> {
        for path in candidates {
            if !path.exists() {
                continue;
            }
            match Checkpoint::read(path) {
                Ok(c) if c.meta.epoch == epoch => {
                    if *path != self.best_path() && self.attempt.is_none() {
                        let _ = c.write(&self.best_path());
                    }
                    return Some(c);
                }
                // A best of a run past the resumed position (its newer files were corrupt).
                Ok(_) => {}
                Err(e) => skipped.push(quarantine(path, e)),
            }
        }
        None
    }

    /// Where a run's best model of epoch `epoch` may be, for [`Self::best_of`].
    pub fn best_candidates(&self, start: &Start, epoch: usize) -> Vec<PathBuf> {
        match start {
            Start::From { best, .. } => best.clone(),
            _ => vec![self.best_path(), self.epoch_path(epoch)],
        }
    }

    /// Deletes epoch checkpoints beyond the newest `keep` (of this attempt and earlier ones),
    /// and the mid-epoch checkpoints of earlier attempts (an epoch file supersedes them).
    pub fn prune(&self, keep: usize) {
        for name in self.prunable(self.names(), keep) {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    /// Which of `names` (the directory's files, here or in an artifact store) [`Self::prune`]
    /// deletes.
    pub fn prunable(&self, names: Vec<String>, keep: usize) -> Vec<String> {
        let all = self.epochs_of(names.iter().cloned());
        let n = all.len().saturating_sub(keep.max(1));
        let mut out: Vec<String> = all.into_iter().take(n).map(|(_, name)| name).collect();
        let Some(mine) = self.attempt else {
            return out;
        };
        out.extend(names.into_iter().filter(|name| {
            name.strip_prefix("last")
                .and_then(|rest| rest.strip_suffix(".ckpt"))
                .and_then(attempt_of)
                .is_some_and(|a| a < mine)
        }));
        out
    }
}

/// What a run resumes from.
#[derive(Debug, Default)]
pub struct Resume {
    /// The newest intact checkpoint, if any.
    pub checkpoint: Option<Checkpoint>,
    /// Newer checkpoints that failed verification, newest first.
    pub skipped: Vec<Skipped>,
}

impl Resume {
    /// The first intact of `newest_first` (missing files passed over, bad ones quarantined),
    /// or an intact one of `best` when that is further ahead.
    pub fn newest_of(newest_first: &[PathBuf], best: &[PathBuf]) -> Self {
        let mut skipped = Vec::new();
        let mut read = |path: &Path| match Checkpoint::read(path) {
            Ok(c) => Some(c),
            Err(e) => {
                skipped.push(quarantine(path, e));
                None
            }
        };
        let newest = newest_first
            .iter()
            .filter(|p| p.exists())
            .find_map(|p| read(p));
        let best = best.iter().filter(|p| p.exists()).find_map(|p| read(p));
        let checkpoint = match (newest, best) {
            (Some(n), Some(b)) if b.meta.global_step > n.meta.global_step => Some(b),
            (Some(n), _) => Some(n),
            (None, b) => b,
        };
        Self {
            checkpoint,
            skipped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CheckpointDir;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn pruning_keeps_the_newest_epochs_and_never_a_later_attempts_files() {
        let dir = CheckpointDir {
            dir: "/x".into(),
            attempt: Some(2),
        };
        let all = names(&[
            "epoch-0001.a1.ckpt",
            "epoch-0002.a1.ckpt",
            "epoch-0003.a2.ckpt",
            "epoch-0004.a2.ckpt",
            "epoch-0005.a3.ckpt",
            "last.a1.ckpt",
            "last.a2.ckpt",
            "last.a3.ckpt",
            "best.a1.ckpt",
            "labels.json",
        ]);
        let mut got = dir.prunable(all.clone(), 2);
        got.sort();
        assert_eq!(
            got,
            names(&["epoch-0001.a1.ckpt", "epoch-0002.a1.ckpt", "last.a1.ckpt"])
        );
        let local = CheckpointDir::new("/x");
        let plain = names(&["epoch-0001.ckpt", "epoch-0002.ckpt", "last.ckpt"]);
        assert_eq!(local.prunable(plain, 1), names(&["epoch-0001.ckpt"]));
    }
}

//! Faults in a run directory, met by the training engine: corrupt checkpoints, weights that
//! turn the loss NaN, duplicated metrics lines and temp files left by cut-short writes.

use crate::common;

use std::path::{Path, PathBuf};

use common::faults::{corrupt, poison};
use tlb::engine::backend::{cpu_device, Cpu, CpuAutodiff};
use tlb::engine::data::Splits;
use tlb::engine::train::{
    read_epochs_text, remove_stale_temp_files, train, write_atomic, Checkpoint, CheckpointDir,
    FnObserver, Preset, RunDir, TrainConfig, TrainEvent,
};

use common::serial;

fn data(dir: &Path) -> Splits {
    common::synthetic_splits(dir)
}

fn config(epochs: usize) -> TrainConfig {
    let mut c = Preset::Tiny.config();
    c.batch_size = 32;
    c.epochs = epochs;
    c.keep_last = 5;
    c
}

/// Runs `train` and collects its events.
fn run(
    cfg: &TrainConfig,
    splits: &Splits,
    out: &Path,
    resume: bool,
) -> (anyhow::Result<f64>, Vec<TrainEvent>) {
    let mut events = Vec::new();
    let mut obs = FnObserver(|e: &TrainEvent| events.push(e.clone()));
    let r = train::<CpuAutodiff>(cfg, splits, out, &cpu_device(), resume, &mut obs)
        .map(|(_, s)| s.test_accuracy.unwrap());
    (r, events)
}

fn weights(path: &Path) -> Vec<f32> {
    let model = Checkpoint::read(path)
        .unwrap()
        .into_model::<Cpu>(&cpu_device())
        .unwrap();
    tlb::engine::train::named_tensors(&model)
        .into_iter()
        .flat_map(|t| t.values)
        .collect()
}

fn metric_epochs(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("epoch").and_then(|e| e.as_u64()))
        .collect()
}

fn skipped(events: &[TrainEvent]) -> Vec<PathBuf> {
    events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::CheckpointSkipped(s) => Some(s.path.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_corrupt_newest_checkpoint_is_skipped_for_the_newest_intact_one() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let splits = data(&tmp.path().join("data"));
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (full, _) = run(&config(3), &splits, &a, false);

    run(&config(2), &splits, &b, false).0.unwrap();
    let dir = CheckpointDir::new(b.join("checkpoints"));
    // Both copies of epoch 2 (the epoch file and best.ckpt, if epoch 2 was the best) rot.
    corrupt(&dir.epoch_path(2));
    if Checkpoint::read(&dir.best_path()).unwrap().meta.epoch == 2 {
        corrupt(&dir.best_path());
    }
    // The run's own lines for epoch 2 are there twice, as after a crash and a resume.
    let text = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    let epoch2 = text.lines().nth(1).unwrap().to_string();
    std::fs::write(b.join("metrics.jsonl"), format!("{text}{epoch2}\n")).unwrap();

    let (resumed, events) = run(&config(3), &splits, &b, true);
    let resumed = resumed.unwrap();
    let passed_over = skipped(&events);
    assert!(
        passed_over.contains(&dir.epoch_path(2)),
        "events: {passed_over:?}"
    );
    assert!(dir.dir.join("epoch-0002.ckpt.corrupt").exists());
    // Resumed from epoch 1 and re-ran epoch 2: exactly the uninterrupted run.
    assert_eq!(
        weights(&CheckpointDir::new(a.join("checkpoints")).epoch_path(3)),
        weights(&dir.epoch_path(3))
    );
    assert_eq!(full.unwrap(), resumed);
    // Each epoch once in the metrics, the one that counts.
    assert_eq!(metric_epochs(&b), vec![1, 2, 3]);
}

#[test]
fn a_run_with_no_intact_checkpoint_fails_instead_of_starting_over() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let splits = data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    run(&config(1), &splits, &out, false).0.unwrap();
    let dir = CheckpointDir::new(out.join("checkpoints"));
    corrupt(&dir.epoch_path(1));
    corrupt(&dir.best_path());
    let (result, events) = run(&config(2), &splits, &out, true);
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("no intact checkpoint"), "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    assert_eq!(skipped(&events).len(), 2);
}

#[test]
fn nan_weights_stop_the_run_at_the_first_step_with_its_position() {
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let splits = data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    run(&config(1), &splits, &out, false).0.unwrap();
    // A checkpoint with a valid checksum but NaN weights (as a diverged run would write).
    let dir = CheckpointDir::new(out.join("checkpoints"));
    poison(&dir.epoch_path(1));
    std::fs::remove_file(dir.best_path()).unwrap();

    let (result, events) = run(&config(3), &splits, &out, true);
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("loss became NaN at epoch 2, step 1"), "{err}");
    assert!(
        !events.iter().any(|e| matches!(e, TrainEvent::Epoch(_))),
        "no epoch may finish on NaN weights"
    );
}

#[test]
fn a_failed_write_leaves_no_temp_file_and_stale_ones_are_swept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("jobs/x/checkpoints");
    std::fs::create_dir_all(dir.join("epoch-0001.ckpt")).unwrap();
    // Renaming a file onto a directory fails after the temp file was written.
    let err = write_atomic(&dir.join("epoch-0001.ckpt"), &[7u8; 4096]).unwrap_err();
    assert!(format!("{err:#}").contains("renaming"), "{err:#}");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["epoch-0001.ckpt".to_string()]);

    // A crash mid-write leaves `.NAME.tmp-*`; the sweep removes those and nothing else.
    std::fs::write(dir.join(".epoch-0002.ckpt.tmp-AbC123"), b"half").unwrap();
    std::fs::write(dir.parent().unwrap().join(".config.json.tmp-9"), b"{").unwrap();
    std::fs::write(dir.join("last.ckpt"), b"keep").unwrap();
    assert_eq!(remove_stale_temp_files(&tmp.path().join("jobs")), 2);
    assert!(dir.join("last.ckpt").exists());
    assert!(!dir.join(".epoch-0002.ckpt.tmp-AbC123").exists());
}

#[test]
fn metrics_with_non_finite_values_round_trip_as_nan() {
    let m = tlb::engine::train::EpochMetrics {
        epoch: 3,
        train_loss: f64::NAN,
        train_accuracy: 0.1,
        val_loss: f64::INFINITY,
        val_accuracy: 0.1,
        lr: 1e-3,
        seconds: 1.0,
        images_per_sec: 10.0,
        data_wait_fraction: 0.0,
        epochs_total: 0,
    };
    let json = serde_json::to_string(&m).unwrap();
    assert!(json.contains("\"train_loss\":null"), "{json}");
    let back: tlb::engine::train::EpochMetrics = serde_json::from_str(&json).unwrap();
    assert!(back.train_loss.is_nan() && back.val_loss.is_nan());
    assert_eq!(back.epoch, 3);
}

fn epoch_line(epoch: usize, train_loss: f64) -> tlb::engine::train::EpochMetrics {
    tlb::engine::train::EpochMetrics {
        epoch,
        train_loss,
        train_accuracy: 0.5,
        val_loss: 1.0,
        val_accuracy: 0.5,
        lr: 1e-3,
        seconds: 1.0,
        images_per_sec: 10.0,
        data_wait_fraction: 0.0,
        epochs_total: 4,
    }
}

/// (epoch, train_loss) of what a reader of the file sees.
fn seen(run: &RunDir) -> Vec<(usize, f64)> {
    let text = std::fs::read_to_string(run.metrics_path()).unwrap();
    read_epochs_text(&text)
        .iter()
        .map(|m| (m.epoch, m.train_loss))
        .collect()
}

#[test]
fn an_old_attempts_late_metrics_lines_never_stand_for_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir(tmp.path().to_path_buf());
    // Attempt 1 trains epochs 1-3 (loss 1.x), checkpointing only epoch 1 durably.
    run.start_metrics(Some(1), 0).unwrap();
    for e in 1..=3 {
        run.append_epoch(Some(1), &epoch_line(e, 1.0 + e as f64 / 10.0))
            .unwrap();
    }
    // Attempt 2 takes the job over from epoch 1: its start drops epochs 2 and 3.
    run.start_metrics(Some(2), 1).unwrap();
    assert_eq!(seen(&run), vec![(1, 1.1)]);
    // Attempt 1 has not noticed yet: it appends epochs 4 and (again) 2 after the takeover.
    run.append_epoch(Some(1), &epoch_line(4, 1.4)).unwrap();
    run.append_epoch(Some(1), &epoch_line(2, 1.25)).unwrap();
    assert_eq!(seen(&run), vec![(1, 1.1)]);
    // Attempt 2's own epoch 2 stands, whatever the order of the lines; a NaN survives.
    run.append_epoch(Some(2), &epoch_line(2, 2.2)).unwrap();
    run.append_epoch(Some(1), &epoch_line(2, 1.26)).unwrap();
    run.append_epoch(Some(2), &epoch_line(3, f64::NAN)).unwrap();
    let now = seen(&run);
    assert_eq!(now[..2], [(1, 1.1), (2, 2.2)]);
    assert_eq!(now[2].0, 3);
    assert!(now[2].1.is_nan());
    assert_eq!(now.len(), 3);
    // Attempt 3 resumes after epoch 2: the file keeps epochs 1 (attempt 1) and 2 (attempt 2),
    // and no late line of attempt 1 is left in it.
    run.start_metrics(Some(3), 2).unwrap();
    assert_eq!(seen(&run), vec![(1, 1.1), (2, 2.2)]);
    let text = std::fs::read_to_string(run.metrics_path()).unwrap();
    assert!(!text.contains("1.4") && !text.contains("1.25"), "{text}");
    // The curves read the same epochs.
    let plotted: Vec<usize> = tlb::engine::viz::read_epochs(&run.metrics_path())
        .unwrap()
        .iter()
        .map(|m| m.epoch)
        .collect();
    assert_eq!(plotted, vec![1, 2]);
}

#[test]
fn a_local_runs_metrics_keep_the_last_line_of_each_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let run = RunDir(tmp.path().to_path_buf());
    run.start_metrics(None, 0).unwrap();
    assert!(!run.metrics_path().exists(), "nothing to write yet");
    run.append_epoch(None, &epoch_line(1, 1.0)).unwrap();
    run.append_epoch(None, &epoch_line(2, 2.0)).unwrap();
    run.append_epoch(None, &epoch_line(2, 2.5)).unwrap();
    assert_eq!(seen(&run), vec![(1, 1.0), (2, 2.5)]);
    run.start_metrics(None, 1).unwrap();
    assert_eq!(seen(&run), vec![(1, 1.0)]);
    let text = std::fs::read_to_string(run.metrics_path()).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(!text.contains("attempt"), "{text}");
}

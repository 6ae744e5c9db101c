use crate::common;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use tlb::engine::backend::{cpu_device, Cpu, CpuAutodiff};
use tlb::engine::train::{loss_and_correct, Preset};

type B = CpuAutodiff;

use common::serial;

#[test]
fn tiny_model_drives_loss_near_zero_on_a_few_images() {
    let _serial = serial();
    let device = cpu_device();
    let cfg = Preset::Tiny.config().model;
    let (imgs, labels) = common::synthetic_images(8, 3);
    let s = 32;
    let data: Vec<f32> = imgs
        .iter()
        .flat_map(|i| i.iter().map(|&v| v as f32 / 255.0))
        .collect();
    let images = Tensor::<B, 4>::from_data(TensorData::new(data, [8, 3, s, s]), &device);
    let images = burn::tensor::module::interpolate(
        images,
        [cfg.image_size, cfg.image_size],
        burn::tensor::ops::InterpolateOptions::new(burn::tensor::ops::InterpolateMode::Bilinear),
    );
    let labels = Tensor::<B, 1, Int>::from_data(
        TensorData::new(labels.iter().map(|&l| l as i64).collect::<Vec<_>>(), [8]),
        &device,
    );
    let mut model = cfg.init::<B>(&device).unwrap();
    let mut optim = AdamWConfig::new().init::<B, _>();
    let mut first = None;
    let mut last = f64::MAX;
    for _ in 0..150 {
        let (loss, _) = loss_and_correct(model.forward(images.clone()), labels.clone(), 0.0);
        let v: f64 = loss.clone().into_scalar().into();
        first.get_or_insert(v);
        last = v;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3, model, grads);
    }
    let first = first.unwrap();
    println!("loss {first:.4} -> {last:.4}");
    assert!(first > 1.5, "initial loss {first} should be near ln(10)");
    assert!(last < 0.05, "loss should approach zero, got {last}");
    let _ = model.num_params();
}

mod resume {
    use super::common;
    use burn::module::{AutodiffModule, Module};
    use burn::tensor::{Distribution, Tensor};
    use std::path::Path;
    use tlb::engine::backend::{cpu_device, Cpu, CpuAutodiff};
    use tlb::engine::data::Splits;
    use tlb::engine::train::{
        train, Checkpoint, CheckpointDir, FnObserver, Outcome, Preset, TrainConfig, TrainEvent,
        TrainObserver,
    };

    fn data(dir: &Path) -> Splits {
        common::synthetic_splits(dir)
    }

    fn config() -> TrainConfig {
        let mut c = Preset::Tiny.config();
        c.batch_size = 32;
        c.model.ffn_dropout = 0.1; // exercise the dropout RNG across the resume
        c.model.attn_dropout = 0.1;
        c
    }

    fn quiet() -> impl TrainObserver<CpuAutodiff> {
        FnObserver(|_: &TrainEvent| {})
    }

    fn weights(path: &Path) -> Vec<f32> {
        let ckpt = Checkpoint::read(path).unwrap();
        let model = ckpt.load_model::<Cpu>(&cpu_device()).unwrap();
        tlb::engine::train::named_tensors(&model)
            .into_iter()
            .flat_map(|t| t.values)
            .collect()
    }

    #[test]
    fn two_epochs_equal_one_then_resume_for_one() {
        let _serial = super::serial();
        let tmp = tempfile::tempdir().unwrap();
        let splits = data(&tmp.path().join("data"));
        let device = cpu_device();
        let mut cfg = config();
        cfg.epochs = 2;
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let (_, full) =
            train::<CpuAutodiff>(&cfg, &splits, &a, &device, false, &mut quiet()).unwrap();
        cfg.epochs = 1;
        train::<CpuAutodiff>(&cfg, &splits, &b, &device, false, &mut quiet()).unwrap();
        cfg.epochs = 2;
        let (_, resumed) =
            train::<CpuAutodiff>(&cfg, &splits, &b, &device, true, &mut quiet()).unwrap();
        let wa = weights(&CheckpointDir::new(a.join("checkpoints")).epoch_path(2));
        let wb = weights(&CheckpointDir::new(b.join("checkpoints")).epoch_path(2));
        assert_eq!(
            wa, wb,
            "resumed run must reproduce the uninterrupted one exactly"
        );
        assert_eq!(full.test_accuracy, resumed.test_accuracy);
        assert_eq!(full.best_val_accuracy, resumed.best_val_accuracy);
    }

    /// The values of `tag` in `events`, with their steps.
    fn scalars(events: &[tlb::engine::tensorboard::proto::Event], tag: &str) -> Vec<(i64, f32)> {
        use tlb::engine::tensorboard::proto::{event::What, summary::value::Value};
        events
            .iter()
            .filter_map(|e| match &e.what {
                Some(What::Summary(s)) => {
                    s.value
                        .iter()
                        .find(|v| v.tag == tag)
                        .and_then(|v| match v.value {
                            Some(Value::SimpleValue(x)) => Some((e.step, x)),
                            _ => None,
                        })
                }
                _ => None,
            })
            .collect()
    }

    /// TensorBoard's view of a resumed run: an event file per run, the second opening with
    /// a START one step past the checkpoint it resumed from (TensorBoard drops what an
    /// earlier attempt logged from that step on); the epoch scalars of both equal
    /// metrics.jsonl, with an attention picture per epoch; a fresh run in the directory
    /// removes the older run's files.
    #[test]
    fn a_resumed_run_logs_a_second_event_file_from_past_its_checkpoint() {
        use tlb::engine::tensorboard::proto::{event::What, summary::value::Value};
        use tlb::engine::tensorboard::{event_files, read_events, ATTENTION_TAG};
        let _serial = super::serial();
        let tmp = tempfile::tempdir().unwrap();
        let splits = data(&tmp.path().join("data"));
        let device = cpu_device();
        let mut cfg = config();
        cfg.batch_size = 4; // steps enough for a few step points per epoch
        cfg.epochs = 1;
        let run = tmp.path().join("run");
        train::<CpuAutodiff>(&cfg, &splits, &run, &device, false, &mut quiet()).unwrap();
        cfg.epochs = 2;
        train::<CpuAutodiff>(&cfg, &splits, &run, &device, true, &mut quiet()).unwrap();
        let files = event_files(&run);
        assert_eq!(files.len(), 2, "{files:?}");
        let (first, second) = (
            read_events(&files[0]).unwrap(),
            read_events(&files[1]).unwrap(),
        );
        let per_epoch = splits.train.len().div_ceil(cfg.batch_size) as i64;
        assert!(
            matches!(&second[1].what, Some(What::SessionLog(l)) if l.status == 1),
            "{:?}",
            second[1]
        );
        assert_eq!(second[1].step, per_epoch + 1);

        let epochs = tlb::engine::viz::read_epochs(&run.join("metrics.jsonl")).unwrap();
        let logged: Vec<(i64, f32)> = [&first, &second]
            .iter()
            .flat_map(|e| scalars(e, "epoch/val_accuracy"))
            .collect();
        let want: Vec<(i64, f32)> = epochs
            .iter()
            .map(|m| (m.epoch as i64 * per_epoch, m.val_accuracy as f32))
            .collect();
        assert_eq!(logged, want);
        let steps = scalars(&first, "step/loss");
        assert!(per_epoch >= 20, "{per_epoch} steps per epoch");
        assert_eq!(steps.len() as i64, per_epoch / 10, "{steps:?}");
        let pictures: Vec<(i32, i32, bool)> = [&first, &second]
            .iter()
            .flat_map(|e| e.iter())
            .filter_map(|e| match &e.what {
                Some(What::Summary(s)) => s.value.iter().find(|v| v.tag == ATTENTION_TAG),
                _ => None,
            })
            .map(|v| match &v.value {
                Some(Value::Image(i)) => (
                    i.width,
                    i.height,
                    i.encoded_image_string.starts_with(b"\x89PNG"),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(pictures, [(256, 128, true), (256, 128, true)]);
        assert_eq!(scalars(&second, "final/best_val_accuracy").len(), 1);

        cfg.epochs = 1;
        train::<CpuAutodiff>(&cfg, &splits, &run, &device, false, &mut quiet()).unwrap();
        assert_eq!(event_files(&run).len(), 1, "the older run's files are gone");
    }

    /// Stops the run after `n` optimiser steps, as a cancel or a shutdown would.
    struct StopAfter(usize, usize);
    impl TrainObserver<CpuAutodiff> for StopAfter {
        fn event(&mut self, e: &TrainEvent) {
            if let TrainEvent::Progress(_) = e {
                self.1 += 1;
            }
        }
        fn should_stop(&mut self) -> bool {
            self.1 >= self.0
        }
    }

    /// Loses the job at the check after its first checkpoint is written (the third time
    /// the run asks), and notes which files had checkpoint names at that moment.
    struct LostWhileWriting {
        dir: std::path::PathBuf,
        asked: usize,
        named_at_the_check: Option<Vec<String>>,
    }
    impl TrainObserver<CpuAutodiff> for LostWhileWriting {
        fn event(&mut self, _: &TrainEvent) {}
        fn may_write(&mut self) -> bool {
            self.asked += 1;
            if self.asked < 3 {
                return true;
            }
            self.named_at_the_check = Some(names(&self.dir));
            false
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A run that loses its job while writing a checkpoint never shows a complete file under
    /// a checkpoint's name (a backup or `tlb export` could pick it up), and leaves no file.
    #[test]
    fn a_run_that_loses_the_job_while_writing_never_names_its_checkpoint() {
        let _serial = super::serial();
        let tmp = tempfile::tempdir().unwrap();
        let splits = data(&tmp.path().join("data"));
        let mut cfg = config();
        cfg.epochs = 2;
        let out = tmp.path().join("run");
        let mut lost = LostWhileWriting {
            dir: out.join("checkpoints"),
            asked: 0,
            named_at_the_check: None,
        };
        let (outcome, _) =
            train::<CpuAutodiff>(&cfg, &splits, &out, &cpu_device(), false, &mut lost).unwrap();
        assert_eq!(outcome, Outcome::Abandoned);
        let at_check = lost.named_at_the_check.expect("asked after the write");
        assert!(
            !at_check.is_empty() && at_check.iter().all(|n| n.starts_with('.')),
            "only temp files may exist before the check: {at_check:?}"
        );
        assert_eq!(names(&out.join("checkpoints")), Vec::<String>::new());
    }

    #[test]
    fn a_run_stopped_mid_epoch_resumes_to_the_same_result() {
        let _serial = super::serial();
        let tmp = tempfile::tempdir().unwrap();
        let splits = data(&tmp.path().join("data"));
        let device = cpu_device();
        let mut cfg = config();
        cfg.epochs = 2;
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        train::<CpuAutodiff>(&cfg, &splits, &a, &device, false, &mut quiet()).unwrap();
        // 4 steps per epoch: stop after 6, in the middle of epoch 2
        let (outcome, partial) =
            train::<CpuAutodiff>(&cfg, &splits, &b, &device, false, &mut StopAfter(6, 0)).unwrap();
        assert_eq!(outcome, Outcome::Interrupted);
        assert_eq!(partial.epochs_completed, 1);
        let dir = CheckpointDir::new(b.join("checkpoints"));
        let last = Checkpoint::read(&dir.interrupted_path()).unwrap();
        assert_eq!(
            (
                last.meta.epoch,
                last.meta.step_in_epoch,
                last.meta.global_step
            ),
            (1, 2, 6)
        );
        let (outcome, _) =
            train::<CpuAutodiff>(&cfg, &splits, &b, &device, true, &mut quiet()).unwrap();
        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(
            weights(&CheckpointDir::new(a.join("checkpoints")).epoch_path(2)),
            weights(&dir.epoch_path(2))
        );
        assert!(
            !dir.interrupted_path().exists(),
            "the epoch checkpoint supersedes last.ckpt"
        );
    }

    #[test]
    fn checkpoints_round_trip_to_identical_logits_and_keep_last_and_best() {
        let _serial = super::serial();
        let tmp = tempfile::tempdir().unwrap();
        let splits = data(&tmp.path().join("data"));
        let device = cpu_device();
        let mut cfg = config();
        cfg.epochs = 4;
        cfg.keep_last = 2;
        let out = tmp.path().join("run");
        let mut events = Vec::new();
        let mut obs = FnObserver(|e: &TrainEvent| events.push(e.clone()));
        let (_, summary) =
            train::<CpuAutodiff>(&cfg, &splits, &out, &device, false, &mut obs).unwrap();
        let epochs: Vec<_> = events
            .iter()
            .filter(|e| matches!(e, TrainEvent::Epoch(_)))
            .collect();
        assert_eq!(epochs.len(), 4);
        assert!(events
            .iter()
            .any(|e| matches!(e, TrainEvent::Progress(p) if p.images_per_sec > 0.0)));
        assert!(matches!(events.last(), Some(TrainEvent::Finished(_))));
        let dir = CheckpointDir::new(out.join("checkpoints"));
        let kept: Vec<usize> = dir.epochs().into_iter().map(|(e, _)| e).collect();
        assert_eq!(kept, vec![3, 4]);
        let best = Checkpoint::read(&dir.best_path()).unwrap();
        assert_eq!(best.meta.best_epoch, summary.best_epoch);
        assert_eq!(best.meta.val_accuracy, summary.best_val_accuracy);

        // the metrics file ends with the test figure
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert!(last["test_accuracy"].as_f64().is_some(), "{last}");
        assert_eq!(text.lines().count(), 5);

        // same logits after a write/read cycle
        let ckpt = Checkpoint::read(&dir.epoch_path(4)).unwrap();
        let model = ckpt.load_model::<CpuAutodiff>(&device).unwrap().valid();
        let copy = tmp.path().join("copy.ckpt");
        ckpt.write(&copy).unwrap();
        let again = Checkpoint::read(&copy)
            .unwrap()
            .load_model::<Cpu>(&device)
            .unwrap();
        let x = Tensor::<Cpu, 4>::random([4, 3, 16, 16], Distribution::Uniform(0.0, 1.0), &device);
        assert_eq!(
            model.forward(x.clone()).into_data(),
            again.forward(x).into_data()
        );
        assert_eq!(model.num_params(), again.num_params());

        // a damaged file is an error, not a panic
        let bytes = std::fs::read(&copy).unwrap();
        std::fs::write(&copy, &bytes[..bytes.len() / 2]).unwrap();
        assert!(format!("{:#}", Checkpoint::read(&copy).unwrap_err()).contains("truncated"));
        std::fs::write(&copy, b"hello").unwrap();
        assert!(Checkpoint::read(&copy).is_err());
    }

    #[test]
    fn a_fresh_run_refuses_a_dataset_with_other_classes_and_resume_refuses_another_config() {
        let _serial = super::serial();
        let tmp = tempfile::tempdir().unwrap();
        let splits = data(&tmp.path().join("data"));
        let device = cpu_device();
        let mut cfg = config();
        cfg.model.num_classes = 3;
        let err = train::<CpuAutodiff>(&cfg, &splits, tmp.path(), &device, false, &mut quiet())
            .unwrap_err();
        assert!(err.to_string().contains("num_classes is 3"), "{err}");
        let mut cfg = config();
        cfg.epochs = 1;
        train::<CpuAutodiff>(&cfg, &splits, tmp.path(), &device, false, &mut quiet()).unwrap();
        cfg.lr *= 2.0;
        let err = train::<CpuAutodiff>(&cfg, &splits, tmp.path(), &device, true, &mut quiet())
            .unwrap_err();
        assert!(err.to_string().contains("another config"), "{err}");
    }

    /// Under a time budget the run plans its epochs from the first one's time, and its cosine
    /// schedule ends annealed at the planned end instead of being cut off high.
    #[test]
    fn a_time_budget_plans_the_epochs_and_anneals_by_its_end() {
        let _serial = super::serial();
        let tmp = tempfile::tempdir().unwrap();
        let splits = data(&tmp.path().join("data"));
        let device = cpu_device();
        let mut cfg = config();
        cfg.epochs = 10_000;
        cfg.max_minutes = 0.05; // 3 s
        let out = tmp.path().join("run");
        let (outcome, summary) =
            train::<CpuAutodiff>(&cfg, &splits, &out, &device, false, &mut quiet()).unwrap();
        assert_eq!(outcome, Outcome::Completed);
        let dir = CheckpointDir::new(out.join("checkpoints"));
        let (_, newest) = dir.epochs().pop().unwrap();
        let planned = Checkpoint::read(&newest).unwrap().meta.planned_epochs;
        let planned = planned.expect("a budgeted run plans its epochs");
        assert!((1..10_000).contains(&planned), "{planned}");
        assert!(summary.epochs_completed <= planned, "{summary:?}");
        // Every epoch's metrics line says how many epochs the run trains: the plan.
        let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let totals: Vec<u64> = lines
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|v| v.get("epochs_total").and_then(|t| t.as_u64()))
            .collect();
        assert_eq!(totals.len(), summary.epochs_completed, "{lines}");
        assert!(totals.iter().all(|&t| t == planned as u64), "{totals:?}");
        // The schedule of the plan reaches its floor at the planned end.
        let spe = splits.train.len().div_ceil(cfg.batch_size);
        let last = cfg.lr_at(planned * spe - 1, spe, planned);
        let floor = cfg.lr * cfg.min_lr_ratio;
        assert!(
            last < floor * 1.05 + 1e-12,
            "lr {last} at the end, floor {floor}"
        );
        // Without a budget, nothing is planned.
        assert_eq!(cfg.epochs_within(100.0, 9.0), 10);
        cfg.epochs = 4;
        assert_eq!(
            (cfg.epochs_within(100.0, 9.0), cfg.epochs_within(1.0, 9.0)),
            (4, 1)
        );
    }

    #[test]
    fn export_writes_documented_pytorch_names_and_layouts() {
        let _serial = super::serial();
        let device = cpu_device();
        let cfg = Preset::Tiny.config().model;
        let model = cfg.init::<Cpu>(&device).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("m.safetensors");
        let names: Vec<String> = (0..cfg.num_classes).map(|c| format!("c{c}")).collect();
        tlb::engine::train::export_safetensors(&model, &names, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // The same weights give the same bytes, every time.
        for i in 0..8 {
            let again = tmp.path().join(format!("again-{i}.safetensors"));
            tlb::engine::train::export_safetensors(&model, &names, &again).unwrap();
            assert!(
                std::fs::read(&again).unwrap() == bytes,
                "export {i} differs"
            );
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let d = cfg.embed_dim;
        let shape = |n: &str| st.tensor(n).unwrap().shape().to_vec();
        assert_eq!(shape("patch_embed.weight"), vec![d, 3, 4, 4]);
        assert_eq!(shape("pos_embed"), vec![1, cfg.num_tokens(), d]);
        assert_eq!(
            shape("perceptual.0.ffn_in.weight"),
            vec![4 * d, d],
            "torch Linear is [out, in]"
        );
        assert_eq!(shape("bottleneck.norm_key.bias"), vec![d]);
        assert_eq!(shape("head.weight"), vec![cfg.num_classes, d]);
        let total: usize = st
            .tensors()
            .iter()
            .map(|(_, t)| t.shape().iter().product::<usize>())
            .sum();
        assert_eq!(
            total,
            model.num_params(),
            "every parameter is exported once"
        );
        // values survive: head bias is zero-initialised, ffn_in weight is transposed
        let w = model.perceptual[0]
            .ffn_in
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let t = st.tensor("perceptual.0.ffn_in.weight").unwrap();
        let first_row: Vec<f32> = t.data()[..4 * d]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let column0: Vec<f32> = (0..d).map(|i| w[i * 4 * d]).collect();
        assert_eq!(first_row, column0);
    }
}

#[test]
fn a_cancel_flag_stops_training_and_events_arrive_on_the_channel() {
    let _serial = serial();
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tlb::engine::data::{DatasetFormat, DatasetSpec};
    use tlb::engine::train::{train, ChannelObserver, Outcome, TrainEvent};

    let tmp = tempfile::tempdir().unwrap();
    common::write_synthetic_cifar(&tmp.path().join("data"), 160, 20);
    let splits = DatasetSpec {
        format: DatasetFormat::Cifar10,
        path: tmp.path().join("data"),
    }
    .load()
    .unwrap();
    let mut cfg = Preset::Tiny.config();
    cfg.batch_size = 16;
    cfg.epochs = 50;
    let (tx, rx) = crossbeam_channel::unbounded();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let watcher = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for e in rx.iter() {
            if matches!(e, TrainEvent::Epoch(_)) {
                flag.store(true, Ordering::Relaxed);
            }
            seen.push(e);
        }
        seen
    });
    let mut obs = ChannelObserver { events: tx, cancel };
    let device = cpu_device();
    let (outcome, summary) = train::<B>(
        &cfg,
        &splits,
        &tmp.path().join("run"),
        &device,
        false,
        &mut obs,
    )
    .unwrap();
    drop(obs);
    let seen = watcher.join().unwrap();
    assert_eq!(outcome, Outcome::Interrupted);
    assert!(summary.epochs_completed < 50, "stopped long before the end");
    assert!(matches!(seen.first(), Some(TrainEvent::Started { .. })));
    assert!(seen
        .iter()
        .any(|e| matches!(e, TrainEvent::CheckpointSaved { .. })));
    assert!(!seen.iter().any(|e| matches!(e, TrainEvent::Finished(_))));
}

#[test]
fn replicas_on_two_threads_give_the_gradients_of_the_whole_batch() {
    use burn::tensor::Distribution;
    use tlb::engine::train::step_grads;
    let _serial = serial();
    let device = cpu_device();
    let cfg = Preset::Tiny.config().model;
    let model = cfg.init::<B>(&device).unwrap();
    let images = Tensor::<B, 4>::random([10, 3, 16, 16], Distribution::Uniform(0.0, 1.0), &device);
    let labels = Tensor::<B, 1, Int>::from_data(
        TensorData::new((0..10i64).collect::<Vec<_>>(), [10]),
        &device,
    );
    let one = step_grads(&model, images.clone(), labels.clone(), 1, 10, 0.0, 1);
    let two = step_grads(&model, images.clone(), labels.clone(), 2, 10, 0.0, 1);
    let three = step_grads(&model, images, labels, 3, 2, 0.0, 1);
    assert_eq!(one.correct, two.correct);
    assert!(
        (one.loss_sum - two.loss_sum).abs() < 1e-4 && (one.loss_sum - three.loss_sum).abs() < 1e-4
    );
    let params = [
        (&model.head.weight, "head"),
        (&model.perceptual[0].query.weight, "perceptual.0.query"),
        (&model.bottleneck.ffn_out.weight, "bottleneck.ffn_out"),
    ];
    for (param, name) in params {
        let g1 = one
            .grads
            .get::<Cpu, 2>(param.id)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for other in [&two.grads, &three.grads] {
            let g = other
                .get::<Cpu, 2>(param.id)
                .unwrap()
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            for (u, v) in g1.iter().zip(&g) {
                assert!((u - v).abs() < 1e-5 + 1e-3 * u.abs(), "{name}: {u} vs {v}");
            }
        }
    }
    let conv = one
        .grads
        .get::<Cpu, 4>(model.patch_embed.weight.id)
        .unwrap();
    assert!(
        conv.abs().sum().into_scalar() > 0.0,
        "gradients reach the patch embedding"
    );
}

//! Offline subcommands: train, evaluate, plot, attention (the overlay picture), export.

use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use indicatif::{ProgressBar, ProgressStyle};

use super::{AttentionArgs, DataArgs, EvalArgs, ExportArgs, PlotArgs, TrainLocalArgs};
use crate::engine::data::{decode_planar, DatasetSpec, Splits};
use crate::engine::infer::{attention_maps, eval_batch, STORE_SIDE};
use crate::engine::train::{
    checkpoint_safetensors, evaluate, train, write_atomic, Checkpoint, FnObserver, Preset,
    TrainConfig, TrainEvent,
};
use crate::engine::viz::{attention_picture, plot_curves, read_epochs, token_scores};
use crate::with_backend;

fn load_data(args: &DataArgs) -> Result<Splits> {
    let mut spec = DatasetSpec::detect(&args.data);
    if let Some(f) = args.format {
        spec.format = f;
    }
    let splits = spec.load()?;
    eprintln!(
        "data: {} train / {} validation / {} test images, {} classes ({})",
        splits.train.len(),
        splits.val.len(),
        splits.test.as_ref().map_or(0, |t| t.len()),
        splits.class_names().len(),
        args.data.display()
    );
    Ok(splits)
}

/// The preset or config file, with the command-line overrides applied.
pub fn resolve_config(a: &TrainLocalArgs, num_classes: usize) -> Result<TrainConfig> {
    let mut c = match &a.config {
        Some(path) => serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?,
        None => a
            .preset
            .parse::<Preset>()
            .map_err(anyhow::Error::msg)?
            .config(),
    };
    c.model.num_classes = num_classes;
    if let Some(v) = a.epochs {
        c.epochs = v;
    }
    if let Some(v) = a.batch_size {
        c.batch_size = v;
    }
    if let Some(v) = a.micro_batch {
        c.micro_batch = v;
    }
    if let Some(v) = a.lr {
        c.lr = v;
    }
    if let Some(v) = a.weight_decay {
        c.weight_decay = v;
    }
    if let Some(v) = a.dropout {
        (c.model.attn_dropout, c.model.ffn_dropout) = (v, v);
    }
    if let Some(v) = a.readout {
        c.model.readout = v;
    }
    if let Some(v) = a.seed {
        c.seed = v;
    }
    if let Some(v) = a.max_minutes {
        c.max_minutes = v;
    }
    if let Some(v) = a.precision {
        c.precision = v;
    }
    a.device.supports(c.precision).map_err(anyhow::Error::msg)?;
    if c.replicas == 0 {
        c.replicas = a.device.replicas();
    }
    c.validate()?;
    Ok(c)
}

pub fn train_local(a: TrainLocalArgs) -> Result<()> {
    let splits = load_data(&a.data)?;
    let config = resolve_config(&a, splits.class_names().len())?;
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} epoch {prefix} [{bar:30}] {pos}/{len} steps {msg} (eta {eta})",
        )?
        .progress_chars("=> "),
    );
    let say = |line: String| {
        if a.quiet {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut observer = FnObserver(|e: &TrainEvent| {
        match e {
        TrainEvent::Started {
            resumed_from_step,
            total_steps,
            event_file,
        } => {
            bar.set_length(*total_steps as u64);
            bar.set_position(*resumed_from_step as u64);
            if let Some(file) = event_file {
                say(format!("tensorboard: {}", file.display()));
            }
        }
        TrainEvent::Progress(p) => {
            bar.set_prefix(format!("{}", p.epoch + 1));
            bar.set_position(p.global_step as u64);
            bar.set_message(format!(
                "loss {:.3} acc {:.1}% {:.0} img/s",
                p.loss,
                p.accuracy * 100.0,
                p.images_per_sec
            ));
        }
        TrainEvent::Epoch(m) => say(format!(
            "epoch {:>3}: train loss {:.4} acc {:.2}% | val loss {:.4} acc {:.2}% | {:.0} img/s, {:.0}s, data wait {:.1}%",
            m.epoch,
            m.train_loss,
            m.train_accuracy * 100.0,
            m.val_loss,
            m.val_accuracy * 100.0,
            m.images_per_sec,
            m.seconds,
            m.data_wait_fraction * 100.0
        )),
        TrainEvent::CheckpointSaved { path, best, .. } => {
            tracing::debug!(path = %path.display(), best, "checkpoint saved")
        }
        TrainEvent::CheckpointSkipped(s) => say(format!(
            "skipped checkpoint {} ({}); resuming from an older one",
            s.path.display(),
            s.reason
        )),
        TrainEvent::Finished(f) => say(format!(
            "done: {} epochs, best validation {:.2}% (epoch {}), test {}",
            f.epochs_completed,
            f.best_val_accuracy.unwrap_or(0.0) * 100.0,
            f.best_epoch.unwrap_or(0),
            f.test_accuracy
                .map_or("n/a".into(), |t| format!("{:.2}%", t * 100.0))
        )),
    }
    });
    with_backend!(a.device.clone(), |B, device| {
        train::<B>(&config, &splits, &a.out, &device, a.resume, &mut observer)?;
    });
    bar.finish_and_clear();
    eprintln!("metrics: {}", a.out.join("metrics.jsonl").display());
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let ckpt = Checkpoint::read(&a.checkpoint)?;
    let splits = load_data(&a.data)?;
    let split = match a.split.as_str() {
        "val" | "validation" => splits.val.clone(),
        "test" => splits
            .test
            .clone()
            .context("this dataset has no test split")?,
        "train" => splits.train.clone(),
        other => bail!("unknown split '{other}' (expected train, val or test)"),
    };
    let cfg = &ckpt.meta.config;
    with_backend!(a.device.clone(), |B, device| {
        let model = ckpt.load_model::<B>(&device)?.valid();
        let threads = a.device.replicas();
        let (loss, acc) = evaluate(
            &model,
            &split,
            cfg.model.image_size,
            256,
            threads,
            &device,
            &mut || {},
        );
        println!(
            "{}",
            serde_json::json!({"split": a.split, "images": split.len(), "loss": loss, "accuracy": acc})
        );
    });
    Ok(())
}

pub fn plot(a: PlotArgs) -> Result<()> {
    let Some(metrics) = a.metrics else {
        let search = a.search.as_deref().expect("--metrics or --search");
        return super::search::plot(&a.server, search, &a.out);
    };
    let path = if metrics.is_dir() {
        metrics.join("metrics.jsonl")
    } else {
        metrics
    };
    plot_curves(&read_epochs(&path)?, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// Reads an image file into the planar layout the model's data path starts from.
pub fn read_image(path: &Path) -> Result<(Vec<u8>, image::RgbImage)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let planar = decode_planar(&bytes, STORE_SIDE)
        .with_context(|| format!("{}: not a decodable PNG/JPEG", path.display()))?;
    let rgb = image::load_from_memory(&bytes)?.to_rgb8();
    Ok((planar, rgb))
}

pub fn attention(a: AttentionArgs) -> Result<()> {
    let ckpt = Checkpoint::read(&a.checkpoint)?;
    let cfg = ckpt.meta.config.model.clone();
    let (planar, rgb) = read_image(&a.image)?;
    let device = crate::engine::backend::cpu_device();
    let model = ckpt.load_model::<crate::engine::backend::Cpu>(&device)?;
    let maps = attention_maps(
        &model,
        eval_batch(&[&planar], STORE_SIDE, cfg.image_size),
        &device,
    );
    let scores = token_scores(&maps.weights, maps.dims);
    attention_picture(&rgb, &scores, cfg.grid_size(), a.size, a.side_by_side)
        .save(&a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    let (class, p) = crate::engine::infer::top_k(&maps.probabilities, 1)[0];
    println!(
        "{}",
        serde_json::json!({
            "prediction": ckpt.meta.class_names.get(class), "probability": p,
            "grid": cfg.grid_size(), "chunks": maps.dims[0], "out": a.out,
        })
    );
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    write_atomic(&a.out, &checkpoint_safetensors(&a.checkpoint)?)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

//! `tlb bench`: training and inference throughput on synthetic batches.

use std::time::Instant;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor};

use super::BenchArgs;
use crate::engine::train::{forward_sharded, step_grads, Preset, TrainConfig};
use crate::names::Named;
use crate::with_backend;

/// Peak resident memory of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn run<B: AutodiffBackend>(
    cfg: &TrainConfig,
    a: &BenchArgs,
    device: &B::Device,
) -> Result<serde_json::Value> {
    let s = cfg.model.image_size;
    let mut model = cfg.model.init::<B>(device)?.with_precision(a.precision);
    let mut optim = AdamWConfig::new().init::<B, _>();
    let images =
        Tensor::<B, 4>::random([a.batch, 3, s, s], Distribution::Uniform(0.0, 1.0), device);
    let labels = Tensor::<B, 1, Int>::from_data(
        (0..a.batch as i64)
            .map(|i| i % cfg.model.num_classes as i64)
            .collect::<Vec<_>>()
            .as_slice(),
        device,
    );
    let replicas = a.device.replicas();
    let mut step = |model: crate::engine::model::Tlb<B>| {
        let step = step_grads(
            &model,
            images.clone(),
            labels.clone(),
            replicas,
            a.batch,
            0.0,
            0,
        );
        optim.step(cfg.lr, model, step.grads)
    };
    let warmup = 2;
    for _ in 0..warmup {
        model = step(model);
    }
    B::sync(device)?;
    let t = Instant::now();
    for _ in 0..a.steps {
        model = step(model);
    }
    B::sync(device)?;
    let train_secs = t.elapsed().as_secs_f64();

    let valid = model.valid();
    let eval_images = images.inner();
    let infer = |m: &crate::engine::model::Tlb<B::InnerBackend>| {
        let _ = forward_sharded(m, eval_images.clone(), replicas)
            .argmax(1)
            .into_data();
    };
    for _ in 0..warmup {
        infer(&valid);
    }
    let t = Instant::now();
    for _ in 0..a.steps {
        infer(&valid);
    }
    <B::InnerBackend as Backend>::sync(device)?;
    let infer_secs = t.elapsed().as_secs_f64();
    let images_total = (a.batch * a.steps) as f64;
    Ok(serde_json::json!({
        "preset": a.preset,
        "backend": B::name(device),
        "precision": a.precision.name(),
        "batch": a.batch,
        "threads": replicas,
        "steps": a.steps,
        "train_images_per_sec": images_total / train_secs,
        "infer_images_per_sec": images_total / infer_secs,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let cfg = a
        .preset
        .parse::<Preset>()
        .map_err(anyhow::Error::msg)?
        .config();
    a.device.supports(a.precision).map_err(anyhow::Error::msg)?;
    let line = with_backend!(a.device.clone(), |B, device| run::<B>(&cfg, &a, &device)?);
    println!("{line}");
    Ok(())
}

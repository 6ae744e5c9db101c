//! `tlb bench`: training and inference throughput on synthetic batches.

use std::time::Instant;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Int, Tensor};

use super::BenchArgs;
use crate::engine::train::{adamw, forward_sharded, step_grads, Preset, TrainConfig};
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
    let mut optim = adamw::<B, crate::engine::model::Tlb<B>>(1e-4, 1e-5);
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
    let launches = Launches::new();
    let t = Instant::now();
    for _ in 0..a.steps {
        model = step(model);
    }
    B::sync(device)?;
    let train_secs = t.elapsed().as_secs_f64();
    let train_launches = launches.since();

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
    <B::InnerBackend as Backend>::sync(device)?;
    let launches = Launches::new();
    let t = Instant::now();
    for _ in 0..a.steps {
        infer(&valid);
    }
    <B::InnerBackend as Backend>::sync(device)?;
    let infer_secs = t.elapsed().as_secs_f64();
    let infer_launches = launches.since();
    let per = |n: Option<u64>| n.map(|n| n as f64 / a.steps as f64);
    let images_total = (a.batch * a.steps) as f64;
    Ok(serde_json::json!({
        "preset": a.preset,
        "backend": B::name(device),
        "precision": a.precision.name(),
        "fused": !a.unfused,
        "batch": a.batch,
        "threads": replicas,
        "steps": a.steps,
        "train_images_per_sec": images_total / train_secs,
        "infer_images_per_sec": images_total / infer_secs,
        "peak_rss_mib": peak_rss_mib(),
        "train_launches_per_step": per(train_launches),
        "infer_launches_per_pass": per(infer_launches),
    }))
}

/// Kernel launches counted in cubecl's profiling log, when `TLB_LAUNCH_LOG` names it: with
/// the level `minimal` (a `cubecl.toml` in the working directory; `benches/launches.sh`
/// writes one) cubecl writes one `Executing <kernel>` line per launch. Nothing on the CPU.
struct Launches(Option<(std::path::PathBuf, u64)>);

impl Launches {
    /// The count so far (after the device was synchronised).
    fn new() -> Self {
        let path = std::env::var_os("TLB_LAUNCH_LOG").map(std::path::PathBuf::from);
        Self(path.map(|p| {
            let n = Self::count(&p);
            (p, n)
        }))
    }

    /// cubecl's logger writes from its own thread: the count settles once nothing changes.
    fn count(path: &std::path::Path) -> u64 {
        let read = || {
            std::fs::read_to_string(path)
                .map(|t| t.lines().filter(|l| l.contains("Executing ")).count() as u64)
                .unwrap_or(0)
        };
        let mut last = read();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let now = read();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// Launches since [`Self::new`] (the device synchronised before).
    fn since(&self) -> Option<u64> {
        self.0.as_ref().map(|(p, n)| Self::count(p) - n)
    }
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let cfg = a
        .preset
        .parse::<Preset>()
        .map_err(anyhow::Error::msg)?
        .config();
    a.device.supports(a.precision).map_err(anyhow::Error::msg)?;
    if a.unfused {
        crate::engine::model::fused::disable_everywhere();
    }
    let line = with_backend!(a.device.clone(), |B, device| run::<B>(&cfg, &a, &device)?);
    println!("{line}");
    Ok(())
}

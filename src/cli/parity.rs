//! `tlb parity`: the same model, batch and optimiser steps on a device and on the CPU, compared
//! number by number. burn's CUDA kernel fusion and autotune have had wrong-result bugs: run
//! this on the device before trusting a speed figure from it.
//!
//! The CPU side is the reference (f32, the fused CPU block, itself tested against burn's
//! composition). Dropout is off on both sides (their random streams differ). Each comparison is
//! `‖device − cpu‖ / ‖cpu‖`, for a gradient with `‖cpu‖` at least 1/100 of the largest
//! parameter gradient's norm (some are zero in exact arithmetic). Prints one JSON
//! line per comparison and a summary line; exits with an error when a comparison is over its
//! tolerance or not finite.

use anyhow::{bail, Result};
use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};

use super::ParityArgs;
use crate::engine::backend::{cpu_device, CpuAutodiff, DeviceSpec};
use crate::engine::model::{host_f32, set_dropout_stream, Precision, Tlb};
use crate::engine::train::{
    adamw, gradient_model, load_record, loss_and_correct, named_tensors, record_bytes, Preset,
    TrainConfig,
};
use crate::names::Named;
use crate::with_backend;

/// What one side computed: the loss, the logits, every parameter's gradient (by name), and
/// the logits after `steps` AdamW steps.
struct Side {
    loss: f64,
    logits: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
    logits_after: Vec<f32>,
}

fn side<B: AutodiffBackend>(
    cfg: &TrainConfig,
    record: Vec<u8>,
    data: &(Vec<f32>, Vec<i64>),
    precision: Precision,
    steps: usize,
    device: &B::Device,
) -> Result<Side> {
    let s = cfg.model.image_size;
    let batch = data.1.len();
    let model: Tlb<B> = cfg
        .model
        .init::<B>(device)?
        .load_record(load_record::<B, _>(record, device)?)
        .with_precision(precision);
    let images =
        Tensor::<B, 4>::from_data(TensorData::new(data.0.clone(), [batch, 3, s, s]), device);
    let labels = Tensor::<B, 1, Int>::from_data(TensorData::new(data.1.clone(), [batch]), device);
    // Each training pass draws its dropout masks from its own stream, the same on both sides.
    set_dropout_stream(0);
    let logits = model.forward(images.clone());
    let (loss, _) = loss_and_correct(logits.clone(), labels.clone(), 0.0);
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let grads = named_tensors(&gradient_model(&model, &grads))
        .into_iter()
        .map(|t| (t.name, t.values))
        .collect();
    let mut optim = adamw::<B, Tlb<B>>(1e-4, 1e-5);
    let mut trained = model.clone();
    for step in 0..steps {
        set_dropout_stream(1 + step as u64);
        let logits = trained.forward(images.clone());
        let (loss, _) = loss_and_correct(logits, labels.clone(), 0.0);
        let grads = GradientsParams::from_grads(loss.backward(), &trained);
        trained = optim.step(cfg.lr, trained, grads);
    }
    Ok(Side {
        loss: host_f32(loss)[0] as f64,
        logits: host_f32(logits),
        grads,
        logits_after: host_f32(trained.valid().forward(images.inner())),
    })
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// `‖a − b‖ / max(‖b‖, floor)` (NaN when either holds a NaN or infinity).
fn rel_err(a: &[f32], b: &[f32], floor: f64) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        if !x.is_finite() || !y.is_finite() {
            return f64::NAN;
        }
        diff += (x - y) * (x - y);
        norm += y * y;
    }
    if a.len() != b.len() {
        return f64::NAN;
    }
    diff.sqrt() / norm.sqrt().max(floor).max(f64::MIN_POSITIVE)
}

/// Whether the device drops the values the CPU drops: tlb's cube kernels compute the CPU's
/// masks (`model::dropout`) in f32 on wgpu and on CUDA without burn's fusion; elsewhere the
/// device's own random generator draws them.
fn same_masks(a: &ParityArgs) -> bool {
    match a.device {
        DeviceSpec::Cpu => true,
        DeviceSpec::Wgpu(_) => a.precision == Precision::F32,
        DeviceSpec::Cuda(_) => a.precision == Precision::F32 && !cfg!(feature = "cuda-fusion"),
    }
}

/// The largest error allowed for `precision` (f32 on the GPU may use TF32 matrix units).
fn tolerance(a: &ParityArgs) -> f64 {
    a.tolerance.unwrap_or(match a.precision {
        Precision::F32 => 5e-3,
        Precision::Bf16 => 0.25,
    })
}

pub fn parity(a: ParityArgs) -> Result<()> {
    let mut cfg = a
        .preset
        .parse::<Preset>()
        .map_err(anyhow::Error::msg)?
        .config();
    a.device.supports(a.precision).map_err(anyhow::Error::msg)?;
    let dropout = match a.dropout {
        Some(p) if !(0.0..1.0).contains(&p) => bail!("--dropout {p}: must be in [0, 1)"),
        Some(p) if p > 0.0 && !same_masks(&a) => bail!(
            "--dropout {p}: {} in {} draws its own dropout masks, not the CPU's",
            a.device,
            a.precision.name()
        ),
        Some(p) => p,
        None if same_masks(&a) => cfg.model.attn_dropout,
        None => 0.0,
    };
    (cfg.model.attn_dropout, cfg.model.ffn_dropout) = (dropout, dropout);
    if let Some(readout) = a.readout {
        cfg.model = cfg.model.with_readout(readout);
    }
    let s = cfg.model.image_size;
    // One set of weights and one batch for both sides.
    let cpu = cpu_device();
    <CpuAutodiff as Backend>::seed(&cpu, a.seed);
    let reference: Tlb<CpuAutodiff> = cfg.model.init(&cpu)?;
    let record = record_bytes::<CpuAutodiff, _>(reference.into_record())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let images: Vec<f32> = (0..a.batch * 3 * s * s).map(|_| rng.random()).collect();
    let labels: Vec<i64> = (0..a.batch)
        .map(|_| rng.random_range(0..cfg.model.num_classes as i64))
        .collect();
    let data = (images, labels);
    let want = side::<CpuAutodiff>(&cfg, record.clone(), &data, Precision::F32, a.steps, &cpu)?;
    let got = with_backend!(a.device.clone(), |B, device| side::<B>(
        &cfg,
        record.clone(),
        &data,
        a.precision,
        a.steps,
        &device
    )?);
    let tol = tolerance(&a);
    let mut rows = vec![
        (
            "logits".to_string(),
            rel_err(&got.logits, &want.logits, 0.0),
        ),
        (
            format!("logits after {} AdamW steps", a.steps),
            rel_err(&got.logits_after, &want.logits_after, 0.0),
        ),
    ];
    // All gradients as one vector, then each parameter's. A gradient that is zero in exact
    // arithmetic (a key bias: softmax ignores a shift shared by all keys) holds only rounding
    // noise: each is measured against at least 1/100 of the largest parameter gradient.
    let all = |side: &Side| {
        side.grads
            .iter()
            .flat_map(|(_, g)| g.clone())
            .collect::<Vec<_>>()
    };
    rows.push((
        "grad (all)".to_string(),
        rel_err(&all(&got), &all(&want), 0.0),
    ));
    let largest = want.grads.iter().map(|(_, w)| norm(w)).fold(0.0, f64::max);
    for ((name, g), (_, w)) in got.grads.iter().zip(&want.grads) {
        rows.push((format!("grad {name}"), rel_err(g, w, 1e-2 * largest)));
    }
    let mut worst = ("", 0.0f64);
    let mut failed = 0;
    for (what, err) in &rows {
        let ok = *err <= tol;
        if !ok {
            failed += 1;
        }
        if err.is_nan() || *err > worst.1 {
            worst = (what, *err);
        }
        if a.verbose || !ok {
            println!(
                "{}",
                serde_json::json!({"compare": what, "rel_err": err, "ok": ok})
            );
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "device": a.device.to_string(),
            "backend": crate::engine::backend::backend_name(),
            "preset": a.preset,
            "readout": cfg.model.readout.name(),
            "precision": a.precision.name(),
            "dropout": dropout,
            "batch": a.batch,
            "loss": got.loss,
            "loss_cpu": want.loss,
            "compared": rows.len(),
            "over_tolerance": failed,
            "tolerance": tol,
            "worst": worst.0,
            "worst_rel_err": worst.1,
        })
    );
    if failed > 0 {
        bail!(
            "{failed} of {} comparisons over {tol:e} (worst: {} at {:e})",
            rows.len(),
            worst.0,
            worst.1
        );
    }
    Ok(())
}

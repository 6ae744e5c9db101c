use crate::common;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{DType, Distribution, Int, Tensor};
use strum::IntoEnumIterator;
use tlb::engine::backend::{cpu_device, Cpu, CpuAutodiff};
use tlb::engine::model::{host_f32, with_rng_lock, Precision, Readout, Tlb, TlbConfig};
use tlb::engine::train::{gradient_model, loss_and_correct, named_tensors, Preset};

use common::small_model;

#[test]
fn logits_and_attention_have_the_documented_shapes() {
    let device = cpu_device();
    for (readout, heads) in [
        (Readout::Slow, 1),
        (Readout::LastFast, 2),
        (Readout::Slow, 4),
    ] {
        let cfg = small_model(readout, heads);
        let model = cfg.init::<Cpu>(&device).unwrap();
        let images =
            Tensor::<Cpu, 4>::random([3, 3, 16, 16], Distribution::Uniform(0.0, 1.0), &device);
        let out = model.forward_with(images, true);
        assert_eq!(out.logits.dims(), [3, 7]);
        let att = out.attention.unwrap();
        // [batch, chunks, heads, latents, chunk_size]: 16 tokens in chunks of 4.
        assert_eq!(att.dims(), [3, 4, heads, 4, 4]);
        let sums = att.sum_dim(4).into_data().to_vec::<f32>().unwrap();
        for s in sums {
            assert!((s - 1.0).abs() < 1e-5, "attention row sums to {s}");
        }
    }
}

#[test]
fn perceptual_cross_blocks_follow_every_rth_layer() {
    let device = cpu_device();
    for (layers, r, expected) in [(6, 2, 3), (4, 1, 4), (5, 3, 2), (1, 1, 1)] {
        let cfg = small_model(Readout::Slow, 1)
            .with_num_layers(layers)
            .with_r(r);
        let model = cfg.init::<Cpu>(&device).unwrap();
        assert_eq!(model.perceptual.len(), layers);
        assert_eq!(model.perceptual_cross.len(), expected, "L={layers} r={r}");
    }
}

/// `(logits, attention)` of one pass, flattened.
fn pass<B: burn::tensor::backend::Backend>(
    model: &Tlb<B>,
    images: Tensor<B, 4>,
) -> (Vec<f32>, Vec<f32>) {
    let out = model.forward_with(images, true);
    (host_f32(out.logits), host_f32(out.attention.unwrap()))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn inference_runs_layer_0_on_all_chunks_at_once_with_the_same_result() {
    // Without autodiff (and at most MERGE_MAX_ROWS rows a chunk) the first perceptual layer
    // runs on all chunks in one call; with it, once per chunk. Same weights, dropout off: the
    // same logits and attention, on the fused CPU block and on burn's composition (what the
    // GPU runs), for several shapes.
    let device = cpu_device();
    let configs = [
        small_model(Readout::Slow, 1),
        small_model(Readout::LastFast, 2)
            .with_num_layers(4)
            .with_r(1),
        Preset::Reference.config().model,
    ];
    for cfg in configs {
        let cfg = cfg.with_attn_dropout(0.0).with_ffn_dropout(0.0);
        let side = cfg.image_size;
        let model = cfg.init::<CpuAutodiff>(&device).unwrap();
        let batch = tlb::engine::model::MERGE_MAX_ROWS / cfg.chunk_size;
        assert!(batch >= 2);
        let images = Tensor::<CpuAutodiff, 4>::random(
            [batch, 3, side, side],
            Distribution::Uniform(0.0, 1.0),
            &device,
        );
        for unfused in [false, true] {
            let run = |f: &dyn Fn() -> (Vec<f32>, Vec<f32>)| {
                if unfused {
                    tlb::engine::model::fused::with_unfused(f)
                } else {
                    f()
                }
            };
            let (logits, attention) = run(&|| pass(&model, images.clone()));
            let (merged_logits, merged_attention) =
                run(&|| pass(&model.valid(), images.clone().inner()));
            let what = format!("{side} px, unfused {unfused}");
            assert!(logits.iter().any(|v| *v != 0.0), "{what}");
            assert!(
                max_abs_diff(&logits, &merged_logits) < 1e-4,
                "{what}: logits"
            );
            assert!(
                max_abs_diff(&attention, &merged_attention) < 1e-5,
                "{what}: attention"
            );
        }
    }
}

#[test]
fn readouts_differ_and_eval_mode_is_deterministic() {
    let device = cpu_device();
    let images =
        Tensor::<CpuAutodiff, 4>::random([2, 3, 16, 16], Distribution::Uniform(0.0, 1.0), &device);
    let cfg = small_model(Readout::Slow, 1)
        .with_ffn_dropout(0.5)
        .with_attn_dropout(0.5);
    let model = cfg.init::<CpuAutodiff>(&device).unwrap();
    let valid = model.valid();
    let a = valid.forward(images.clone().inner()).into_data();
    let b = valid.forward(images.clone().inner()).into_data();
    assert_eq!(a, b, "eval mode must not apply dropout");
    let t1 = model.forward(images.clone()).into_data();
    let t2 = model.forward(images).into_data();
    assert_ne!(t1, t2, "training mode applies dropout");
}

#[test]
fn config_validation_names_the_problem() {
    let base = small_model(Readout::Slow, 1);
    let cases: Vec<(TlbConfig, &str, &str)> = vec![
        (
            base.clone().with_image_size(18),
            "image_size",
            "not divisible by patch_size 4",
        ),
        (
            base.clone().with_chunk_size(5),
            "chunk_size",
            "token count 16 (4x4 patches) is not divisible by chunk_size 5",
        ),
        (
            base.clone().with_embed_dim(18).with_num_heads(4),
            "num_heads",
            "embed_dim 18 is not divisible by num_heads 4",
        ),
        (base.clone().with_r(0), "r", "must be in 1..="),
        (
            base.clone().with_num_layers(0),
            "num_layers",
            "must be in 1..=",
        ),
        (
            base.clone().with_ffn_dropout(1.0),
            "ffn_dropout",
            "must be in [0, 1)",
        ),
        (
            base.clone().with_attn_dropout(-0.1),
            "attn_dropout",
            "must be in [0, 1)",
        ),
        (
            base.clone().with_embed_dim(100_000),
            "embed_dim",
            "must be in 1..=4096",
        ),
        (
            base.clone().with_image_size(4096),
            "image_size",
            "must be in 1..=512",
        ),
        (
            base.clone().with_num_classes(0),
            "num_classes",
            "must be in 1..=",
        ),
    ];
    for (cfg, field, text) in cases {
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(
            err.to_string().contains(text),
            "'{err}' should contain '{text}'"
        );
        assert!(cfg.init::<Cpu>(&cpu_device()).is_err());
    }
    assert!(base.validate().is_ok());
}

#[test]
fn presets_are_valid_and_match_the_reference() {
    for p in Preset::iter() {
        p.config().validate().unwrap();
    }
    let r = Preset::Reference.config();
    assert_eq!(
        (
            r.model.image_size,
            r.model.embed_dim,
            r.model.num_layers,
            r.model.r,
            r.model.chunk_size
        ),
        (48, 128, 6, 2, 8)
    );
    assert_eq!(r.model.num_tokens(), 144);
    assert_eq!(
        (r.batch_size, r.epochs, r.lr, r.weight_decay),
        (1024, 100, 1e-4, 1e-4)
    );
    assert!(
        r.micro_batch_size() < r.batch_size,
        "CPU micro-batches keep memory bounded"
    );
}

/// `‖a − b‖ / ‖b‖`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

#[test]
fn bf16_passes_keep_f32_parameters_and_track_the_f32_model() {
    let device = cpu_device();
    let mut cfg = small_model(Readout::Slow, 1);
    (cfg.attn_dropout, cfg.ffn_dropout) = (0.0, 0.0);
    // Seeded draws, taken while no other test in this process draws.
    let (model, images) = with_rng_lock(|| {
        <CpuAutodiff as burn::tensor::backend::Backend>::seed(&device, 3);
        let model = cfg.init::<CpuAutodiff>(&device).unwrap();
        let images = Tensor::<CpuAutodiff, 4>::random(
            [4, 3, 16, 16],
            Distribution::Uniform(0.0, 1.0),
            &device,
        );
        (model, images)
    });
    let labels = Tensor::<CpuAutodiff, 1, Int>::from_data([1i64, 2, 3, 4].as_slice(), &device);
    let pass = |m: &Tlb<CpuAutodiff>| {
        let logits = m.forward(images.clone());
        assert_eq!(logits.dtype(), DType::F32, "logits come back in f32");
        let (loss, _) = loss_and_correct(logits.clone(), labels.clone(), 0.0);
        let grads = GradientsParams::from_grads(loss.backward(), m);
        let values = logits.into_data().to_vec::<f32>().unwrap();
        (values, grads)
    };
    let (want, want_grads) = pass(&model);
    let half = model.clone().with_precision(Precision::Bf16);
    let (got, got_grads) = pass(&half);
    // Computed in bf16 (8 bits of mantissa): close to f32, but not the f32 result.
    let err = rel_err(&got, &want);
    assert!(err > 1e-5 && err < 3e-2, "logits rel err {err}");
    let (want_g, got_g) = (
        named_tensors(&gradient_model(&model, &want_grads)),
        named_tensors(&gradient_model(&half, &got_grads)),
    );
    assert_eq!(want_g.len(), got_g.len());
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>();
    // All gradients together: bf16's 8-bit mantissa leaves them about 1 % off (at most 4.3 %
    // over 16 seeds of `tlb parity --preset tiny`).
    let all = |g: &[tlb::engine::train::NamedTensor]| {
        g.iter().flat_map(|t| t.values.clone()).collect::<Vec<_>>()
    };
    let (g_all, w_all) = (all(&got_g), all(&want_g));
    let err = norm(&diff(&g_all, &w_all)) / norm(&w_all);
    assert!(err < 0.08, "all gradients: rel err {err}");
    // Each one (at most 9.2 % over those seeds). Key biases have zero gradient in exact
    // arithmetic (softmax ignores a shift shared by all keys): each is measured against at
    // least 1/100 of the largest gradient.
    let floor = 1e-2 * want_g.iter().map(|w| norm(&w.values)).fold(0.0, f64::max);
    for (w, g) in want_g.iter().zip(&got_g) {
        assert_eq!(w.name, g.name);
        assert!(norm(&g.values).is_finite(), "{}", g.name);
        let err = norm(&diff(&g.values, &w.values)) / norm(&w.values).max(floor);
        assert!(err < 0.25, "{}: gradient rel err {err}", g.name);
    }
    // Gradients arrive in f32 at f32 parameters, and the optimiser keeps them f32.
    let grad = got_grads
        .get::<Cpu, 3>(half.pos_embed.id)
        .expect("a gradient for the position embedding");
    assert_eq!(grad.dtype(), DType::F32);
    let mut optim = AdamWConfig::new().init::<CpuAutodiff, Tlb<CpuAutodiff>>();
    let stepped = optim.step(1e-3, half, got_grads);
    assert_eq!(stepped.pos_embed.val().dtype(), DType::F32);
    assert_eq!(stepped.precision(), Precision::Bf16);
    assert_eq!(stepped.valid().precision(), Precision::Bf16);
    let moved = rel_err(
        &stepped.pos_embed.val().into_data().to_vec::<f32>().unwrap(),
        &model.pos_embed.val().into_data().to_vec::<f32>().unwrap(),
    );
    assert!(moved > 0.0, "the step changed the parameters");
}

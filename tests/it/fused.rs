//! The fused CPU block against burn's composition of the same maths: logits and every
//! parameter's gradient, with dropout on (both draw the same masks from the stream).

use crate::common;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Int, Tensor};
use tlb::engine::backend::{cpu_device, CpuAutodiff};
use tlb::engine::model::fused::{self, Isa};
use tlb::engine::model::{set_dropout_stream, Readout, Tlb, TlbConfig};
use tlb::engine::train::{loss_and_correct, Preset};

use common::small_model;

type B = CpuAutodiff;

pub(crate) fn config(readout: Readout, dropout: f64) -> TlbConfig {
    small_model(readout, 1)
        .with_attn_dropout(dropout)
        .with_ffn_dropout(dropout)
}

/// Every parameter's gradient, flattened, in visiting order.
pub(crate) struct Collect<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    out: Vec<(String, Vec<f32>)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let g = param
            .val()
            .grad(self.grads)
            .map(|g| g.into_data().to_vec::<f32>().unwrap())
            .unwrap_or_default();
        self.out.push((format!("{:?}", param.id), g));
    }
}

/// Logits and gradients of one training step's loss.
pub(crate) fn step<B: AutodiffBackend>(
    model: &Tlb<B>,
    images: Tensor<B, 4>,
    labels: Tensor<B, 1, Int>,
) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    set_dropout_stream(42);
    let logits = model.forward(images);
    let (loss, _) = loss_and_correct(logits.clone(), labels, 0.1);
    let grads = loss.backward();
    let mut c = Collect::<B> {
        grads: &grads,
        out: Vec::new(),
    };
    model.visit(&mut c);
    (logits.into_data().to_vec().unwrap(), c.out)
}

/// Each instruction set the host kernels can run at on this CPU, widest first: the tests run
/// the AVX-512, AVX2 and baseline paths of the fused block on one host.
fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Baseline]
        .into_iter()
        .filter(|isa| *isa <= fused::isa::detected())
        .collect()
}

pub(crate) fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: fused {x} vs composition {y} (scale {scale})"
        );
    }
}

#[test]
fn fused_block_matches_the_composition_in_values_and_gradients() {
    assert!(
        fused::enabled::<B>(),
        "the CPU autodiff backend runs fused blocks"
    );
    for isa in isas() {
        fused::with_isa_at_most(isa, || fused_matches_composition(isa));
    }
}

fn fused_matches_composition(isa: Isa) {
    let device = cpu_device();
    for (readout, dropout) in [
        (Readout::Slow, 0.2),
        (Readout::LastFast, 0.0),
        (Readout::Slow, 0.5),
    ] {
        let what = format!("{isa:?} {readout:?} dropout {dropout}");
        let model = config(readout, dropout).init::<B>(&device).unwrap();
        let images =
            Tensor::<B, 4>::random([5, 3, 16, 16], Distribution::Uniform(0.0, 1.0), &device);
        let labels = Tensor::<B, 1, Int>::from_ints([0, 3, 6, 2, 5], &device);

        let calls = fused::calls();
        let (logits, grads) = step(&model, images.clone(), labels.clone());
        // 4 chunks × (3 self + 2 cross + 1 bottleneck) blocks.
        assert_eq!(fused::calls() - calls, 24, "every block ran fused");
        let calls = fused::calls();
        let (logits_ref, grads_ref) =
            fused::with_unfused(|| step(&model, images.clone(), labels.clone()));
        assert_eq!(fused::calls(), calls, "with_unfused runs the composition");

        // Inference (the plain backend) too.
        let eval = eval_logits(&model, &images);
        let eval_ref = fused::with_unfused(|| eval_logits(&model, &images));
        let fused_run = (logits, grads, eval);
        assert_runs_match(
            &what,
            fused_run,
            (logits_ref, grads_ref, eval_ref),
            dropout,
            2e-4,
        );
    }
}

/// The logits of inference (the model in eval mode, on the plain backend).
pub(crate) fn eval_logits<B: AutodiffBackend>(model: &Tlb<B>, images: &Tensor<B, 4>) -> Vec<f32> {
    let logits = model.valid().forward(images.clone().inner());
    logits.into_data().to_vec().unwrap()
}

/// What a comparison of blocks computes: a training step's logits and every parameter's
/// gradient ([`step`]), and the logits of inference ([`eval_logits`]).
pub(crate) type Run = (Vec<f32>, Vec<(String, Vec<f32>)>, Vec<f32>);

/// A run with fused blocks against the same run through burn's composition: logits and eval
/// logits within 1e-5, each gradient within `grad_tol` of its largest value (each one's
/// largest relative difference printed), and with dropout no gradient all zero.
pub(crate) fn assert_runs_match(
    what: &str,
    fused: Run,
    composed: Run,
    dropout: f64,
    grad_tol: f32,
) {
    let ((logits, grads, eval), (logits_ref, grads_ref, eval_ref)) = (fused, composed);
    assert_close(&format!("{what}: logits"), &logits, &logits_ref, 1e-5);
    assert_eq!(grads.len(), grads_ref.len());
    let errs: Vec<f32> = grads
        .iter()
        .zip(&grads_ref)
        .map(|((_, g), (_, r))| {
            let scale = r.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let diff = g.iter().zip(r).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            diff / scale
        })
        .collect();
    eprintln!("{what}: gradient differences {errs:?}");
    for ((name, g), (_, r)) in grads.iter().zip(&grads_ref) {
        assert_close(&format!("{what}: {name}"), g, r, grad_tol);
    }
    // With dropout the latents differ and every parameter gets a gradient (without it the
    // zero-initialised latents stay identical and some cross-attention gradients vanish).
    if dropout > 0.0 {
        let zero = grads_ref
            .iter()
            .filter(|(_, r)| r.iter().all(|v| *v == 0.0))
            .count();
        assert_eq!(
            zero,
            0,
            "{what}: {zero} of {} gradients are zero",
            grads.len()
        );
    }
    assert_close(&format!("{what}: eval logits"), &eval, &eval_ref, 1e-5);
}

#[test]
fn dropout_masks_differ_between_steps_and_keep_the_expected_share() {
    // The fused path draws its own masks: they must change with the stream and drop ~p.
    let device = cpu_device();
    let model = config(Readout::Slow, 0.5).init::<B>(&device).unwrap();
    let images = Tensor::<B, 4>::random([4, 3, 16, 16], Distribution::Uniform(0.0, 1.0), &device);
    set_dropout_stream(1);
    let a = model.forward(images.clone()).into_data();
    set_dropout_stream(1);
    let b = model.forward(images.clone()).into_data();
    set_dropout_stream(2);
    let c = model.forward(images).into_data();
    assert_eq!(a, b, "same stream, same masks");
    assert_ne!(a, c, "another stream, other masks");
}

#[test]
fn the_reference_preset_runs_fused_and_matches() {
    // The real shapes (D128, L6, 48 px) on two images: gradients agree with the composition.
    let device = cpu_device();
    let cfg = Preset::Reference.config().model;
    let model = cfg.init::<B>(&device).unwrap();
    let images = Tensor::<B, 4>::random([2, 3, 48, 48], Distribution::Uniform(0.0, 1.0), &device);
    let labels = Tensor::<B, 1, Int>::from_ints([1, 8], &device);
    let (logits_ref, grads_ref) =
        fused::with_unfused(|| step(&model, images.clone(), labels.clone()));
    for isa in isas() {
        let (logits, grads) =
            fused::with_isa_at_most(isa, || step(&model, images.clone(), labels.clone()));
        assert_close(&format!("{isa:?}: logits"), &logits, &logits_ref, 1e-4);
        for ((name, g), (_, r)) in grads.iter().zip(&grads_ref) {
            assert_close(&format!("{isa:?}: {name}"), g, r, 1e-3);
        }
    }
}

#[test]
fn chunked_embedding_equals_the_convolution() {
    // embed_chunks (the patch convolution as a matrix product per chunk) against embed (burn's
    // conv2d over the whole image, then sliced): same tokens.
    let device = cpu_device();
    for (side, patch) in [(16, 4), (48, 4), (32, 2)] {
        let cfg = config(Readout::Slow, 0.0)
            .with_image_size(side)
            .with_patch_size(patch);
        let model = cfg.init::<tlb::engine::backend::Cpu>(&device).unwrap();
        let images = Tensor::random([3, 3, side, side], Distribution::Uniform(0.0, 1.0), &device);
        let tokens = model.embed(images.clone());
        let chunks = model.embed_chunks(images.clone());
        // embed_merged: all chunks in one tensor, chunk-major.
        let merged = model.embed_merged(images);
        assert_eq!(merged.dims(), [cfg.num_chunks() * 3, cfg.chunk_size, 16]);
        let merged = merged.chunk(cfg.num_chunks(), 0);
        assert_eq!(chunks.len(), cfg.num_chunks());
        for (c, (chunk, merged)) in chunks.into_iter().zip(merged).enumerate() {
            let want = tokens.clone().narrow(1, c * cfg.chunk_size, cfg.chunk_size);
            let want = want.into_data().to_vec::<f32>().unwrap();
            let got = chunk.into_data().to_vec::<f32>().unwrap();
            assert_close(&format!("chunk {c}"), &got, &want, 1e-5);
            let got = merged.into_data().to_vec::<f32>().unwrap();
            assert_close(&format!("merged chunk {c}"), &got, &want, 1e-5);
        }
    }
}

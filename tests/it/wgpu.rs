//! The GPU code path, run without a GPU: burn's wgpu backend on Mesa's lavapipe (software
//! Vulkan). `tlb parity` compares its logits, every gradient and AdamW steps with the CPU
//! backend for both readouts, and a `tiny` job trains through `tlb serve --device wgpu`, then
//! classifies and draws attention maps with the probabilities the CPU computes from the same
//! checkpoint.

use std::process::Command;
use std::time::Duration;

use crate::common;
use crate::replicas::succeeded;
use common::server::{encoded, png, start_job, start_request, Server};
use common::write_synthetic_cifar;
use tlb::proto::v1 as pb;

/// `tlb parity --device wgpu` with `args`: whether it passed, and its summary line.
fn parity(args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tlb"))
        .args(["parity", "--device", "wgpu", "--verbose"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let summary = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    // The figures, for the log: every comparison's error.
    eprintln!("parity {args:?}:\n{stdout}{stderr}");
    (out.status.success(), summary, stderr)
}

/// f32 on lavapipe matches the CPU to rounding, for each readout and with dropout (the same
/// masks on both sides): logits, all gradients (each parameter's), and the logits after AdamW
/// steps.
#[test]
fn parity_on_lavapipe_f32_both_readouts() {
    // Dropout 0.2: the GPU's kernels drop the values the CPU drops.
    for (readout, dropout) in [("slow", 0.0), ("last-fast", 0.0), ("slow", 0.2)] {
        let p = dropout.to_string();
        let args = ["--preset", "tiny", "--readout", readout, "--dropout", &p];
        let (ok, s, err) = parity(&[&args[..], &["--batch", "4", "--steps", "2"]].concat());
        let what = format!("{readout}, dropout {dropout}");
        assert!(ok, "{what}: {s} {err}");
        assert_eq!(s["readout"], readout, "{s}");
        assert_eq!(s["dropout"], dropout, "{s}");
        assert_eq!(s["device"], "wgpu", "{s}");
        assert!(s["compared"].as_u64().unwrap() > 20, "{s}");
        // Measured: about 1e-6 (3e-4 to 5e-4 with burn's own GELU, whose erf is coarser);
        // the CPU against itself is 0.
        let worst = s["worst_rel_err"].as_f64().unwrap();
        assert!(worst > 0.0 && worst < 2e-5, "{what}: {s}");
    }
    let (ok, _, err) = parity(&["--preset", "tiny", "--precision", "bf16"]);
    assert!(
        !ok && err.contains("bf16 is not available on wgpu"),
        "{err}"
    );
}

/// Classify (all classes) and GetAttention (with an overlay) of one image by `model`.
async fn answer(
    server: &Server,
    model: String,
) -> (pb::ClassifyResponse, pb::GetAttentionResponse) {
    let image = || encoded(png(32, 7));
    let mut inference = server.inference().await;
    let classified = inference
        .classify(pb::ClassifyRequest {
            model: model.clone(),
            images: vec![image()],
            top_k: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let attention = inference
        .get_attention(pb::GetAttentionRequest {
            model,
            image: Some(image()),
            render_overlay: true,
            overlay_size: 64,
            side_by_side: None,
        })
        .await
        .unwrap()
        .into_inner();
    (classified, attention)
}

/// A `tiny` job through `tlb serve --device wgpu`: it succeeds, and Classify and
/// GetAttention on its checkpoint answer what a CPU server answers from the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_and_serves_on_wgpu() {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_cifar(&dir.path().join("datasets/synth"), 200, 50);
    let (job, on_gpu) = {
        let server = Server::start(dir.path(), &["--device", "wgpu"]);
        let mut client = server.training().await;
        // wgpu has no bf16: refused before anything queues.
        let mut bf16 = start_request("tiny", 2, "synth");
        bf16.config.as_mut().unwrap().precision = pb::Precision::Bf16 as i32;
        let refused = client.start_training(bf16).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused
                .message()
                .contains("config.precision: precision bf16 is not available on wgpu"),
            "{refused:?}"
        );
        let mut request = start_request("tiny", 2, "synth");
        request.config.as_mut().unwrap().batch_size = Some(50);
        let job = start_job(&mut client, request).await;
        let j = succeeded(&mut client, &job, Duration::from_secs(600)).await;
        assert_eq!(j.epochs_completed, 2, "{j:?}");
        assert_eq!(j.device, "wgpu", "{j:?}");
        (job.clone(), answer(&server, job).await)
    };
    let cpu = Server::start(dir.path(), &["--device", "cpu"]);
    let on_cpu = answer(&cpu, job).await;
    let probabilities = |c: &pb::ClassifyResponse| {
        let mut p: Vec<(String, f32)> = c.results[0]
            .predictions
            .iter()
            .map(|p| (p.label.clone(), p.probability))
            .collect();
        p.sort_by(|a, b| a.0.cmp(&b.0));
        p
    };
    let (gpu, cpu) = (probabilities(&on_gpu.0), probabilities(&on_cpu.0));
    assert_eq!(gpu.len(), 10);
    for ((label, g), (_, c)) in gpu.iter().zip(&cpu) {
        assert!((g - c).abs() < 1e-4, "{label}: wgpu {g}, cpu {c}");
    }
    let (ga, ca) = (&on_gpu.1, &on_cpu.1);
    assert_eq!(
        (ga.num_chunks, ga.grid_height),
        (ca.num_chunks, ca.grid_height)
    );
    assert!(!ga.overlay_png.is_empty());
    let weights = |a: &pb::GetAttentionResponse| -> Vec<f32> {
        a.chunks.iter().flat_map(|c| c.weights.clone()).collect()
    };
    let (gw, cw) = (weights(ga), weights(ca));
    assert_eq!(gw.len(), cw.len());
    let diff = gw
        .iter()
        .zip(&cw)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "attention weights differ by {diff}");
}

/// `(gelu(u + bias), d/du, d/dbias)` of `Σ w·gelu(u + bias)` on backend `B`, from host data.
fn bias_gelu_on<B: burn::tensor::backend::AutodiffBackend>(
    device: &B::Device,
    (u, bias, w): &(Vec<f32>, Vec<f32>, Vec<f32>),
) -> [Vec<f32>; 3] {
    use burn::tensor::{Tensor, TensorData};
    let shape = [3, 5, 37];
    let t3 = |v: &Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(v.clone(), shape), device);
    let (u, w) = (t3(u).require_grad(), t3(w));
    let bias =
        Tensor::<B, 1>::from_data(TensorData::new(bias.clone(), [37]), device).require_grad();
    let out = tlb::engine::model::cube::bias_gelu(u.clone(), bias.clone());
    let grads = (out.clone() * w).sum().backward();
    let host = |d: TensorData| d.to_vec::<f32>().unwrap();
    [
        host(out.inner().into_data()),
        host(u.grad(&grads).unwrap().into_data()),
        host(bias.grad(&grads).unwrap().into_data()),
    ]
}

/// The fused bias + GELU kernel on lavapipe against the CPU backend (exact erf): values, and
/// the gradients of the input and of the bias (through a weighted sum, so each output's
/// gradient differs). burn's own wgpu composition is measured beside it: its erf is a
/// coarser approximation.
#[test]
fn the_fused_bias_gelu_matches_the_cpu() {
    use rand::{Rng, SeedableRng};
    use tlb::engine::backend::{cpu_device, wgpu_device, Adapter, CpuAutodiff, WgpuAutodiff};
    use tlb::engine::model::{cube, fused};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut draw = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect()
    };
    let data = (draw(555, 6.0), draw(37, 1.0), draw(555, 1.0));
    let gpu = wgpu_device(Adapter::Default);
    let before = cube::calls();
    let fused_gpu = bias_gelu_on::<WgpuAutodiff>(&gpu, &data);
    assert_eq!(cube::calls(), before + 1, "the fused kernel ran");
    let burn_gpu = fused::with_unfused(|| bias_gelu_on::<WgpuAutodiff>(&gpu, &data));
    let cpu = fused::with_unfused(|| bias_gelu_on::<CpuAutodiff>(&cpu_device(), &data));
    assert_eq!(cube::calls(), before + 1, "the compositions ran");
    let worst = |a: &[Vec<f32>; 3]| -> Vec<f32> {
        a.iter()
            .zip(&cpu)
            .map(|(x, y)| {
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
                x.iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max)
                    / scale
            })
            .collect()
    };
    let (fused_err, burn_err) = (worst(&fused_gpu), worst(&burn_gpu));
    eprintln!("bias_gelu vs the CPU (value, du, dbias): fused kernel {fused_err:?}, burn's wgpu composition {burn_err:?}");
    assert!(fused_err.iter().all(|e| *e < 1e-5), "{fused_err:?}");
    assert_eq!(fused_gpu[2].len(), 37);
}

/// The attention block as tlb's CubeCL kernels (one autodiff node: `model::cube::block`)
/// against burn's composition on the same device: logits and every parameter's gradient of a
/// training step, with dropout (both draw the same masks from the stream) and without, and
/// the logits of inference.
#[test]
fn the_cube_block_matches_the_composition_on_lavapipe() {
    use crate::fused::{assert_runs_match, config, eval_logits, step};
    use burn::tensor::{Distribution, Int, Tensor};
    use tlb::engine::backend::{wgpu_device, Adapter, WgpuAutodiff};
    use tlb::engine::model::{cube, Readout};
    type G = WgpuAutodiff;
    let device = wgpu_device(Adapter::Default);
    for (readout, dropout) in [(Readout::Slow, 0.2), (Readout::LastFast, 0.0)] {
        let what = format!("{readout:?} dropout {dropout}");
        let model = config(readout, dropout).init::<G>(&device).unwrap();
        let images =
            Tensor::<G, 4>::random([5, 3, 16, 16], Distribution::Uniform(0.0, 1.0), &device);
        let labels = Tensor::<G, 1, Int>::from_ints([0, 3, 6, 2, 5], &device);
        let calls = cube::calls();
        let (logits, grads) = step(&model, images.clone(), labels.clone());
        // 4 chunks × (3 self + 2 cross + 1 bottleneck) blocks.
        assert_eq!(
            cube::calls() - calls,
            24,
            "{what}: every block ran as the kernels"
        );
        // The composition with the fused bias + GELU: the same erf (burn's is coarser).
        let calls = cube::calls();
        let (logits_ref, grads_ref) =
            cube::without_block(|| step(&model, images.clone(), labels.clone()));
        let gelus = cube::calls() - calls;
        assert_eq!(gelus, 24, "{what}: without_block runs the composition");
        let eval = eval_logits(&model, &images);
        let eval_ref = cube::without_block(|| eval_logits(&model, &images));
        let fused_run = (logits, grads, eval);
        assert_runs_match(
            &what,
            fused_run,
            (logits_ref, grads_ref, eval_ref),
            dropout,
            1e-4,
        );
    }
}

/// tlb's AdamW (one kernel per parameter on wgpu) takes the steps burn's AdamW takes: the
/// parameters of a layer after three steps, from the same gradients.
#[test]
fn the_fused_adamw_matches_burns_on_lavapipe() {
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
    use burn::tensor::{Distribution, Tensor};
    use tlb::engine::backend::{wgpu_device, Adapter, WgpuAutodiff};
    use tlb::engine::model::cube;
    type G = WgpuAutodiff;
    let device = wgpu_device(Adapter::Default);
    let layer: Linear<G> = LinearConfig::new(24, 40).init(&device);
    let x = Tensor::<G, 2>::random([6, 24], Distribution::Uniform(-1.0, 1.0), &device);
    // Parameters initialise lazily, each clone on its own: read them once so that both runs
    // start from the same values.
    let start = layer.weight.val().into_data().to_vec::<f32>().unwrap();
    let _ = layer.bias.as_ref().unwrap().val();
    let run = |fused: bool| {
        let mut layer = layer.clone();
        let mut ours = tlb::engine::train::adamw::<G, Linear<G>>(0.05, 1e-7);
        let mut burns = AdamWConfig::new()
            .with_weight_decay(0.05)
            .with_epsilon(1e-7)
            .init::<G, Linear<G>>();
        for _ in 0..3 {
            let loss = (layer.forward(x.clone()).powi_scalar(2)).sum();
            let grads = GradientsParams::from_grads(loss.backward(), &layer);
            layer = if fused {
                ours.step(1e-2, layer, grads)
            } else {
                burns.step(1e-2, layer, grads)
            };
        }
        let w = layer.weight.val().into_data().to_vec::<f32>().unwrap();
        let b = layer
            .bias
            .unwrap()
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        (w, b)
    };
    let calls = cube::calls();
    let (w, b) = run(true);
    assert_eq!(
        cube::calls() - calls,
        6,
        "3 steps × 2 parameters, one kernel each"
    );
    let (w_ref, b_ref) = run(false);
    crate::fused::assert_close("weight", &w, &w_ref, 1e-5);
    crate::fused::assert_close("bias", &b, &b_ref, 1e-5);
    assert!(
        w.iter().zip(&start).any(|(a, b)| a != b),
        "the steps moved the weights"
    );
}

/// Dropout on lavapipe drops exactly the values the CPU drops: both compute each mask from
/// the thread's stream with the same hash (the CPU on the host, the GPU in the kernels that
/// need it), so a wgpu run and a CPU run of the same seed see the same masks.
#[test]
fn dropout_masks_on_wgpu_equal_the_cpus() {
    use burn::tensor::Tensor;
    use tlb::engine::backend::{cpu_device, wgpu_device, Adapter, CpuAutodiff, WgpuAutodiff};
    use tlb::engine::model::{dropout, set_dropout_stream};
    let ones_cpu = Tensor::<CpuAutodiff, 3>::ones([3, 50, 70], &cpu_device());
    let ones_gpu = Tensor::<WgpuAutodiff, 3>::ones([3, 50, 70], &wgpu_device(Adapter::Default));
    for p in [0.2, 0.5] {
        set_dropout_stream(11);
        let cpu: Vec<f32> = dropout(ones_cpu.clone(), p).into_data().to_vec().unwrap();
        set_dropout_stream(11);
        let gpu: Vec<f32> = dropout(ones_gpu.clone(), p).into_data().to_vec().unwrap();
        assert_eq!(cpu, gpu, "p = {p}");
        let dropped = gpu.iter().filter(|v| **v == 0.0).count() as f64 / gpu.len() as f64;
        assert!((dropped - p).abs() < 0.02, "p = {p}: dropped {dropped}");
    }
}

//! The offline CLI end to end: train, eval, plot, attention overlay, export, bench.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn tlb(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tlb"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap();
    (img.width(), img.height())
}

#[test]
fn train_local_then_eval_plot_attention_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_synthetic_cifar(&data, 200, 50);
    let run = tmp.path().join("run");
    let p = |x: &PathBuf| x.to_str().unwrap().to_string();
    let (ok, _, err) = tlb(&[
        "train-local",
        "--preset",
        "tiny",
        "--data",
        &p(&data),
        "--out",
        &p(&run),
        "--epochs",
        "3",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("epoch   3:"), "{err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let test_acc = last["test_accuracy"].as_f64().unwrap();

    let best = run.join("checkpoints/best.ckpt");
    let (ok, out, err) = tlb(&[
        "eval",
        "--checkpoint",
        &p(&best),
        "--data",
        &p(&data),
        "--split",
        "test",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["images"], 50);
    assert!(
        (v["accuracy"].as_f64().unwrap() - test_acc).abs() < 1e-9,
        "eval {v} vs train {test_acc}"
    );

    let curves = tmp.path().join("curves.png");
    let (ok, _, err) = tlb(&["plot", "--metrics", &p(&run), "--out", &p(&curves)]);
    assert!(ok, "{err}");
    assert_eq!(png_size(&curves), (1200, 480));

    let img = tmp.path().join("in.png");
    image::RgbImage::from_fn(50, 40, |x, y| image::Rgb([x as u8 * 5, y as u8 * 6, 90]))
        .save(&img)
        .unwrap();
    let overlay = tmp.path().join("overlay.png");
    let (ok, out, err) = tlb(&[
        "attention-local",
        "--checkpoint",
        &p(&best),
        "--image",
        &p(&img),
        "--out",
        &p(&overlay),
        "--size",
        "160",
    ]);
    assert!(ok, "{err}");
    // The image and the overlay side by side, by default.
    assert_eq!(png_size(&overlay), (320, 160));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["grid"], 4);
    assert!(v["prediction"].is_string());

    let broken = tmp.path().join("broken.png");
    std::fs::write(&broken, b"not a png").unwrap();
    let (ok, _, err) = tlb(&[
        "attention-local",
        "--checkpoint",
        &p(&best),
        "--image",
        &p(&broken),
    ]);
    assert!(!ok && err.contains("not a decodable PNG/JPEG"), "{err}");

    let st = tmp.path().join("m.safetensors");
    let (ok, _, err) = tlb(&["export", "--checkpoint", &p(&best), "--out", &p(&st)]);
    assert!(ok, "{err}");
    assert!(std::fs::metadata(&st).unwrap().len() > 1000);

    // resume with more epochs continues from epoch 3
    let (ok, _, err) = tlb(&[
        "train-local",
        "--preset",
        "tiny",
        "--data",
        &p(&data),
        "--out",
        &p(&run),
        "--epochs",
        "4",
        "--resume",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("epoch   4:") && !err.contains("epoch   1:"),
        "{err}"
    );
}

#[test]
fn bad_arguments_give_precise_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::write_synthetic_cifar(&data, 20, 5);
    let d = data.to_str().unwrap();
    let (ok, _, err) = tlb(&[
        "train-local",
        "--preset",
        "huge",
        "--data",
        d,
        "--out",
        "/tmp/x",
    ]);
    assert!(!ok && err.contains("unknown preset 'huge'"), "{err}");
    let (ok, _, err) = tlb(&[
        "train-local",
        "--preset",
        "tiny",
        "--data",
        "/nonexistent",
        "--out",
        "/tmp/x",
    ]);
    assert!(!ok && err.contains("/nonexistent"), "{err}");
    let cfg = tmp.path().join("c.json");
    let mut c = tlb::engine::train::Preset::Tiny.config();
    c.model.chunk_size = 5;
    std::fs::write(&cfg, serde_json::to_string(&c).unwrap()).unwrap();
    let (ok, _, err) = tlb(&[
        "train-local",
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        d,
        "--out",
        "/tmp/x",
    ]);
    assert!(
        !ok && err.contains("not divisible by chunk_size 5"),
        "{err}"
    );
    let (ok, _, err) = tlb(&["bench", "--device", "tpu:0"]);
    assert!(!ok && err.contains("unknown device 'tpu:0'"), "{err}");
}

#[test]
fn bench_prints_one_json_line_with_the_figures() {
    let (ok, out, err) = tlb(&["bench", "--preset", "tiny", "--batch", "8", "--steps", "2"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for key in [
        "train_images_per_sec",
        "infer_images_per_sec",
        "peak_rss_mib",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key} in {v}");
    }
}

#[test]
fn bench_runs_in_bf16_too() {
    let (ok, out, err) = tlb(&[
        "bench",
        "--preset",
        "tiny",
        "--batch",
        "8",
        "--steps",
        "1",
        "--precision",
        "bf16",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["precision"], "bf16", "{v}");
    assert!(v["train_images_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    let (ok, _, err) = tlb(&["bench", "--precision", "fp8"]);
    assert!(!ok && err.contains("unknown precision 'fp8'"), "{err}");
}

/// `tlb parity` on the CPU: f32 against itself is exact, bf16 close but not exact, and a
/// tolerance under the error found fails the command.
#[test]
fn parity_compares_every_gradient_and_fails_over_its_tolerance() {
    let run = |precision: &str, extra: &[&str]| {
        let mut args = vec![
            "parity",
            "--preset",
            "tiny",
            "--batch",
            "4",
            "--steps",
            "2",
            "--precision",
            precision,
        ];
        args.extend_from_slice(extra);
        tlb(&args)
    };
    let summary = |out: &str| -> serde_json::Value {
        serde_json::from_str(out.lines().last().expect("a summary line")).unwrap()
    };
    let (ok, out, err) = run("f32", &[]);
    assert!(ok, "{err}");
    let s = summary(&out);
    assert_eq!(s["worst_rel_err"].as_f64(), Some(0.0), "{s}");
    // Logits, logits after the steps, and the gradient of each of the tiny model's parameters.
    assert!(s["compared"].as_u64().unwrap() > 20, "{s}");

    let (ok, out, err) = run("bf16", &["--verbose"]);
    assert!(ok, "{err}");
    let s = summary(&out);
    let worst = s["worst_rel_err"].as_f64().unwrap();
    assert!(
        worst > 1e-5 && worst <= s["tolerance"].as_f64().unwrap(),
        "{s}"
    );
    let rows = out.lines().count() as u64 - 1;
    assert_eq!(
        rows,
        s["compared"].as_u64().unwrap(),
        "--verbose prints every comparison"
    );
    assert!(out.contains("grad bottleneck.ffn_in.weight"), "{out}");

    let (ok, out, err) = run("bf16", &["--tolerance", "1e-6"]);
    assert!(!ok, "{out}");
    assert!(err.contains("comparisons over 1e-6"), "{err}");
    assert!(out.contains("\"ok\":false"), "{out}");
}

/// Trains `tiny` for an epoch on the real cifar10-mini ($TLB_SHARED_DATA, default ../shared/data).
#[test]
fn tiny_epoch_on_real_cifar10_mini() {
    let root = std::env::var("TLB_SHARED_DATA")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data").to_string());
    let data = Path::new(&root).join("cifar10-mini");
    assert!(
        data.join("data_batch_1.bin").exists(),
        "set TLB_SHARED_DATA: {} has no cifar10-mini",
        root
    );
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let (ok, _, err) = tlb(&[
        "train-local",
        "--preset",
        "tiny",
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--epochs",
        "1",
        "--quiet",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("1600 train / 400 validation / 500 test images"),
        "{err}"
    );
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    let acc = last["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
}

/// docs/operations.md's table of `tlb serve` flags is `tlb serve --help`: every flag, its
/// environment variable and its default, and no flag the server does not have.
#[test]
fn the_operations_doc_lists_every_serve_flag_as_the_help_does() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tlb"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    let rows: Vec<&str> = doc.lines().filter(|l| l.starts_with("| `--")).collect();
    let mut flags = Vec::new();
    let mut current: Option<(String, Option<String>, Option<String>)> = None;
    for line in help.lines().chain(["      --end"]) {
        let t = line.trim();
        if line.starts_with("      --") || line.starts_with("  -") {
            if let Some(f) = current.take() {
                flags.push(f);
            }
            let name = t.split(['<', ' ']).find(|w| w.starts_with("--")).unwrap();
            current = Some((name.to_string(), None, None));
        } else if let Some((_, env, default)) = current.as_mut() {
            if let Some(e) = t.strip_prefix("[env: ") {
                *env = Some(e.trim_end_matches(']').trim_end_matches('=').to_string());
            } else if let Some(d) = t.strip_prefix("[default: ") {
                *default = Some(d.trim_end_matches(']').to_string());
            }
        }
    }
    flags.retain(|(name, ..)| name != "--help");
    assert!(flags.len() > 20, "{flags:?}");
    for (name, env, default) in &flags {
        let row = rows
            .iter()
            .find(|r| {
                r.starts_with(&format!("| `{name} ")) || r.starts_with(&format!("| `{name}`"))
            })
            .unwrap_or_else(|| panic!("docs/operations.md has no row for {name}"));
        if let Some(env) = env {
            assert!(
                row.contains(&format!("`{env}`")),
                "{name}: {env} missing in {row}"
            );
        }
        if let Some(default) = default {
            assert!(
                row.contains(default.as_str()),
                "{name}: default {default} missing in {row}"
            );
        }
    }
    for row in rows {
        let name = row[3..].split(['`', ' ']).next().unwrap();
        assert!(
            flags.iter().any(|(f, ..)| f == name),
            "docs/operations.md lists {name}, which `tlb serve` does not have"
        );
    }
}

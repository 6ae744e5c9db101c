//! The real server on an ephemeral port, driven by the generated tonic client.

use crate::common;

use std::time::Duration;

use common::server::{
    encoded, final_state, get_job, metric_epochs, png, start_job, start_request, wait_for,
    watch_to_end, Server,
};
use common::write_synthetic_cifar;
use tlb::proto::v1 as pb;
use tlb::proto::v1::job_event::Event;

fn setup(train: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_cifar(&dir.path().join("datasets/synth"), train, 100);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_watch_classify_and_attention() {
    let dir = setup(600);
    let server = Server::start(dir.path(), &[]);
    let mut training = server.training().await;
    let job_id = start_job(&mut training, start_request("tiny", 3, "synth")).await;
    uuid::Uuid::parse_str(&job_id).unwrap();
    let events = watch_to_end(&mut training, &job_id, Duration::from_secs(300)).await;

    // The current state first, every epoch in order, a checkpoint per epoch, success last.
    assert!(matches!(&events[0], Event::State(j) if j.job_id == job_id));
    let epochs: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Epoch(m) => Some(m.epoch),
            _ => None,
        })
        .collect();
    assert_eq!(epochs, vec![1, 2, 3]);
    let ckpt_epochs: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Checkpoint(c) => Some(c.epoch),
            _ => None,
        })
        .collect();
    assert_eq!(ckpt_epochs, vec![1, 2, 3]);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Progress(p) if p.total_steps > 0)));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::State(j) if j.state == pb::JobState::Running as i32)));
    assert_eq!(final_state(&events), pb::JobState::Succeeded);

    let job = get_job(&mut training, &job_id).await;
    assert_eq!(job.epochs_completed, 3);
    assert!(job.test_accuracy.is_some());
    assert!(job.started_at.is_some() && job.finished_at.is_some());
    let ckpts = training
        .list_checkpoints(pb::ListCheckpointsRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    let best: Vec<_> = ckpts.iter().filter(|c| c.best).collect();
    assert_eq!(best.len(), 1);
    assert_eq!(best[0].checkpoint_id, job.best_checkpoint_id);

    // Classify: a job id, a checkpoint id and the default model all answer.
    let mut inference = server.inference().await;
    let raw = pb::Image {
        source: Some(pb::image::Source::Raw(pb::RawImage {
            width: 20,
            height: 10,
            rgb8: vec![128; 20 * 10 * 3],
        })),
    };
    let images = vec![encoded(png(32, 1)), encoded(png(64, 2)), raw];
    for model in [
        job_id.clone(),
        job.best_checkpoint_id.clone(),
        String::new(),
    ] {
        let out = inference
            .classify(pb::ClassifyRequest {
                model: model.clone(),
                images: images.clone(),
                top_k: 10,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.model, job.best_checkpoint_id);
        assert_eq!(out.results.len(), 3);
        for r in &out.results {
            assert_eq!(r.predictions.len(), 10);
            let sum: f32 = r.predictions.iter().map(|p| p.probability).sum();
            assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
            assert!(r
                .predictions
                .windows(2)
                .all(|w| w[0].probability >= w[1].probability));
            assert!(!r.predictions[0].label.is_empty());
        }
    }

    // GetAttention: per-chunk weights with their dimensions, the score grid, a PNG.
    let att = inference
        .get_attention(pb::GetAttentionRequest {
            model: job_id.clone(),
            image: Some(encoded(png(32, 3))),
            render_overlay: true,
            overlay_size: 128,
            side_by_side: None,
        })
        .await
        .unwrap()
        .into_inner();
    // tiny: 16 px images, patch 4 → 4×4 grid, chunks of 4 tokens, 4 latents, 1 head.
    assert_eq!((att.grid_height, att.grid_width), (4, 4));
    assert_eq!(att.num_chunks, 4);
    assert_eq!(att.chunks.len(), 4);
    let per_chunk = (att.num_heads * att.num_latents * att.chunk_size) as usize;
    for (i, c) in att.chunks.iter().enumerate() {
        assert_eq!(c.chunk_index as usize, i);
        assert_eq!(c.weights.len(), per_chunk);
        for row in c.weights.chunks(att.chunk_size as usize) {
            let s: f32 = row.iter().sum();
            assert!((s - 1.0).abs() < 1e-4, "attention row sums to {s}");
        }
    }
    assert_eq!(att.token_scores.len(), 16);
    // By default the image and the overlay side by side; the image shows through the heat.
    let both = image::load_from_memory(&att.overlay_png)
        .expect("a valid PNG")
        .to_rgb8();
    assert_eq!((both.width(), both.height()), (256, 128));
    let white = image::RgbImage::from_pixel(32, 32, image::Rgb([255, 255, 255]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    white.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
    let alone = inference
        .get_attention(pb::GetAttentionRequest {
            model: job_id.clone(),
            image: Some(encoded(bytes.into_inner())),
            render_overlay: true,
            overlay_size: 64,
            side_by_side: Some(false),
        })
        .await
        .unwrap()
        .into_inner();
    let alone = image::load_from_memory(&alone.overlay_png)
        .unwrap()
        .to_rgb8();
    assert_eq!((alone.width(), alone.height()), (64, 64));
    // 40 % of a white image under the heat: no channel below 0.4 · 255.
    assert!(alone.pixels().all(|p| p.0.iter().all(|&c| c >= 101)));
    assert!(att.prediction.is_some());

    let models = inference
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    assert!(models[0].is_default);
    assert_eq!(models[0].labels.len(), 10);

    // While a job trains, requests that arrive together share a forward pass, and each
    // still gets its own answer.
    let solo: Vec<Vec<f32>> = {
        let mut out = Vec::new();
        for seed in 0..8u8 {
            let r = inference
                .classify(pb::ClassifyRequest {
                    model: job_id.clone(),
                    images: vec![encoded(png(32, seed))],
                    top_k: 10,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.batch_images, 1);
            out.push(by_class(&r.results[0]));
        }
        out
    };
    let long = start_job(&mut training, start_request("tiny", 500, "synth")).await;
    wait_for(&mut training, &long, |e| matches!(e, Event::Progress(_))).await;
    let mut batched = false;
    for _ in 0..10 {
        let calls = (0..8u8).map(|seed| {
            let mut client = inference.clone();
            let model = job_id.clone();
            async move {
                client
                    .classify(pb::ClassifyRequest {
                        model,
                        images: vec![encoded(png(32, seed))],
                        top_k: 10,
                    })
                    .await
                    .unwrap()
                    .into_inner()
            }
        });
        let answers = futures_join_all(calls).await;
        for (seed, a) in answers.iter().enumerate() {
            let got = by_class(&a.results[0]);
            for (x, y) in got.iter().zip(&solo[seed]) {
                assert!(
                    (x - y).abs() < 1e-4,
                    "image {seed}: {got:?} vs {:?}",
                    solo[seed]
                );
            }
        }
        if answers.iter().any(|a| a.batch_images > 1) {
            batched = true;
            break;
        }
    }
    assert!(batched, "concurrent requests were never batched");
    training
        .cancel_job(pb::CancelJobRequest { job_id: long })
        .await
        .unwrap();
}

/// Probabilities indexed by class.
fn by_class(r: &pb::ClassifyResult) -> Vec<f32> {
    let mut p = vec![0.0; r.predictions.len()];
    for x in &r.predictions {
        p[x.class_index as usize] = x.probability;
    }
    p
}

/// Runs futures concurrently on the test runtime and returns their outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_running_and_queued_jobs() {
    let dir = setup(600);
    let server = Server::start(dir.path(), &[]);
    let mut training = server.training().await;
    let long = start_job(&mut training, start_request("tiny", 500, "synth")).await;
    let queued = start_job(&mut training, start_request("tiny", 1, "synth")).await;
    wait_for(&mut training, &long, |e| matches!(e, Event::Progress(_))).await;

    // The second job waits behind the first; cancelling it is immediate.
    let job = training
        .cancel_job(pb::CancelJobRequest {
            job_id: queued.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, pb::JobState::Cancelled as i32);

    let job = training
        .cancel_job(pb::CancelJobRequest {
            job_id: long.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, pb::JobState::Cancelled as i32);
    assert!(job.epochs_completed < 500);
    let again = training
        .cancel_job(pb::CancelJobRequest { job_id: long })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    assert!(
        again.message().contains("already ended"),
        "{}",
        again.message()
    );

    let listed = training
        .list_jobs(pb::ListJobsRequest {
            state: pb::JobState::Cancelled as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 2);
    // Pages of one: two pages, then none.
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = training
            .list_jobs(pb::ListJobsRequest {
                state: 0,
                page_size: 1,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.jobs.into_iter().map(|j| j.job_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0], seen[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_stopped_servers_resume_the_job() {
    let dir = setup(1200);
    let epochs = 12;
    let mut server = Server::start(dir.path(), &[]);
    let mut training = server.training().await;
    let job_id = start_job(&mut training, start_request("tiny", epochs, "synth")).await;
    wait_for(&mut training, &job_id, |e| {
        matches!(e, Event::Checkpoint(_))
    })
    .await;
    // A crash: no chance to checkpoint.
    server.signal_and_wait("KILL");
    drop(training);

    let mut server = Server::start(dir.path(), &[]);
    let mut training = server.training().await;
    wait_for(&mut training, &job_id, |e| matches!(e, Event::Progress(_))).await;
    // A clean stop: the job checkpoints mid-epoch and stays RUNNING.
    let status = server.signal_and_wait("TERM");
    assert!(status.success(), "SIGTERM exit: {status}");
    drop(training);
    let last = dir
        .path()
        .join("data/jobs")
        .join(&job_id)
        .join("checkpoints/last.a1.ckpt");
    let epoch_files = std::fs::read_dir(last.parent().unwrap()).unwrap().count();
    assert!(last.exists() || epoch_files > 0);

    let server = Server::start(dir.path(), &[]);
    let mut training = server.training().await;
    let events = watch_to_end(&mut training, &job_id, Duration::from_secs(300)).await;
    assert_eq!(final_state(&events), pb::JobState::Succeeded);
    let job = get_job(&mut training, &job_id).await;
    assert_eq!(job.restarts, 2);
    assert_eq!(job.epochs_completed, epochs);
    // Resumed from checkpoints, not retrained from scratch: epoch 1 ran once.
    let ran = metric_epochs(dir.path(), &job_id);
    assert_eq!(
        ran.iter().filter(|&&e| e == 1).count(),
        1,
        "epochs run: {ran:?}"
    );
    assert_eq!(*ran.iter().max().unwrap(), epochs as u64);
}

/// Runs the `tlb` client against `server`; returns (success, stdout, stderr).
fn client(server: &Server, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tlb"))
        .args(args)
        .arg("--server")
        .arg(&server.addr)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_client_subcommands() {
    let dir = setup(600);
    let server = Server::start(dir.path(), &[]);
    let (ok, out, err) = client(
        &server,
        &[
            "train",
            "--preset",
            "tiny",
            "--dataset",
            "synth",
            "--epochs",
            "2",
            "--precision",
            "bf16",
            "--watch",
        ],
    );
    assert!(ok, "{err}");
    let job = out.lines().next().unwrap().trim().to_string();
    uuid::Uuid::parse_str(&job).unwrap();
    // The job trained in mixed precision: its resolved config says so.
    let row = server
        .training()
        .await
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        row.config_json.contains(r#""precision":"bf16""#),
        "{}",
        row.config_json
    );
    assert!(out.contains("test accuracy"), "{out}");
    assert!(err.contains("epoch   2:"), "watch printed: {err}");

    let (ok, out, _) = client(&server, &["jobs"]);
    assert!(
        ok && out.contains(&job) && out.contains("SUCCEEDED"),
        "{out}"
    );
    // One job in full: its fields a line each, its config as JSON.
    let (ok, out, _) = client(&server, &["jobs", &job]);
    assert!(ok && out.starts_with(&job), "{out}");
    for field in [
        "  preset ",
        "  epochs ",
        "  latest ",
        "  test ",
        "  finished ",
        "  config",
    ] {
        assert!(out.contains(field), "{field}: {out}");
    }
    assert!(out.contains("\"lr\":") && !out.contains("Job {"), "{out}");
    let (ok, out, _) = client(&server, &["checkpoints", &job]);
    assert!(ok && out.contains("best"), "{out}");

    let img = dir.path().join("x.png");
    std::fs::write(&img, png(32, 9)).unwrap();
    let img = img.to_str().unwrap();
    let (ok, out, err) = client(
        &server,
        &["classify", img, img, "--model", &job, "--top-k", "2"],
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    let overlay = dir.path().join("overlay.png");
    let (ok, _, err) = client(
        &server,
        &[
            "attention",
            img,
            "--out",
            overlay.to_str().unwrap(),
            "--size",
            "64",
        ],
    );
    assert!(ok, "{err}");
    let drawn = image::open(&overlay).unwrap();
    assert_eq!((drawn.width(), drawn.height()), (128, 64), "side by side");
    let (ok, _, err) = client(
        &server,
        &[
            "attention",
            img,
            "--out",
            overlay.to_str().unwrap(),
            "--size",
            "64",
            "--side-by-side",
            "false",
        ],
    );
    assert!(ok, "{err}");
    let drawn = image::open(&overlay).unwrap();
    assert_eq!((drawn.width(), drawn.height()), (64, 64));

    let (ok, _, err) = client(&server, &["cancel", &job]);
    assert!(!ok && err.contains("FailedPrecondition"), "{err}");
    let (ok, _, err) = client(&server, &["jobs", "--state", "sleeping"]);
    assert!(!ok && err.contains("unknown state"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_thread_answers_during_training() {
    let dir = setup(600);
    // First a model, with a plain server.
    let job_id = {
        let server = Server::start(dir.path(), &[]);
        let mut training = server.training().await;
        let id = start_job(&mut training, start_request("tiny", 1, "synth")).await;
        let events = watch_to_end(&mut training, &id, Duration::from_secs(120)).await;
        assert_eq!(final_state(&events), pb::JobState::Succeeded);
        id
    };
    let server = Server::start(dir.path(), &["--inference-device", "cpu"]);
    let mut training = server.training().await;
    let long = start_job(&mut training, start_request("tiny", 500, "synth")).await;
    wait_for(&mut training, &long, |e| matches!(e, Event::Progress(_))).await;
    let mut inference = server.inference().await;
    for seed in 0..5u8 {
        let out = inference
            .classify(pb::ClassifyRequest {
                model: job_id.clone(),
                images: vec![encoded(png(32, seed)); 3],
                top_k: 10,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.results.len(), 3);
        let sum: f32 = out.results[0]
            .predictions
            .iter()
            .map(|p| p.probability)
            .sum();
        assert!((sum - 1.0).abs() < 1e-4);
        assert_eq!(by_class(&out.results[0]), by_class(&out.results[2]));
    }
    let att = inference
        .get_attention(pb::GetAttentionRequest {
            model: job_id,
            image: Some(encoded(png(32, 1))),
            render_overlay: false,
            overlay_size: 0,
            side_by_side: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(att.chunks.len(), 4);
    assert!(att.overlay_png.is_empty());
    // The job trained on meanwhile and still does.
    let job = get_job(&mut training, &long).await;
    assert_eq!(job.state, pb::JobState::Running as i32);
    training
        .cancel_job(pb::CancelJobRequest { job_id: long })
        .await
        .unwrap();
}

//! Operating the server: Prometheus metrics scraped by a real Prometheus, a bounded inference
//! queue under an open-loop flood, client deadlines, and a bounded job queue.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{encoded, png, start_job, start_request, watch_to_end, Server};
use common::{free_port, rss_peak_kib, write_synthetic_cifar};
use tlb::proto::v1 as pb;
use tonic::Code;

fn setup(train: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_cifar(&dir.path().join("datasets/synth"), train, 100);
    dir
}

fn get(url: &str) -> String {
    ureq::get(url)
        .timeout(Duration::from_secs(10))
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .into_string()
        .unwrap()
}

/// A tool from a Debian package the CI installs; elsewhere its test is skipped, loudly.
fn tool(name: &str) -> Option<String> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing: .ci/run installs it (Debian package prometheus)"
        );
        eprintln!("SKIPPED: {name} is not installed (apt-get install prometheus)");
    }
    found
}

/// A sample's value in the text format (`name{labels} value`), summed over matching lines.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn trained(server: &Server) -> String {
    let mut training = server.training().await;
    let job = start_job(&mut training, start_request("tiny", 1, "synth")).await;
    let events = watch_to_end(&mut training, &job, Duration::from_secs(120)).await;
    assert_eq!(
        common::server::final_state(&events),
        pb::JobState::Succeeded
    );
    job
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn query(prom: &str, q: &str) -> serde_json::Value {
    let url = format!("{prom}/api/v1/query?query={}", urlencode(q));
    serde_json::from_str(&get(&url)).unwrap()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_documented_metrics() {
    let dir = setup(300);
    let port = free_port();
    let server = Server::start(
        dir.path(),
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    let job = trained(&server).await;
    let mut inference = server.inference().await;
    for _ in 0..3 {
        inference
            .classify(pb::ClassifyRequest {
                model: job.clone(),
                images: vec![encoded(png(32, 3)); 4],
                top_k: 1,
            })
            .await
            .unwrap();
    }
    let bad = inference
        .classify(pb::ClassifyRequest {
            model: job.clone(),
            images: vec![],
            top_k: 1,
        })
        .await;
    assert_eq!(bad.unwrap_err().code(), Code::InvalidArgument);

    let url = format!("http://127.0.0.1:{port}/metrics");
    // The worker lets go of a request's queue place just after answering it.
    let mut text = get(&url);
    for _ in 0..20 {
        if text.contains("tlb_inference_queued_images 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = get(&url);
    }
    for line in [
        "tlb_rpc_requests_total{code=\"Ok\",method=\"tlb.v1.InferenceService/Classify\"} 3",
        "tlb_rpc_requests_total{code=\"InvalidArgument\",method=\"tlb.v1.InferenceService/Classify\"} 1",
        "tlb_jobs{state=\"SUCCEEDED\"} 1",
        "tlb_jobs{state=\"QUEUED\"} 0",
        "tlb_inference_queued_images 0",
        "tlb_build_info{backend=",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    for prefix in [
        "tlb_rpc_duration_seconds_count{method=\"tlb.v1.TrainingService/StartTraining\"}",
        "tlb_inference_queue_seconds_count",
        "tlb_inference_batch_images_sum",
        "tlb_checkpoint_write_seconds_count",
        "tlb_device_busy_seconds_total{device=\"cpu\",work=\"train\"}",
        "tlb_device_busy_seconds_total{device=\"cpu\",work=\"infer\"}",
        "process_resident_memory_bytes",
    ] {
        assert!(
            sample(&text, prefix) > 0.0,
            "{prefix} is 0 or missing in\n{text}"
        );
    }
    assert_eq!(sample(&text, "tlb_inference_batch_images_sum"), 12.0);
    assert!(text.contains("tlb_train_images_per_second{device=\"cpu\"}"));
    assert!(text.contains("process_open_fds"));
    assert!(text.contains("\nprocess_cpu_seconds_total "));

    let (Some(promtool), Some(prometheus)) = (tool("promtool"), tool("prometheus")) else {
        return;
    };
    // promtool's lint of names, units and help texts.
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes the endpoint.
    let prom_port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: tlb\n    \
             static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let _prom = Prometheus(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let prom = format!("http://127.0.0.1:{prom_port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let scraped = loop {
        let got = ureq::get(&format!(
            "{prom}/api/v1/query?query={}",
            urlencode("tlb_jobs{state=\"SUCCEEDED\"}")
        ))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        let value = got.as_ref().and_then(|v| {
            v["data"]["result"][0]["value"][1]
                .as_str()
                .map(String::from)
        });
        if let Some(v) = value {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped tlb: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(scraped, "1");
    let up = query(&prom, "up{job=\"tlb\"}");
    assert_eq!(up["data"]["result"][0]["value"][1], "1", "{up}");
    let rss = query(&prom, "process_resident_memory_bytes{job=\"tlb\"}");
    let rss: f64 = rss["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rss > 1e6, "{rss}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_flood_is_answered_or_refused_within_bounded_memory() {
    let dir = setup(300);
    let server = Server::start(dir.path(), &["--max-queued-images", "64"]);
    let job = trained(&server).await;
    let image = png(32, 5);
    let calls = 3000;
    let channel = server.channel().await;
    // One call first: the server's HTTP/2 settings (its concurrent-stream limit) have arrived
    // before the flood, so the client queues streams beyond the limit instead of opening
    // ones the server must refuse at the transport level ("transport error").
    tlb::proto::v1::inference_service_client::InferenceServiceClient::new(channel.clone())
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap();
    let before = rss_peak_kib(server.child.id());
    let started = Instant::now();
    // Open loop: every call is sent at once, none waits for another's answer.
    let mut handles = Vec::with_capacity(calls);
    for _ in 0..calls {
        let mut client =
            tlb::proto::v1::inference_service_client::InferenceServiceClient::new(channel.clone());
        let request = pb::ClassifyRequest {
            model: job.clone(),
            images: vec![encoded(image.clone()); 4],
            top_k: 1,
        };
        handles.push(tokio::spawn(async move {
            client
                .classify(request)
                .await
                .map(|_| ())
                .map_err(|s| (s.code(), s.message().to_string()))
        }));
    }
    let (mut ok, mut refused, mut dropped) = (0, 0, 0);
    for h in handles {
        match h.await.unwrap() {
            Ok(()) => ok += 1,
            Err((Code::ResourceExhausted, _)) => refused += 1,
            // The HTTP/2 connection itself gave up on a stream (seen twice in ~10 full runs
            // under load, cause not found): counted, bounded, and the server must serve on.
            Err((Code::Unknown, m)) if m == "transport error" => dropped += 1,
            Err(other) => panic!("a call ended {other:?}"),
        }
    }
    assert!(
        dropped < calls / 10,
        "{dropped} calls dropped by the transport"
    );
    let refused = refused + dropped;
    let elapsed = started.elapsed();
    let peak = rss_peak_kib(server.child.id());
    println!(
        "flood: {calls} calls of 4 images in {:.2} s: {ok} answered, {refused} refused \
         ({dropped} by the transport); peak RSS {} MiB (before {} MiB)",
        elapsed.as_secs_f64(),
        peak / 1024,
        before / 1024
    );
    assert_eq!(ok + refused, calls);
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    assert!(peak < 1024 * 1024, "peak RSS {} MiB", peak / 1024);
    // Healthy afterwards, the queue empty.
    let mut inference = server.inference().await;
    let after = inference
        .classify(pb::ClassifyRequest {
            model: job,
            images: vec![encoded(image)],
            top_k: 1,
        })
        .await;
    assert!(after.is_ok(), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_job_queue_bounds() {
    let dir = setup(3000);
    let port = free_port();
    let server = Server::start(
        dir.path(),
        &[
            "--max-queued-jobs",
            "1",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ],
    );
    let model = trained(&server).await;
    // A long step keeps the device busy: a call that cannot wait that long is dropped.
    let mut busy = start_request("tiny", 5, "synth");
    busy.config.as_mut().unwrap().batch_size = Some(2048);
    let mut training = server.training().await;
    let long = start_job(&mut training, busy).await;
    common::server::wait_for(&mut training, &long, |e| {
        matches!(e, pb::job_event::Event::Progress(_))
    })
    .await;
    let mut inference = server.inference().await;
    let call = |seed| pb::ClassifyRequest {
        model: model.clone(),
        images: vec![encoded(png(32, seed))],
        top_k: 1,
    };
    // A call landing just before a step ends may be answered in time: try again then.
    let mut answered = 0.0;
    let mut exceeded = None;
    for _ in 0..5 {
        let mut request = tonic::Request::new(call(1));
        request.set_timeout(Duration::from_millis(60));
        let t = Instant::now();
        match inference.classify(request).await {
            Ok(_) => answered += 1.0,
            Err(status) => {
                exceeded = Some((status, t.elapsed()));
                break;
            }
        }
    }
    let (status, waited) = exceeded.expect("no call ran out of time during long steps");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    // A call the client gives up on (its future dropped: the stream is reset).
    let mut gave_up = false;
    for _ in 0..5 {
        match tokio::time::timeout(Duration::from_millis(50), inference.classify(call(2))).await {
            Ok(answer) => {
                answer.unwrap();
                answered += 1.0;
            }
            Err(_) => {
                gave_up = true;
                break;
            }
        }
    }
    assert!(
        gave_up,
        "every call was answered within 50 ms during long steps"
    );
    // The device takes requests in order: once this one is answered, it has reached every
    // call above. Each was either worked on (a forward pass) or dropped unprocessed, never
    // both; a call that reached the device just as a step ended can still run out of time
    // during its own forward pass, but the calls that waited out their time were dropped.
    inference.classify(call(3)).await.unwrap();
    let metrics = get(&format!("http://127.0.0.1:{port}/metrics"));
    let dropped = sample(&metrics, "tlb_inference_dropped_total");
    let failed = 2.0;
    let ran = sample(&metrics, "tlb_inference_batch_images_count");
    assert_eq!(ran + dropped, answered + failed + 1.0, "{metrics}");
    assert!(dropped >= 1.0, "no call was dropped unprocessed: {metrics}");

    // One job queued behind the running one at most.
    let mut refused = 0;
    for _ in 0..3 {
        if let Err(s) = training
            .start_training(start_request("tiny", 1, "synth"))
            .await
        {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains("job queue full"), "{s:?}");
            refused += 1;
        }
    }
    assert!(refused >= 2, "{refused} refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_errors_come_before_state_errors() {
    // No model exists yet: a bad image is still the caller's argument error.
    let dir = setup(100);
    let server = Server::start(dir.path(), &[]);
    let mut inference = server.inference().await;
    let classify = |image: pb::Image| pb::ClassifyRequest {
        model: String::new(),
        images: vec![image],
        top_k: 1,
    };
    let mut garbage = png(32, 1);
    garbage.truncate(60);
    let status = inference
        .classify(classify(encoded(garbage)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("images[0].encoded"), "{status:?}");
    let wrong_size = pb::Image {
        source: Some(pb::image::Source::Raw(pb::RawImage {
            width: 4,
            height: 4,
            rgb8: vec![0; 47],
        })),
    };
    let status = inference.classify(classify(wrong_size)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("rgb8"), "{status:?}");
    // A good image with no model: now the state error.
    let status = inference
        .classify(classify(encoded(png(32, 1))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
}

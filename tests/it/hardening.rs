//! Faults an operator meets (issue 18): a job-store outage reported and survived, epoch
//! records that outlive it, committed checkpoints that went missing, and a data dir seen at
//! another path.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::postgres::Postgres;
use common::server::{
    encoded, get_job, job_dir, png, start_job, start_request, wait_for, watch_to_end, Server,
};
use common::{free_port, write_synthetic_cifar};
use tlb::proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use pb::job_event::Event;

fn datasets(root: &Path, train: usize) {
    write_synthetic_cifar(&root.join("datasets/synth"), train, 100);
}

fn with_store(url: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--database-url".to_string(), url.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn start(root: &Path, args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(root, &args)
}

async fn health_of(server: &Server, service: &str) -> ServingStatus {
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

/// Waits (up to 10 s) until `service` reports `want`; returns how long that took.
async fn health_becomes(server: &Server, service: &str, want: ServingStatus) -> Duration {
    let started = Instant::now();
    while health_of(server, service).await != want {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{service} is not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

async fn classify(server: &Server, model: &str) -> Result<pb::ClassifyResponse, tonic::Status> {
    let mut inference = server.inference().await;
    inference
        .classify(pb::ClassifyRequest {
            model: model.into(),
            images: vec![encoded(png(32, 3))],
            top_k: 1,
        })
        .await
        .map(|r| r.into_inner())
}

/// While PostgreSQL is down: calls that need the store fail fast with UNAVAILABLE naming
/// it, a model already resolved is still served, health says which service is affected,
/// and shutdown is quick; a server started before its store waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_store_outage_is_reported_and_survived() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    datasets(dir.path(), 300);
    let args = with_store(&pg.url, &["--replica-id", "one"]);
    let mut server = start(dir.path(), &args);
    let mut training = server.training().await;
    let job = start_job(&mut training, start_request("tiny", 1, "synth")).await;
    watch_to_end(&mut training, &job, Duration::from_secs(120)).await;
    classify(&server, &job).await.unwrap();

    pg.stop();
    let noticed =
        health_becomes(&server, "tlb.v1.TrainingService", ServingStatus::NotServing).await;
    for service in [
        "",
        "tlb.v1.InferenceService",
        "inference.GRPCInferenceService",
    ] {
        assert_eq!(
            health_of(&server, service).await,
            ServingStatus::Serving,
            "{service}"
        );
    }
    let asked = Instant::now();
    let refused = training
        .get_job(pb::GetJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap_err();
    let to_unavailable = asked.elapsed();
    assert_eq!(refused.code(), Code::Unavailable, "{}", refused.message());
    assert!(
        refused.message().contains("job store"),
        "{}",
        refused.message()
    );
    // (The first may wait for a store call the worker began before the outage was noticed,
    // at most the 3 s connect timeout.)
    let served = classify(&server, &job).await;
    assert!(served.is_ok(), "{served:?}");
    let asked = Instant::now();
    let served = classify(&server, &job).await;
    let cached = asked.elapsed();
    assert!(served.is_ok(), "{served:?}");
    // A model never resolved cannot be: UNAVAILABLE, not a wait.
    let unknown = classify(&server, "").await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unavailable, "{}", unknown.message());
    println!(
        "store down: TrainingService NOT_SERVING after {:.2} s, GetJob UNAVAILABLE in {:.1} ms, \
         Classify of a resolved model {:.1} ms",
        noticed.as_secs_f64(),
        to_unavailable.as_secs_f64() * 1e3,
        cached.as_secs_f64() * 1e3
    );
    assert!(
        to_unavailable < Duration::from_secs(1),
        "{to_unavailable:?}"
    );

    pg.resume();
    health_becomes(&server, "tlb.v1.TrainingService", ServingStatus::Serving).await;
    get_job(&mut training, &job).await;

    pg.stop();
    health_becomes(&server, "tlb.v1.TrainingService", ServingStatus::NotServing).await;
    let asked = Instant::now();
    let status = server.signal_and_wait("TERM");
    let shutdown = asked.elapsed();
    println!(
        "SIGTERM during the outage: exited in {:.2} s",
        shutdown.as_secs_f64()
    );
    assert!(status.success(), "{status:?}");
    assert!(shutdown < Duration::from_secs(10), "{shutdown:?}");

    // Started while the store is down: it waits (with backoff) and serves once it is up.
    let resume_later = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        pg.resume();
        pg
    });
    let waited = Instant::now();
    let server = start(dir.path(), &args);
    let pg = resume_later.join().unwrap();
    assert!(waited.elapsed() >= Duration::from_secs(3));
    let mut training = server.training().await;
    assert_eq!(
        get_job(&mut training, &job).await.state,
        pb::JobState::Succeeded as i32
    );
    drop(server);
    drop(pg);

    // With no store at all it gives up after --store-wait, saying why.
    let closed = format!("postgres://postgres@127.0.0.1:{}/postgres", free_port());
    let out = Server::command(
        dir.path(),
        &["--database-url", &closed, "--store-wait", "2"],
    )
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("opening the job store") && err.contains("--store-wait 2"),
        "{err}"
    );
}

/// An outage across a job's last epoch: the epoch is recorded once the store is back, and
/// the job does not end before it (GetJob shows every epoch its checkpoints have).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_are_recorded_across_a_store_outage() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    datasets(dir.path(), 1500);
    let server = start(dir.path(), &with_store(&pg.url, &[]));
    let mut training = server.training().await;
    let epochs = 3;
    let job = start_job(&mut training, start_request("tiny", epochs, "synth")).await;
    wait_for(
        &mut training,
        &job,
        |e| matches!(e, Event::Epoch(m) if m.epoch == epochs - 1),
    )
    .await;
    pg.stop();
    // The last epoch ends (its metrics line is written) while the store is down, and its
    // record is refused for a few seconds.
    let metrics = job_dir(dir.path(), &job).join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .contains(&format!("\"epoch\":{epochs}"))
    {
        assert!(Instant::now() < deadline, "the last epoch did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    pg.resume();
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        if let Ok(j) = training
            .get_job(pb::GetJobRequest {
                job_id: job.clone(),
            })
            .await
        {
            if j.get_ref().state == pb::JobState::Succeeded as i32 {
                break j.into_inner();
            }
        }
        assert!(Instant::now() < deadline, "the job did not succeed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!((done.epochs_completed, done.epochs_total), (epochs, epochs));
    let checkpoints = training
        .list_checkpoints(pb::ListCheckpointsRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    assert_eq!(checkpoints.iter().map(|c| c.epoch).max(), Some(epochs));
}

/// Starts a 20-epoch job and kills the server once its first checkpoint is committed.
async fn killed_after_a_checkpoint(root: &Path, args: &[&str]) -> String {
    let mut server = Server::start(root, args);
    let mut training = server.training().await;
    let job = start_job(&mut training, start_request("tiny", 20, "synth")).await;
    wait_for(&mut training, &job, |e| matches!(e, Event::Checkpoint(_))).await;
    server.signal_and_wait("KILL");
    job
}

/// A resumed job whose committed checkpoints are all gone fails by default, naming them and
/// the flag; with `--on-missing-checkpoint restart` it trains again from epoch 0, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_checkpoints_fail_the_job_or_restart_it_visibly() {
    let dir = tempfile::tempdir().unwrap();
    datasets(dir.path(), 300);
    let metrics_port = free_port().to_string();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    for (policy, want) in [
        ("fail", pb::JobState::Failed),
        ("restart", pb::JobState::Succeeded),
    ] {
        let job = killed_after_a_checkpoint(dir.path(), &[]).await;
        let ckpts = job_dir(dir.path(), &job).join("checkpoints");
        std::fs::remove_dir_all(&ckpts).unwrap();
        let server = Server::start(
            dir.path(),
            &[
                "--on-missing-checkpoint",
                policy,
                "--metrics-addr",
                &metrics_addr,
            ],
        );
        let mut training = server.training().await;
        let events = watch_to_end(&mut training, &job, Duration::from_secs(120)).await;
        let j = get_job(&mut training, &job).await;
        assert_eq!(j.state, want as i32, "{policy}: {}", j.error);
        if policy == "fail" {
            assert!(
                j.error.contains("none of the job's committed checkpoints"),
                "{}",
                j.error
            );
            assert!(j.error.contains("epoch-0001"), "{}", j.error);
            assert!(
                j.error.contains("--on-missing-checkpoint restart"),
                "{}",
                j.error
            );
            continue;
        }
        assert!(
            j.warnings
                .iter()
                .any(|w| w.contains("training again from epoch 0")),
            "{:?}",
            j.warnings
        );
        let _ = events;
        let text = ureq::get(&format!("http://{metrics_addr}/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        assert!(
            text.lines()
                .any(|l| l == "tlb_job_restarts_from_scratch_total 1"),
            "{text}"
        );
    }
}

/// The data dir seen at another path (another mount point): the models trained there are
/// served, and a job killed there resumes from its checkpoint, not from scratch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_moved_to_another_path_keeps_its_models_and_jobs() {
    let top = tempfile::tempdir().unwrap();
    let (first, second) = (top.path().join("first"), top.path().join("second"));
    datasets(&first, 300);
    let trained = {
        let server = Server::start(&first, &[]);
        let mut training = server.training().await;
        let job = start_job(&mut training, start_request("tiny", 1, "synth")).await;
        watch_to_end(&mut training, &job, Duration::from_secs(120)).await;
        job
    };
    let interrupted = killed_after_a_checkpoint(&first, &[]).await;
    std::fs::rename(&first, &second).unwrap();

    let server = Server::start(&second, &[]);
    let served = classify(&server, &trained).await;
    assert!(served.is_ok(), "{served:?}");
    let j = resumed_to_the_end(&server, &interrupted, &job_dir(&second, &interrupted)).await;
    assert_eq!(j.attempt, 2);
}

/// Follows a job that was killed after a checkpoint to its end through `server`: it
/// succeeds, with no warning, and its second attempt started after the committed epoch(s),
/// not at 0 (`run_dir` holds its metrics.jsonl).
async fn resumed_to_the_end(server: &Server, job: &str, run_dir: &Path) -> pb::Job {
    let mut training = server.training().await;
    watch_to_end(&mut training, job, Duration::from_secs(180)).await;
    let j = get_job(&mut training, job).await;
    assert_eq!(j.state, pb::JobState::Succeeded as i32, "{}", j.error);
    assert!(j.warnings.is_empty(), "{:?}", j.warnings);
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let start = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["attempt"].as_u64() == Some(2) && v.get("from_epoch").is_some())
        .expect("attempt 2's start line");
    assert!(start["from_epoch"].as_u64().unwrap() >= 1, "{start}");
    j
}

/// `tlb serve` for a replica on `data` (PostgreSQL at `url`), optionally inside a mount
/// namespace of its own where the share is reached at `data` only: `hide` (the share's
/// path on the host) is bind-mounted onto `data` and covered by an empty tmpfs, as on
/// another machine that mounts it elsewhere.
fn replica(
    top: &Path,
    url: &str,
    id: &str,
    data: &Path,
    hide: Option<&Path>,
) -> std::process::Command {
    let tlb = env!("CARGO_BIN_EXE_tlb");
    let serve: Vec<String> = [
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--database-url",
        url,
        "--replica-id",
        id,
        "--lease-seconds",
        "3",
        "--datasets-root",
        &top.join("datasets").to_string_lossy(),
        "--data-dir",
        &data.to_string_lossy(),
    ]
    .map(String::from)
    .to_vec();
    let mut cmd = match hide {
        None => {
            let mut c = std::process::Command::new(tlb);
            c.args(&serve);
            c
        }
        Some(share) => {
            let mut c = std::process::Command::new("unshare");
            c.args(["-m", "sh", "-c"])
                .arg(
                    "mount --bind \"$1\" \"$2\" && mount -t tmpfs none \"$1\" && shift 2 && \
                     exec \"$@\"",
                )
                .arg("sh")
                .arg(share)
                .arg(data)
                .arg(tlb)
                .args(&serve);
            c
        }
    };
    cmd.env("TLB_THREADS", "1").env("RUST_LOG", "warn");
    cmd
}

/// Two replicas that mount the shared data dir at different paths (the second one in a
/// mount namespace where the first one's path is empty): each serves the models the other
/// trained, and a job the first one ran when it was killed is resumed by the second from its
/// checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_mount_the_share_at_different_paths_share_models_and_jobs() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("SKIPPED: mount namespaces need root");
        return;
    }
    let Some(pg) = Postgres::start() else { return };
    let top = tempfile::tempdir().unwrap();
    datasets(top.path(), 300);
    let (share, view) = (top.path().join("share"), top.path().join("view"));
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&view).unwrap();
    let mut a = Server::spawn(replica(top.path(), &pg.url, "a", &share, None), top.path());
    let mut training = a.training().await;
    let trained = start_job(&mut training, start_request("tiny", 1, "synth")).await;
    watch_to_end(&mut training, &trained, Duration::from_secs(120)).await;
    let running = start_job(&mut training, start_request("tiny", 20, "synth")).await;
    wait_for(&mut training, &running, |e| {
        matches!(e, Event::Checkpoint(_))
    })
    .await;
    a.signal_and_wait("KILL");

    let b = Server::spawn(
        replica(top.path(), &pg.url, "b", &view, Some(&share)),
        top.path(),
    );
    let served = classify(&b, &trained).await;
    assert!(served.is_ok(), "{served:?}");
    let j = resumed_to_the_end(&b, &running, &share.join("jobs").join(&running)).await;
    assert_eq!((j.attempt, j.worker.as_str()), (2, "b"));
}

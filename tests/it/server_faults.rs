//! Faults an operator meets, on the real server: corrupt and poisoned checkpoints, an
//! unreadable job row, a second server on one data dir, a crash loop, a full disk, jobs that
//! cannot fit in memory and requests that would occupy the server decoding images.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::faults::{corrupt, poison};
use common::server::{
    encoded, final_state, get_job, job_dir, metric_epochs, start_job, start_request, wait_for,
    watch_to_end, Server,
};
use common::write_synthetic_cifar;
use tlb::proto::v1 as pb;
use tlb::proto::v1::job_event::Event;
use tonic::Code;

fn setup(train: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_cifar(&dir.path().join("datasets/synth"), train, 100);
    dir
}

fn checkpoints(root: &Path, job: &str) -> std::path::PathBuf {
    job_dir(root, job).join("checkpoints")
}

fn expect<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("expected an error");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(needle), "{status:?}");
}

/// Stops a server cleanly: its running job checkpoints mid-epoch and stays RUNNING.
fn stop(server: &mut Server) {
    let status = server.signal_and_wait("TERM");
    assert!(status.success(), "SIGTERM exit: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_and_poisoned_checkpoints_and_an_unreadable_row() {
    let dir = setup(1200);
    let root = dir.path();
    let mut server = Server::start(root, &[]);
    let mut training = server.training().await;

    // 1. The newest checkpoint rots while the server is down: the job resumes from the
    //    newest intact one, says so, and ends with each epoch once in its metrics.
    let a = start_job(&mut training, start_request("tiny", 3, "synth")).await;
    wait_for(&mut training, &a, |e| matches!(e, Event::Checkpoint(_))).await;
    stop(&mut server);
    // Attempt 1 wrote it (file names carry the attempt).
    let last = checkpoints(root, &a).join("last.a1.ckpt");
    assert!(last.exists());
    corrupt(&last);
    let mut server = Server::start(root, &[]);
    let mut training = server.training().await;
    let events = watch_to_end(&mut training, &a, Duration::from_secs(300)).await;
    assert_eq!(final_state(&events), pb::JobState::Succeeded);
    let warnings: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Warning(w) => Some(w.message.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("last.a1.ckpt") && w.contains("checksum mismatch")),
        "{warnings:?}"
    );
    assert!(checkpoints(root, &a).join("last.a1.ckpt.corrupt").exists());
    assert_eq!(metric_epochs(root, &a), vec![1, 2, 3]);

    // 2. Weights that make the loss NaN (a checksum cannot catch them): FAILED with the
    //    step, the metrics still served, the stream ends.
    let b = start_job(&mut training, start_request("tiny", 3, "synth")).await;
    wait_for(&mut training, &b, |e| matches!(e, Event::Checkpoint(_))).await;
    stop(&mut server);
    for entry in std::fs::read_dir(checkpoints(root, &b)).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "ckpt") {
            poison(&path);
        }
    }
    let mut server = Server::start(root, &[]);
    let mut training = server.training().await;
    let events = watch_to_end(&mut training, &b, Duration::from_secs(120)).await;
    assert_eq!(final_state(&events), pb::JobState::Failed);
    let job = get_job(&mut training, &b).await;
    assert!(
        job.error.contains("loss became NaN at epoch"),
        "{}",
        job.error
    );
    assert!(job.error.contains(", step "), "{}", job.error);

    // 3. One job's row becomes unreadable: every other job's RPCs and the lists still work.
    stop(&mut server);
    drop(training);
    let db = format!("sqlite://{}", root.join("data/tlb.db").display());
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    sqlx::query("UPDATE jobs SET config_json = 'not json' WHERE id = $1")
        .bind(&a)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET latest_metrics_json = '{\"epoch\": \"x\"}' WHERE id = $1")
        .bind(&b)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let server = Server::start(root, &[]);
    let mut training = server.training().await;
    let listed = training
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(
        listed.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(),
        vec![b.as_str()]
    );
    assert_eq!(get_job(&mut training, &b).await.latest_metrics, None);
    let events = watch_to_end(&mut training, &b, Duration::from_secs(10)).await;
    assert_eq!(final_state(&events), pb::JobState::Failed);
    let checkpoints = training
        .list_checkpoints(pb::ListCheckpointsRequest { job_id: b.clone() })
        .await;
    assert!(checkpoints.is_ok(), "{checkpoints:?}");
    expect(
        training
            .get_job(pb::GetJobRequest { job_id: a.clone() })
            .await,
        Code::Internal,
        "unreadable",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let dir = setup(100);
    // A temp file of a write that a crash cut short.
    let stale = checkpoints(dir.path(), "old").join(".epoch-0001.ckpt.tmp-XyZ123");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, b"half a checkpoint").unwrap();

    let first = Server::start(dir.path(), &[]);
    assert!(!stale.exists(), "stale temp files are removed at start-up");
    let out = Server::command(dir.path(), &[]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("in use by pid {} on host", first.child.id())),
        "{err}"
    );
    // The first one serves on.
    let mut training = first.training().await;
    let jobs = training.list_jobs(pb::ListJobsRequest::default()).await;
    assert!(jobs.is_ok(), "{jobs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_killing_the_server_is_failed_not_resumed_forever() {
    // Epochs long enough that no checkpoint lands between the start and the kill.
    let dir = setup(3000);
    let mut job = String::new();
    for death in 1..=3 {
        let mut server = Server::start(dir.path(), &[]);
        let mut training = server.training().await;
        if death == 1 {
            job = start_job(&mut training, start_request("tiny", 50, "synth")).await;
        }
        wait_for(&mut training, &job, |e| matches!(e, Event::Progress(_))).await;
        server.signal_and_wait("KILL");
    }
    let server = Server::start(dir.path(), &[]);
    let mut training = server.training().await;
    let events = watch_to_end(&mut training, &job, Duration::from_secs(30)).await;
    assert_eq!(final_state(&events), pb::JobState::Failed);
    assert!(
        !events.iter().any(|e| matches!(e, Event::Progress(_))),
        "the job must not run a fourth time"
    );
    let job = get_job(&mut training, &job).await;
    assert!(
        job.error
            .contains("the server stopped 3 times while running this job"),
        "{}",
        job.error
    );
    // Claimed four times: three resumes (the last one found the crash loop and failed it).
    assert_eq!((job.attempt, job.restarts), (4, 3));
}

/// A tmpfs of `size` mounted on `path` for the life of the guard.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the disk is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path).unwrap();
    let mut written = 0u64;
    for chunk in [1 << 20, 4096] {
        let buf = vec![0xA5u8; chunk];
        while f.write_all(&buf).and_then(|()| f.sync_data()).is_ok() {
            written += chunk as u64;
        }
    }
    written
}

fn temp_files(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if name.contains(".tmp-") {
                found.push(name);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_new_jobs_fails_the_running_one_cleanly_and_recovers() {
    let dir = setup(600);
    let data = dir.path().join("data");
    let _tmpfs = match Tmpfs::mount(&data, "16m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED a_full_disk_...: cannot mount a tmpfs here (needs root): {why}");
            return;
        }
    };
    let server = Server::start(dir.path(), &["--min-free-bytes", "1048576"]);
    let mut training = server.training().await;
    let model = start_job(&mut training, start_request("tiny", 1, "synth")).await;
    let events = watch_to_end(&mut training, &model, Duration::from_secs(120)).await;
    assert_eq!(final_state(&events), pb::JobState::Succeeded);

    // Nearly full: StartTraining is refused at once; inference and health carry on.
    fill(&data.join("filler"));
    let t = Instant::now();
    expect(
        training
            .start_training(start_request("tiny", 1, "synth"))
            .await,
        Code::ResourceExhausted,
        "data dir full: ",
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    server.until_serving().await;
    let mut inference = server.inference().await;
    let classified = inference
        .classify(pb::ClassifyRequest {
            model: model.clone(),
            images: vec![encoded(common::server::png(32, 1))],
            top_k: 1,
        })
        .await;
    assert!(classified.is_ok(), "{classified:?}");

    // Space for the metrics and the store, not for a checkpoint: the job fails on its
    // checkpoint, leaves no temp file, and its state is one truth.
    std::fs::remove_file(data.join("filler")).unwrap();
    let job = start_job(&mut training, start_request("tiny", 20, "synth")).await;
    wait_for(&mut training, &job, |e| matches!(e, Event::Progress(_))).await;
    let reserve = data.join("reserve");
    std::fs::write(&reserve, vec![0u8; 96 << 10]).unwrap();
    fill(&data.join("filler"));
    std::fs::remove_file(&reserve).unwrap();
    let mut watch = training.clone();
    let ended = tokio::time::timeout(
        Duration::from_secs(60),
        watch_to_end(&mut watch, &job, Duration::from_secs(60)),
    )
    .await;
    if ended.is_err() {
        // The store could not even record the failure: it must once space is back.
        std::fs::remove_file(data.join("filler")).unwrap();
    }
    let events = watch_to_end(&mut training, &job, Duration::from_secs(60)).await;
    assert_eq!(final_state(&events), pb::JobState::Failed);
    let failed = get_job(&mut training, &job).await;
    assert!(
        failed.error.contains("No space left on device"),
        "{}",
        failed.error
    );
    assert_eq!(temp_files(&data), Vec::<String>::new());
    expect(
        training
            .cancel_job(pb::CancelJobRequest {
                job_id: job.clone(),
            })
            .await,
        Code::FailedPrecondition,
        "already ended (FAILED)",
    );

    // Space is back: new jobs run, with no restart.
    let _ = std::fs::remove_file(data.join("filler"));
    let again = start_job(&mut training, start_request("tiny", 1, "synth")).await;
    let events = watch_to_end(&mut training, &again, Duration::from_secs(120)).await;
    assert_eq!(final_state(&events), pb::JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_jobs_that_cannot_fit_and_requests_that_would_occupy_the_server() {
    let dir = setup(100);
    let mut cmd = Server::command(dir.path(), &[]);
    // The reproduction: `ulimit -v 4000000`.
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit,
    // which is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 4_000_000 * 1024,
                rlim_max: 4_000_000 * 1024,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let server = Server::spawn(cmd, dir.path());
    let mut training = server.training().await;
    let sized = |embed_dim, num_layers| {
        let mut r = start_request("tiny", 1, "synth");
        let c = r.config.as_mut().unwrap();
        (c.embed_dim, c.num_layers) = (Some(embed_dim), Some(num_layers));
        r
    };
    // Inside the validated limits, far beyond any machine.
    expect(
        training.start_training(sized(4096, 64)).await,
        Code::ResourceExhausted,
        "the job needs about",
    );
    // Fits the host, not the address-space limit.
    expect(
        training.start_training(sized(1024, 16)).await,
        Code::ResourceExhausted,
        "ulimit -v",
    );
    let jobs = training
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "refused jobs are not queued: {jobs:?}");
    // A stated device memory (what a GPU needs) is checked the same way.
    let other = setup(100);
    let stated = Server::start(other.path(), &["--device-memory", "100000000"]);
    expect(
        stated.training().await.start_training(sized(256, 8)).await,
        Code::ResourceExhausted,
        "but --device-memory leaves 95.4 MiB",
    );

    let mut inference = server.inference().await;
    // The largest raw image fits in a message (the limits are consistent)...
    let raw = pb::Image {
        source: Some(pb::image::Source::Raw(pb::RawImage {
            width: 4096,
            height: 4096,
            rgb8: vec![7; 4096 * 4096 * 3],
        })),
    };
    expect(
        inference
            .classify(pb::ClassifyRequest {
                model: String::new(),
                images: vec![raw],
                top_k: 1,
            })
            .await,
        Code::FailedPrecondition,
        "no trained model yet",
    );
    // ...but two of the largest encoded ones exceed the pixel budget, refused undecoded.
    let big = {
        let img = image::RgbImage::from_pixel(4096, 4096, image::Rgb([9, 9, 9]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    expect(
        inference
            .classify(pb::ClassifyRequest {
                model: String::new(),
                images: vec![encoded(big.clone()), encoded(big)],
                top_k: 1,
            })
            .await,
        Code::ResourceExhausted,
        "33554432 pixels in one request; the limit is 16777216",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_writes_again_as_soon_as_a_full_disk_has_space() {
    use tlb::engine::train::{EpochMetrics, Preset};
    use tlb::store::{JobRow, JobState, Store};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _tmpfs = match Tmpfs::mount(&data, "4m") {
        Ok(m) => m,
        Err(why) => {
            eprintln!(
                "SKIPPED the_store_writes_again_...: cannot mount a tmpfs here (needs root): {why}"
            );
            return;
        }
    };
    let store = Store::open(&data).await.unwrap();
    let queued = || JobRow::queued("tiny", Preset::Tiny.config(), "cifar10", "x");
    let (a, mut b) = (queued(), queued());
    // `a` is the older one: the one claimed first.
    b.created_at_ms = a.created_at_ms + 1;
    store.insert_job(&a).await.unwrap();
    store.insert_job(&b).await.unwrap();
    let fence = store
        .claim("r1", "cpu", 60_000)
        .await
        .unwrap()
        .unwrap()
        .fence;
    assert_eq!(fence.job, a.id);

    fill(&data.join("filler"));
    let metrics = EpochMetrics {
        epoch: 1,
        train_loss: f64::NAN,
        train_accuracy: 0.5,
        val_loss: 1.0,
        val_accuracy: 0.5,
        lr: 1e-3,
        seconds: 1.0,
        images_per_sec: 1.0,
        data_wait_fraction: 0.0,
        epochs_total: 0,
    };
    // Every kind of write fails while the disk is full (a big row makes sure of it)...
    let mut big = queued();
    big.preset = "x".repeat(1 << 20);
    assert!(store.insert_job(&big).await.is_err());
    let mut failures = 0;
    for _ in 0..3 {
        failures += store.record_epoch(fence, &metrics).await.is_err() as usize;
        failures += store
            .finish(fence, JobState::Failed, &"disk full ".repeat(50_000), None)
            .await
            .is_err() as usize;
    }
    assert!(failures > 0, "the disk was not full enough to fail a write");
    // ...and reads agree with each other all along.
    let seen = store.get_job(a.id).await.unwrap().unwrap().state;
    let listed = store.list_jobs(None, 10, None).await.unwrap();
    assert_eq!(listed.iter().find(|j| j.id == a.id).unwrap().state, seen);

    // Space is back: the next writes succeed at once, from every pooled connection.
    std::fs::remove_file(data.join("filler")).unwrap();
    let t = Instant::now();
    for _ in 0..8 {
        store.record_epoch(fence, &metrics).await.unwrap();
    }
    assert!(store
        .finish(fence, JobState::Failed, "disk was full", None)
        .await
        .unwrap());
    assert!(store.cancel_queued(b.id).await.unwrap());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    for _ in 0..4 {
        let job = store.get_job(a.id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Failed);
        assert!(job.latest_metrics.unwrap().train_loss.is_nan());
    }
}

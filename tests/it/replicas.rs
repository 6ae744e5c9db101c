//! Replicas sharing one PostgreSQL job store and one data dir (real PostgreSQL, real `tlb
//! serve` processes, leases of 3 s): jobs spread over both, a killed replica's job is taken
//! over with the weights of an uninterrupted run, a paused owner writes nothing after the
//! takeover, any replica cancels and watches any job, and one process runs a worker per
//! device.

use crate::common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::postgres::Postgres;
use common::server::{
    encoded, get_job, job_dir, metric_epochs, png, start_job, start_request, Server,
};
use common::write_synthetic_cifar;
use tlb::engine::backend::{cpu_device, Cpu};
use tlb::engine::train::{named_tensors, Checkpoint};
use tlb::proto::v1 as pb;
use tlb::proto::v1::job_event::Event;
use tlb::proto::v1::training_service_client::TrainingServiceClient;
use tlb::store::Store;
use tonic::transport::Channel;

/// Lease of the replicas; `TLB_TEST_LEASE_SECONDS=30` measures the default's takeover.
pub(crate) fn lease_seconds() -> String {
    std::env::var("TLB_TEST_LEASE_SECONDS").unwrap_or_else(|_| "3".into())
}

/// A replica on `root/data` (shared), datasets under `datasets`.
fn replica(root: &Path, datasets: &Path, url: &str, id: &str, extra: &[&str]) -> Server {
    Server::spawn(replica_command(root, datasets, url, id, extra), root)
}

/// The command [`replica`] runs, to adjust before [`Server::spawn`].
pub(crate) fn replica_command(
    root: &Path,
    datasets: &Path,
    url: &str,
    id: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tlb"));
    cmd.args(["serve", "--addr", "127.0.0.1:0", "--data-dir"])
        .arg(root.join("data"))
        .arg("--datasets-root")
        .arg(datasets)
        .args(["--database-url", url, "--replica-id", id])
        .args(extra)
        .env("TLB_THREADS", "1")
        .env("RUST_LOG", "warn");
    if !extra.contains(&"--lease-seconds") {
        cmd.args(["--lease-seconds", &lease_seconds()]);
    }
    cmd
}

/// The replicas' ids, in the order [`pair`] starts them.
pub(crate) const IDS: [&str; 2] = ["a", "b"];

/// Replicas `a` and `b` on one database and one data dir.
fn pair(root: &Path, datasets: &Path, url: &str, extra: &[&str]) -> [Server; 2] {
    IDS.map(|id| replica(root, datasets, url, id, extra))
}

/// A synthetic CIFAR-10 set `synth` of `train` images under `root/datasets`; that folder.
fn synthetic(root: &Path, train: usize) -> PathBuf {
    let datasets = root.join("datasets");
    write_synthetic_cifar(&datasets.join("synth"), train, 50);
    datasets
}

/// Which replica runs `job` (index into [`IDS`]) and which does not.
pub(crate) fn owner_and_other(job: &pb::Job) -> (usize, usize) {
    let owner = usize::from(job.worker == IDS[1]);
    (owner, 1 - owner)
}

pub(crate) fn shared_data() -> PathBuf {
    let root = std::env::var("TLB_SHARED_DATA")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data").to_string());
    let root = PathBuf::from(root);
    assert!(
        root.join("cifar10-mini/data_batch_1.bin").exists(),
        "set TLB_SHARED_DATA: {} has no cifar10-mini",
        root.display()
    );
    root
}

/// Waits (bounded by `timeout`) for `job` to end; it must have succeeded.
pub(crate) async fn succeeded(
    client: &mut TrainingServiceClient<Channel>,
    job: &str,
    timeout: Duration,
) -> pb::Job {
    let j = wait_job(client, job, timeout, "the end", ended).await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    j
}

/// Polls GetJob until `done` holds (bounded by `timeout`).
pub(crate) async fn wait_job(
    client: &mut TrainingServiceClient<Channel>,
    job: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let deadline = Instant::now() + timeout;
    loop {
        let j = get_job(client, job).await;
        if done(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until replica `new_owner` runs `job` as its second attempt.
pub(crate) async fn wait_takeover(
    client: &mut TrainingServiceClient<Channel>,
    job: &str,
    timeout: Duration,
    new_owner: &str,
) -> pb::Job {
    wait_job(client, job, timeout, "the takeover", |j| {
        j.attempt == 2 && j.worker == new_owner
    })
    .await
}

pub(crate) fn ended(j: &pb::Job) -> bool {
    ![pb::JobState::Queued as i32, pb::JobState::Running as i32].contains(&j.state)
}

pub(crate) fn state(j: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(j.state).unwrap()
}

/// The model weights of a job's last epoch checkpoint, as the store commits it (values, not
/// record bytes: those hold burn's random parameter ids).
async fn final_weights(store: &Store, job: &str) -> Vec<f32> {
    let rows = store.list_checkpoints(job.parse().unwrap()).await.unwrap();
    let last = rows.last().expect("a checkpoint");
    let model = Checkpoint::read(&last.path)
        .unwrap()
        .into_model::<Cpu>(&cpu_device())
        .unwrap();
    named_tensors(&model)
        .into_iter()
        .flat_map(|t| t.values)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_queue_and_train_each_epoch_once() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let datasets = synthetic(dir.path(), 300);
    let [a, b] = pair(dir.path(), &datasets, &pg.url, &[]);
    let mut clients = [a.training().await, b.training().await];
    let mut jobs = Vec::new();
    for i in 0..8 {
        let request = start_request("tiny", 2, "synth");
        jobs.push(start_job(&mut clients[i % 2], request).await);
    }
    let mut workers = HashSet::new();
    for (i, job) in jobs.iter().enumerate() {
        // Either replica answers about any job.
        let client = &mut clients[(i + 1) % 2];
        let j = wait_job(
            client,
            job,
            Duration::from_secs(600),
            "the job to end",
            ended,
        )
        .await;
        assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
        assert_eq!((j.attempt, j.restarts, j.device.as_str()), (1, 0, "cpu"));
        assert_eq!(metric_epochs(dir.path(), job), vec![1, 2], "job {job}");
        workers.insert(j.worker);
    }
    assert_eq!(workers, HashSet::from(IDS.map(String::from)));

    // Each replica classifies with a model the other may have trained (shared data dir).
    for (server, job) in [
        (&a, &jobs[0]),
        (&b, &jobs[1]),
        (&a, &jobs[3]),
        (&b, &jobs[2]),
    ] {
        let answer = server
            .inference()
            .await
            .classify(pb::ClassifyRequest {
                model: job.clone(),
                images: vec![encoded(png(32, 9))],
                top_k: 1,
            })
            .await;
        assert!(answer.is_ok(), "{answer:?}");
    }
}

/// kill -9 of the replica running a `cpu-small` job on cifar10-mini: the other one takes it
/// over when the lease runs out, resumes it from its newest committed checkpoint and ends with
/// the weights of an uninterrupted run. Prints the takeover time (the figure for the README:
/// `TLB_TEST_LEASE_SECONDS=30 cargo test --test replicas killed -- --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_job_is_taken_over_and_ends_with_the_same_weights() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let datasets = shared_data();
    let mut servers = pair(dir.path(), &datasets, &pg.url, &[]).map(Some);
    let request = || start_request("cpu-small", 2, "cifar10-mini");
    let (job, other) = kill_the_owner_mid_job(&mut servers, request()).await;
    let mut client = servers[other].as_ref().unwrap().training().await;
    assert_eq!(metric_epochs(dir.path(), &job), vec![1, 2]);

    // The same job, uninterrupted, on the survivor.
    let reference = start_job(&mut client, request()).await;
    let r = wait_job(
        &mut client,
        &reference,
        Duration::from_secs(900),
        "the end",
        ended,
    )
    .await;
    assert_eq!((state(&r), r.attempt), (pb::JobState::Succeeded, 1));
    let store = Store::connect(Some(&pg.url), &dir.path().join("data"))
        .await
        .unwrap();
    assert_same_weights(&store, &job, &reference).await;
}

/// Starts `request` through the first replica; once the job is past epoch 1, kills its owner
/// (kill -9) and waits until the other replica has taken it over and finished it (SUCCEEDED,
/// one restart). The job, and the index of the replica that finished it.
pub(crate) async fn kill_the_owner_mid_job(
    servers: &mut [Option<Server>; 2],
    request: pb::StartTrainingRequest,
) -> (String, usize) {
    let mut client = servers[0].as_ref().unwrap().training().await;
    let job = start_job(&mut client, request).await;
    // Past its first checkpoint, into epoch 2.
    let j = wait_job(
        &mut client,
        &job,
        Duration::from_secs(900),
        "epoch 1",
        |j| j.epochs_completed >= 1,
    )
    .await;
    assert_eq!(
        j.epochs_completed, 1,
        "the job ended before it could be killed"
    );
    let (owner, other) = owner_and_other(&j);
    tokio::time::sleep(Duration::from_secs(2)).await;
    servers[owner].as_mut().unwrap().signal_and_wait("KILL");
    let killed = Instant::now();
    servers[owner] = None;

    let mut client = servers[other].as_ref().unwrap().training().await;
    let j = wait_takeover(&mut client, &job, Duration::from_secs(120), IDS[other]).await;
    println!(
        "takeover after kill -9 with --lease-seconds {}: {:.1} s",
        lease_seconds(),
        killed.elapsed().as_secs_f64()
    );
    assert_eq!((j.restarts, state(&j)), (1, pb::JobState::Running));
    succeeded(&mut client, &job, Duration::from_secs(900)).await;
    (job, other)
}

/// The final weights of the two jobs are the same, bit for bit.
pub(crate) async fn assert_same_weights(store: &Store, job: &str, reference: &str) {
    let (taken_over, uninterrupted) = (
        final_weights(store, job).await,
        final_weights(store, reference).await,
    );
    assert_eq!(taken_over.len(), uninterrupted.len());
    let differing = taken_over
        .iter()
        .zip(&uninterrupted)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "weights differ from an uninterrupted run's");
}

/// The owner is paused (SIGSTOP) past its lease; the other replica takes the job over; the
/// owner wakes up (SIGCONT) and writes nothing more for it: the store and the checkpoint
/// files show only the new attempt from the takeover on, and the job succeeds once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_writes_nothing_after_the_takeover() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let datasets = synthetic(dir.path(), 1500);
    let servers = pair(dir.path(), &datasets, &pg.url, &[]);
    let epochs = 6;
    let mut client = servers[0].training().await;
    let job = start_job(&mut client, start_request("tiny", epochs, "synth")).await;
    let j = wait_job(
        &mut client,
        &job,
        Duration::from_secs(300),
        "epoch 1",
        |j| j.epochs_completed >= 1,
    )
    .await;
    let (owner, other) = owner_and_other(&j);
    let pid = servers[owner].child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig}");
    };
    signal("-STOP");
    let mut client = servers[other].training().await;
    let new_owner = IDS[other];
    let j = wait_takeover(&mut client, &job, Duration::from_secs(60), new_owner).await;
    let taken_at = SystemTime::now();
    let epochs_at_takeover = j.epochs_completed;
    // The new owner gets ahead, then the old one wakes up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal("-CONT");
    let j = wait_job(
        &mut client,
        &job,
        Duration::from_secs(600),
        "the end",
        ended,
    )
    .await;
    assert_eq!(state(&j), pb::JobState::Succeeded, "{j:?}");
    // Time for the woken owner to misbehave, were it going to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let j = get_job(&mut client, &job).await;
    assert_eq!(
        (j.attempt, j.worker.as_str(), j.epochs_completed),
        (2, new_owner, epochs)
    );
    assert_eq!(
        metric_epochs(dir.path(), &job),
        (1..=epochs as u64).collect::<Vec<_>>()
    );

    // Rows: attempt 1 only for epochs it committed before the takeover.
    let store = Store::connect(Some(&pg.url), &dir.path().join("data"))
        .await
        .unwrap();
    for row in store.list_checkpoints(job.parse().unwrap()).await.unwrap() {
        let name = row.path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.contains(".a2.") || row.epoch <= epochs_at_takeover,
            "a row of the old attempt after the takeover: {name} (epoch {})",
            row.epoch
        );
    }
    // Files: nothing of attempt 1 written after the takeover.
    let ckpts = job_dir(dir.path(), &job).join("checkpoints");
    for entry in std::fs::read_dir(&ckpts).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let modified = entry.metadata().unwrap().modified().unwrap();
        assert!(
            !name.contains(".a1.") || modified < taken_at,
            "{name} was written by the old owner after the takeover"
        );
    }
    // The woken replica serves on, and agrees.
    let mut woken = servers[owner].training().await;
    let seen = get_job(&mut woken, &job).await;
    assert_eq!((seen.attempt, state(&seen)), (2, pb::JobState::Succeeded));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_watch_through_the_replica_that_does_not_run_the_job() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let datasets = synthetic(dir.path(), 1500);
    let servers = pair(dir.path(), &datasets, &pg.url, &[]);
    let mut client = servers[0].training().await;
    let job = start_job(&mut client, start_request("tiny", 50, "synth")).await;
    let j = wait_job(
        &mut client,
        &job,
        Duration::from_secs(120),
        "a worker",
        |j| !j.worker.is_empty(),
    )
    .await;
    let other = &servers[owner_and_other(&j).1];
    let mut watcher = other.training().await;
    let mut stream = watcher
        .watch_job(pb::WatchJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // Steps of a job running elsewhere arrive within about a second.
    let progress = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await.unwrap().unwrap().event {
                Some(Event::Progress(p)) => return p,
                _ => continue,
            }
        }
    })
    .await
    .expect("no progress event through the other replica");
    assert!(progress.global_step >= 1);

    let asked = Instant::now();
    let mut canceller = other.training().await;
    let answer = canceller
        .cancel_job(pb::CancelJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&answer), pb::JobState::Cancelled, "{answer:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "{:?}",
        asked.elapsed()
    );
    // The watch ends with the job's end.
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        let mut last = None;
        while let Some(e) = stream.message().await.unwrap() {
            last = e.event;
        }
        last
    })
    .await
    .expect("the watch did not end");
    assert!(
        matches!(&last, Some(Event::State(j)) if state(j) == pb::JobState::Cancelled),
        "{last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_in_one_process_run_two_jobs_at_once() {
    let dir = tempfile::tempdir().unwrap();
    synthetic(dir.path(), 1500);
    let server = Server::start(dir.path(), &["--device", "cpu", "--device", "cpu"]);
    let mut client = server.training().await;
    let a = start_job(&mut client, start_request("tiny", 50, "synth")).await;
    let b = start_job(&mut client, start_request("tiny", 50, "synth")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let devices = loop {
        let jobs = client
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs;
        let running: Vec<&pb::Job> = jobs
            .iter()
            .filter(|j| state(j) == pb::JobState::Running)
            .collect();
        if running.len() == 2 {
            break running
                .iter()
                .map(|j| j.device.clone())
                .collect::<HashSet<_>>();
        }
        assert!(Instant::now() < deadline, "never both running: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(devices, HashSet::from(["cpu#0".into(), "cpu#1".into()]));
    // Both finish epochs while the other one runs.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let now = (
            get_job(&mut client, &a).await,
            get_job(&mut client, &b).await,
        );
        assert!(!ended(&now.0) && !ended(&now.1), "{now:?}");
        if now.0.epochs_completed >= 1 && now.1.epochs_completed >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "both jobs did not advance");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for job in [&a, &b] {
        let j = client
            .cancel_job(pb::CancelJobRequest {
                job_id: job.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(state(&j), pb::JobState::Cancelled);
    }
}

/// SIGTERM: the owner checkpoints and releases its lease, and the other replica resumes the
/// job at once, not when a (here 30 s) lease would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_the_job_to_the_other_replica_at_once() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let datasets = synthetic(dir.path(), 1500);
    let lease = ["--lease-seconds", "30"];
    let mut servers = pair(dir.path(), &datasets, &pg.url, &lease).map(Some);
    let mut client = servers[0].as_ref().unwrap().training().await;
    let job = start_job(&mut client, start_request("tiny", 50, "synth")).await;
    let j = wait_job(
        &mut client,
        &job,
        Duration::from_secs(120),
        "epoch 1",
        |j| j.epochs_completed >= 1,
    )
    .await;
    let (owner, other) = owner_and_other(&j);
    let stopped = Instant::now();
    let status = servers[owner].as_mut().unwrap().signal_and_wait("TERM");
    assert!(status.success(), "SIGTERM exit: {status}");
    servers[owner] = None;
    let mut client = servers[other].as_ref().unwrap().training().await;
    let j = wait_takeover(&mut client, &job, Duration::from_secs(15), IDS[other]).await;
    println!(
        "hand-over after SIGTERM: {:.1} s",
        stopped.elapsed().as_secs_f64()
    );
    // A clean stop: a restart, not an unclean exit; it resumes where the owner stopped.
    assert_eq!((j.restarts, state(&j)), (1, pb::JobState::Running));
    let resumed = wait_job(&mut client, &job, Duration::from_secs(60), "a step", |j| {
        j.epochs_completed > 0
    })
    .await;
    assert!(resumed.epochs_completed >= j.epochs_completed);
    let j = client
        .cancel_job(pb::CancelJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&j), pb::JobState::Cancelled);
    let epochs = metric_epochs(dir.path(), &job);
    let unique: HashSet<_> = epochs.iter().collect();
    assert_eq!(unique.len(), epochs.len(), "an epoch twice: {epochs:?}");
}

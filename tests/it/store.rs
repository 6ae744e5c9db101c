//! The job store's behaviour, the same on both backends: SQLite (embedded) and a real
//! PostgreSQL server the test starts.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::postgres::Postgres;
use common::server::{encoded, png, start_job, start_request, watch_to_end, Server};
use tlb::engine::train::{EpochMetrics, Preset, Progress};
use tlb::store::{redact, CheckpointRow, Heartbeat, JobRow, JobState, Store, StoreResult};
use uuid::Uuid;

fn job(n: i64) -> JobRow {
    let mut j = JobRow::queued("tiny", Preset::Tiny.config(), "cifar10", "synth");
    j.created_at_ms = 1_000 + n;
    j.created_by = format!("user{n}");
    j
}

fn metrics(epoch: usize, loss: f64) -> EpochMetrics {
    EpochMetrics {
        epoch,
        train_loss: loss,
        train_accuracy: 0.5,
        val_loss: 1.0,
        val_accuracy: 0.25 * epoch as f64,
        lr: 1e-3,
        seconds: 1.0,
        images_per_sec: 10.0,
        data_wait_fraction: 0.0,
        epochs_total: 0,
    }
}

fn checkpoint(job: Uuid, epoch: u32, best: bool, dir: &Path) -> CheckpointRow {
    let path = dir.join(format!("{job}-{epoch}.ckpt"));
    std::fs::write(&path, b"x").unwrap();
    CheckpointRow {
        id: Uuid::new_v4(),
        job_id: job,
        epoch,
        val_accuracy: Some(0.1 * epoch as f64),
        path,
        is_best: best,
        created_at_ms: 5_000 + epoch as i64,
        copy_path: None,
    }
}

fn progress(step: usize) -> Progress {
    Progress {
        epoch: 0,
        step_in_epoch: step,
        steps_per_epoch: 10,
        global_step: step,
        total_steps: 20,
        loss: 1.5,
        accuracy: 0.25,
        lr: 1e-3,
        images_per_sec: 100.0,
        eta_seconds: 3.0,
    }
}

/// Everything the server asks of a store.
async fn conformance(store: Store, files: &Path) {
    let jobs: Vec<JobRow> = (0..5).map(job).collect();
    for j in &jobs {
        store.insert_job(j).await.unwrap();
    }
    let got = store.get_job(jobs[2].id).await.unwrap().unwrap();
    assert_eq!(
        (got.state, got.created_by.as_str(), got.config.clone()),
        (JobState::Queued, "user2", jobs[2].config.clone())
    );
    assert!(store.get_job(Uuid::new_v4()).await.unwrap().is_none());

    // Newest first, in pages, after a cursor.
    let page = store.list_jobs(None, 2, None).await.unwrap();
    assert_eq!(
        page.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![jobs[4].id, jobs[3].id]
    );
    let cursor = Some((page[1].created_at_ms, page[1].id.to_string()));
    let next = store.list_jobs(None, 10, cursor).await.unwrap();
    assert_eq!(
        next.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![jobs[2].id, jobs[1].id, jobs[0].id]
    );

    // Claims: the oldest queued job first, as attempt 1 of the claiming worker, under a
    // lease; a leased job is nobody else's, so the next claim takes the next one.
    let long = 60_000;
    let c0 = store.claim("r1", "cpu", long).await.unwrap().unwrap();
    assert_eq!(
        (c0.fence.job, c0.fence.attempt, c0.resumed()),
        (jobs[0].id, 1, false)
    );
    let j0 = c0.job.unwrap();
    assert_eq!(
        (j0.state, j0.worker.as_str(), j0.device.as_str(), j0.attempt),
        (JobState::Running, "r1", "cpu", 1)
    );
    let c1 = store.claim("r2", "cpu#1", long).await.unwrap().unwrap();
    assert_eq!(c1.fence.job, jobs[1].id);

    // Heartbeats renew the lease and publish the step.
    let step = progress(7);
    let beat = store.heartbeat(c0.fence, Some(long), Some(&step)).await;
    assert_eq!(beat.unwrap(), Heartbeat::Held { cancel: false });
    assert_eq!(
        store.get_job(jobs[0].id).await.unwrap().unwrap().progress,
        Some(step)
    );

    // An expired lease: another worker takes the job over (before any queued job) as the
    // next attempt, counting a restart and an unclean exit (its owner never let go).
    let stale = store.claim("r3", "cpu", 1).await.unwrap().unwrap().fence;
    assert_eq!(stale.job, jobs[2].id);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let taken = store.claim("r4", "cpu", long).await.unwrap().unwrap();
    let fence = taken.fence;
    assert_eq!(
        (fence.job, fence.attempt, taken.resumed()),
        (jobs[2].id, 2, true)
    );
    let j2 = taken.job.unwrap();
    assert_eq!(
        (j2.worker.as_str(), j2.restarts, j2.unclean_exits),
        ("r4", 1, 1)
    );

    // Fencing: the old attempt's writes change nothing and say so.
    let lost = |r: StoreResult<()>| r.unwrap_err().is_lease_lost();
    assert!(lost(store.record_epoch(stale, &metrics(1, 0.5)).await));
    let c = checkpoint(jobs[2].id, 1, true, files);
    assert!(lost(store.record_checkpoint(stale, &c).await));
    assert!(lost(store.commit_resume_point(stale, &c.path).await));
    assert!(lost(store.release(stale).await));
    let end = store.finish(stale, JobState::Failed, "stale", None).await;
    assert!(end.unwrap_err().is_lease_lost());
    assert_eq!(
        store.heartbeat(stale, Some(long), None).await.unwrap(),
        Heartbeat::Lost
    );
    assert!(!store.owns(stale).await.unwrap() && store.owns(fence).await.unwrap());
    let after = store.get_job(jobs[2].id).await.unwrap().unwrap();
    assert_eq!(
        (after.epochs_completed, after.state, after.attempt),
        (0, JobState::Running, 2)
    );
    assert!(after.resume_path.is_none());
    assert!(store.list_checkpoints(jobs[2].id).await.unwrap().is_empty());

    let filtered = store
        .list_jobs(Some(JobState::Running), 10, None)
        .await
        .unwrap();
    assert_eq!(filtered.len(), 3);

    // Metrics, NaN included; checkpoints (the newest is where a resume starts) and the best
    // flag with the best copy.
    store
        .record_epoch(fence, &metrics(1, f64::NAN))
        .await
        .unwrap();
    let m = store.get_job(jobs[2].id).await.unwrap().unwrap();
    assert_eq!(m.epochs_completed, 1);
    assert!(m.latest_metrics.unwrap().train_loss.is_nan());
    // A run's planned epoch count (a time budget's plan) replaces the configured one; a
    // metrics line without one (0, older files) leaves it.
    let configured = m.epochs_total;
    let planned = EpochMetrics {
        epochs_total: configured as usize + 7,
        ..metrics(1, 0.5)
    };
    store.record_epoch(fence, &planned).await.unwrap();
    let m = store.get_job(jobs[2].id).await.unwrap().unwrap();
    assert_eq!(m.epochs_total, configured + 7);
    store.record_epoch(fence, &metrics(1, 0.5)).await.unwrap();
    let m = store.get_job(jobs[2].id).await.unwrap().unwrap();
    assert_eq!(m.epochs_total, configured + 7);
    let c1 = checkpoint(jobs[2].id, 1, true, files);
    let mut c2 = checkpoint(jobs[2].id, 2, true, files);
    c2.copy_path = Some(files.join("best.a2.ckpt"));
    store.record_checkpoint(fence, &c1).await.unwrap();
    store.record_checkpoint(fence, &c2).await.unwrap();
    let listed = store.list_checkpoints(jobs[2].id).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|c| (c.epoch, c.is_best, c.copy_path.clone()))
            .collect::<Vec<_>>(),
        vec![(1, false, None), (2, true, c2.copy_path.clone())]
    );
    let j = store.get_job(jobs[2].id).await.unwrap().unwrap();
    assert_eq!(
        (j.best_checkpoint_id, j.unclean_exits, j.resume_path),
        (Some(c2.id), 0, Some(c2.path.clone()))
    );
    // The job reads with its best checkpoint's accuracy, and its recorded epochs in order.
    assert!(c2.val_accuracy.is_some());
    assert_eq!(j.best_val_accuracy, c2.val_accuracy);
    let listed = store.list_jobs(None, 10, None).await.unwrap();
    let row = listed.iter().find(|r| r.id == jobs[2].id).unwrap();
    assert_eq!(row.best_val_accuracy, c2.val_accuracy);
    let epochs = store.job_epochs(jobs[2].id).await.unwrap();
    assert_eq!(
        epochs.last().map(|e| (e.epoch, e.train_loss)),
        Some((1, 0.5))
    );
    let mid = files.join("last.a2.ckpt");
    store.commit_resume_point(fence, &mid).await.unwrap();
    let j = store.get_job(jobs[2].id).await.unwrap().unwrap();
    assert_eq!(j.resume_path, Some(mid));
    // A pruned epoch file drops its row at the next checkpoint; the best stays.
    std::fs::remove_file(&c1.path).unwrap();
    store
        .record_checkpoint(fence, &checkpoint(jobs[2].id, 3, false, files))
        .await
        .unwrap();
    let epochs: Vec<u32> = store
        .list_checkpoints(jobs[2].id)
        .await
        .unwrap()
        .iter()
        .map(|c| c.epoch)
        .collect();
    assert_eq!(epochs, vec![2, 3]);
    assert_eq!(
        store
            .get_checkpoint(c2.id)
            .await
            .unwrap()
            .unwrap()
            .val_accuracy,
        Some(0.2)
    );
    assert!(store.default_checkpoint().await.unwrap().is_none());

    // A released job (its owner stopped cleanly) is claimed again at once, and its stop was
    // not an unclean exit.
    store.release(fence).await.unwrap();
    let again = store.claim("r5", "cpu", long).await.unwrap().unwrap();
    let fence = again.fence;
    let j = again.job.unwrap();
    assert_eq!((fence.job, fence.attempt), (jobs[2].id, 3));
    assert_eq!((j.restarts, j.unclean_exits, j.run_open), (2, 0, true));

    // Ends: once only; the default model is the newest succeeded job's best.
    assert!(store
        .finish(fence, JobState::Succeeded, "", Some(0.75))
        .await
        .unwrap());
    assert!(!store
        .finish(fence, JobState::Failed, "late", None)
        .await
        .unwrap());
    let done = store.get_job(jobs[2].id).await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.test_accuracy, done.run_open),
        (JobState::Succeeded, Some(0.75), false)
    );
    assert_eq!(store.default_checkpoint().await.unwrap().unwrap().id, c2.id);
    assert_eq!(store.best_checkpoints().await.unwrap().len(), 1);

    // Cancels: a queued job at once; a running one by request, which its owner's next
    // heartbeat reports.
    assert!(store.cancel_queued(jobs[3].id).await.unwrap());
    assert!(!store.cancel_queued(jobs[2].id).await.unwrap());
    store.request_cancel(jobs[0].id).await.unwrap();
    assert_eq!(
        store.heartbeat(c0.fence, None, None).await.unwrap(),
        Heartbeat::Held { cancel: true }
    );

    // A replica started again under its id ends its old leases: its job is claimable now.
    assert_eq!(store.expire_leases("r2", false).await.unwrap(), 1);
    let back = store.claim("r2", "cpu", long).await.unwrap().unwrap();
    assert_eq!((back.fence.job, back.fence.attempt), (jobs[1].id, 2));
    // Nothing else is runnable but the queued job; then nothing.
    assert_eq!(
        store
            .claim("r7", "cpu", long)
            .await
            .unwrap()
            .unwrap()
            .fence
            .job,
        jobs[4].id
    );
    assert!(store.claim("r7", "cpu", long).await.unwrap().is_none());

    let counts = store.count_by_state().await.unwrap();
    let count = |s| counts.iter().find(|(st, _)| *st == s).unwrap().1;
    assert_eq!(
        [
            count(JobState::Queued),
            count(JobState::Running),
            count(JobState::Succeeded),
            count(JobState::Cancelled),
            count(JobState::Failed)
        ],
        [0, 3, 1, 1, 0]
    );
}

/// Claimers racing over one queue: every job claimed exactly once. Returns claims/s.
async fn concurrent_claims(store: Store, jobs: usize, claimers: usize) -> f64 {
    for n in 0..jobs {
        store.insert_job(&job(n as i64)).await.unwrap();
    }
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..claimers)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(c) = store.claim(&format!("w{w}"), "cpu", 60_000).await.unwrap() {
                    mine.push(c.fence.job);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut busy = 0;
    for t in tasks {
        let mine = t.await.unwrap();
        busy += usize::from(!mine.is_empty());
        all.extend(mine);
    }
    let rate = jobs as f64 / started.elapsed().as_secs_f64();
    let claimed = all.len();
    all.sort();
    all.dedup();
    assert_eq!(
        (claimed, all.len()),
        (jobs, jobs),
        "a job was claimed twice or not at all"
    );
    assert!(busy > 1, "only one claimer got jobs");
    rate
}

#[tokio::test]
async fn the_sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    conformance(store, dir.path()).await;
}

#[tokio::test]
async fn the_postgresql_store_conforms() {
    let Some(pg) = Postgres::start() else { return };
    let store = Store::connect(Some(&pg.url), pg.dir()).await.unwrap();
    conformance(store.clone(), pg.dir()).await;
    // Opening again applies no migration twice.
    Store::connect(Some(&pg.url), pg.dir()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sqlite_claimers_never_share_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let rate = concurrent_claims(store, 200, 8).await;
    println!("sqlite: 8 claimers, 200 queued jobs: {rate:.0} claims/s, no job claimed twice");
}

/// Also the figure for the README: `cargo test --test store postgresql_claimers -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_postgresql_claimers_never_share_a_job() {
    let Some(pg) = Postgres::start() else { return };
    let store = Store::connect(Some(&pg.url), pg.dir()).await.unwrap();
    let rate = concurrent_claims(store, 1000, 8).await;
    println!("postgresql: 8 claimers, 1000 queued jobs: {rate:.0} claims/s, no job claimed twice");
}

/// Rows that older versions wrote with absolute paths (of another mount point, say) are made
/// relative to the data dir when the store is opened, and read under this one.
#[tokio::test]
async fn absolute_paths_of_older_rows_become_relative_to_the_data_dir() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let j = job(1);
    store.insert_job(&j).await.unwrap();
    let fence = store
        .claim("a", "cpu", 60_000)
        .await
        .unwrap()
        .unwrap()
        .fence;
    let files = dir
        .path()
        .join("jobs")
        .join(j.id.to_string())
        .join("checkpoints");
    std::fs::create_dir_all(&files).unwrap();
    store
        .record_checkpoint(fence, &checkpoint(j.id, 1, true, &files))
        .await
        .unwrap();
    drop(store);
    let old = format!("/mnt/elsewhere/tlb/jobs/{}/checkpoints/old-1.ckpt", j.id);
    let url = format!("sqlite://{}", dir.path().join("tlb.db").display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("UPDATE checkpoints SET path = $1")
        .bind(&old)
        .execute(&mut db)
        .await
        .unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let (stored,): (String,) = sqlx::query_as("SELECT path FROM checkpoints")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(stored, format!("jobs/{}/checkpoints/old-1.ckpt", j.id));
    let rows = store.list_checkpoints(j.id).await.unwrap();
    assert_eq!(rows[0].path, files.join("old-1.ckpt"));
}

#[test]
fn database_urls_are_shown_without_passwords() {
    assert_eq!(
        redact("postgres://tlb:s3cret@db.example:5432/tlb"),
        "postgres://tlb:***@db.example:5432/tlb"
    );
    assert_eq!(redact("sqlite:///data/tlb.db"), "sqlite:///data/tlb.db");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_postgresql_trains_and_serves() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    common::write_synthetic_cifar(&dir.path().join("datasets/synth"), 300, 50);
    let server = Server::start(dir.path(), &["--database-url", &pg.url]);
    let mut training = server.training().await;
    let job = start_job(&mut training, start_request("tiny", 2, "synth")).await;
    let events = watch_to_end(&mut training, &job, Duration::from_secs(120)).await;
    assert_eq!(
        common::server::final_state(&events),
        tlb::proto::v1::JobState::Succeeded
    );
    let mut inference = server.inference().await;
    let answer = inference
        .classify(tlb::proto::v1::ClassifyRequest {
            model: job.clone(),
            images: vec![encoded(png(32, 4))],
            top_k: 1,
        })
        .await;
    assert!(answer.is_ok(), "{answer:?}");
    // The rows are in PostgreSQL, not in a SQLite file.
    assert!(!dir.path().join("data/tlb.db").exists());
}

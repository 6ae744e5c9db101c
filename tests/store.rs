//! The job store's behaviour, the same on both backends: SQLite (embedded) and a real
//! PostgreSQL server the test starts.

mod common;

use std::path::Path;
use std::time::Duration;

use common::postgres::Postgres;
use common::server::{encoded, png, start_job, start_request, watch_to_end, Server};
use tlb::engine::train::{EpochMetrics, Preset};
use tlb::store::{redact, CheckpointRow, JobRow, JobState, Store};
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

    // The oldest queued job runs first; a running one (to resume) before any queued one.
    assert_eq!(store.next_runnable().await.unwrap().unwrap().id, jobs[0].id);
    assert!(store.mark_running(jobs[3].id, false).await.unwrap());
    assert_eq!(store.next_runnable().await.unwrap().unwrap().id, jobs[3].id);
    assert!(store.mark_running(jobs[3].id, true).await.unwrap());
    let running = store.get_job(jobs[3].id).await.unwrap().unwrap();
    assert_eq!((running.state, running.restarts), (JobState::Running, 1));
    assert!(
        running.run_open && running.unclean_exits == 1,
        "{running:?}"
    );
    let filtered = store
        .list_jobs(Some(JobState::Running), 10, None)
        .await
        .unwrap();
    assert_eq!(filtered.len(), 1);

    // Metrics, NaN included; checkpoints and the best flag.
    store
        .record_epoch(jobs[3].id, &metrics(1, f64::NAN))
        .await
        .unwrap();
    let m = store.get_job(jobs[3].id).await.unwrap().unwrap();
    assert_eq!(m.epochs_completed, 1);
    assert!(m.latest_metrics.unwrap().train_loss.is_nan());
    let c1 = checkpoint(jobs[3].id, 1, true, files);
    let c2 = checkpoint(jobs[3].id, 2, true, files);
    store.record_checkpoint(&c1).await.unwrap();
    store.record_checkpoint(&c2).await.unwrap();
    let listed = store.list_checkpoints(jobs[3].id).await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|c| (c.epoch, c.is_best))
            .collect::<Vec<_>>(),
        vec![(1, false), (2, true)]
    );
    assert_eq!(
        store
            .get_job(jobs[3].id)
            .await
            .unwrap()
            .unwrap()
            .best_checkpoint_id,
        Some(c2.id)
    );
    assert_eq!(
        store
            .get_job(jobs[3].id)
            .await
            .unwrap()
            .unwrap()
            .unclean_exits,
        0
    );
    // A pruned epoch file drops its row at the next checkpoint; the best stays.
    std::fs::remove_file(&c1.path).unwrap();
    store
        .record_checkpoint(&checkpoint(jobs[3].id, 3, false, files))
        .await
        .unwrap();
    let epochs: Vec<u32> = store
        .list_checkpoints(jobs[3].id)
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

    // Ends: once only; the default model is the newest succeeded job's best.
    store.close_run(jobs[3].id).await.unwrap();
    assert!(
        !store.get_job(jobs[3].id).await.unwrap().unwrap().run_open,
        "a clean stop closes the run"
    );
    assert!(store
        .finish(jobs[3].id, JobState::Succeeded, "", Some(0.75))
        .await
        .unwrap());
    assert!(!store
        .finish(jobs[3].id, JobState::Failed, "late", None)
        .await
        .unwrap());
    let done = store.get_job(jobs[3].id).await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.test_accuracy),
        (JobState::Succeeded, Some(0.75))
    );
    assert_eq!(store.default_checkpoint().await.unwrap().unwrap().id, c2.id);
    assert_eq!(store.best_checkpoints().await.unwrap().len(), 1);

    // Cancels: a queued job at once; a running one by request.
    assert!(store.cancel_queued(jobs[0].id).await.unwrap());
    assert!(!store.cancel_queued(jobs[3].id).await.unwrap());
    assert!(store.mark_running(jobs[1].id, false).await.unwrap());
    store.request_cancel(jobs[1].id).await.unwrap();
    assert!(
        store
            .get_job(jobs[1].id)
            .await
            .unwrap()
            .unwrap()
            .cancel_requested
    );
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
        [2, 1, 1, 1, 0]
    );
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

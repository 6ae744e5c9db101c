//! Checkpoints in object storage (a real S3 server, s3s-fs): replicas with no shared disk
//! take over each other's jobs and serve each other's models, and a store that refuses this
//! server or cannot be reached is reported before a job queues.

use std::path::Path;
use std::time::Duration;

use crate::common;
use crate::replicas::{
    assert_same_weights, ended, kill_the_owner_mid_job, replica_command, shared_data, state,
    succeeded, wait_job, IDS,
};
use common::postgres::Postgres;
use common::s3::S3;
use common::server::{encoded, png, start_job, start_request, Server};
use common::write_synthetic_cifar;
use tlb::proto::v1 as pb;
use tlb::store::Store;
use tonic::Code;

const BUCKET: &str = "tlb";

fn store_flags(s3: &S3, prefix: &str) -> Vec<String> {
    vec![
        "--artifact-store".into(),
        format!("s3://{BUCKET}/{prefix}"),
        "--s3-endpoint".into(),
        s3.endpoint(),
    ]
}

/// A replica with a data dir of its own under `root`, on the shared job store and S3.
fn replica(root: &Path, pg: &Postgres, s3: &S3, id: &str) -> Server {
    let datasets = shared_data();
    let flags = store_flags(s3, "runs");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut cmd = replica_command(root, &datasets, &pg.url, id, &flags);
    s3.credentials(&mut cmd);
    Server::spawn(cmd, root)
}

/// The job's checkpoint files in a data dir, by name.
fn checkpoint_files(root: &Path, job: &str) -> Vec<String> {
    let dir = root.join("data/jobs").join(job).join("checkpoints");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".ckpt"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// kill -9 of the replica running a job, where no disk is shared: the other one downloads the
/// committed checkpoint from S3, resumes, and ends with the weights of an uninterrupted run;
/// a third replica with an empty data dir classifies with the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_no_shared_disk_take_over_through_object_storage() {
    let Some(pg) = Postgres::start() else { return };
    let mut s3 = S3::start(BUCKET);
    let roots = [(); 3].map(|_| tempfile::tempdir().unwrap());
    let mut servers = [0, 1].map(|i| Some(replica(roots[i].path(), &pg, &s3, IDS[i])));
    let request = || start_request("cpu-small", 2, "cifar10-mini");
    let (job, other) = kill_the_owner_mid_job(&mut servers, request()).await;
    let owner = 1 - other;
    let mut client = servers[other].as_ref().unwrap().training().await;

    // The killed owner's epoch-1 checkpoint: in S3 (read from the server's disk), and
    // downloaded by the survivor, the same bytes as the owner wrote.
    let first = "epoch-0001.a1.ckpt";
    let key = format!("runs/jobs/{job}/checkpoints/{first}");
    let stored = s3
        .stored(BUCKET, &key)
        .expect("the owner's checkpoint in S3");
    let rel = format!("data/jobs/{job}/checkpoints/{first}");
    assert_eq!(
        std::fs::read(roots[owner].path().join(&rel)).unwrap(),
        stored
    );
    assert_eq!(
        std::fs::read(roots[other].path().join(&rel)).unwrap(),
        stored
    );
    // Everything the survivor wrote is in S3 too, byte for byte.
    assert_all_stored(&s3, roots[other].path(), "runs", &job);
    // The TensorBoard event files of both attempts are in S3, the survivor's as it ended.
    let logs = tlb::engine::tensorboard::event_files(
        &roots[other].path().join(format!("data/jobs/{job}")),
    );
    assert_eq!(logs.len(), 1, "{logs:?}");
    let name = logs[0].file_name().unwrap().to_string_lossy().into_owned();
    let key = format!("runs/jobs/{job}/{name}");
    assert_eq!(
        s3.stored(BUCKET, &key),
        std::fs::read(&logs[0]).ok(),
        "{key}"
    );
    let stored = s3.event_files(BUCKET, &format!("runs/jobs/{job}"));
    assert_eq!(stored.len(), 2, "one per attempt: {stored:?}");
    assert!(
        stored.iter().any(|n| n.ends_with(".attempt-1")),
        "{stored:?}"
    );

    // The same job, uninterrupted, on the survivor: the same weights, bit for bit.
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
    let store = Store::connect(Some(&pg.url), &roots[other].path().join("data"))
        .await
        .unwrap();
    assert_same_weights(&store, &job, &reference).await;

    // A new replica with an empty data dir serves both models, fetched from S3. While S3 is
    // down it serves the one it has fetched and answers UNAVAILABLE for the other, until S3
    // is back.
    let fresh = replica(roots[2].path(), &pg, &s3, "c");
    let classify = |model: &String| {
        let (fresh, model) = (&fresh, model.clone());
        async move {
            fresh
                .inference()
                .await
                .classify(pb::ClassifyRequest {
                    model,
                    images: vec![encoded(png(32, 9))],
                    top_k: 1,
                })
                .await
        }
    };
    let answer = classify(&job).await;
    assert!(answer.is_ok(), "{answer:?}");
    s3.stop();
    let answer = classify(&job).await;
    assert!(
        answer.is_ok(),
        "a fetched model is served while S3 is down: {answer:?}"
    );
    let down = classify(&reference).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    s3.restart();
    let answer = classify(&reference).await;
    assert!(answer.is_ok(), "{answer:?}");
    assert!(!checkpoint_files(roots[2].path(), &job).is_empty());
    // Its class names and output shapes come from the shared store, not a run dir it lacks.
    let models = fresh.models().await;
    assert_eq!(models.len(), 2, "{models:?}");
    assert!(models.iter().all(|m| m.labels.len() == 10), "{models:?}");
    let mut oip =
        tlb::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient::new(
            fresh.channel().await,
        );
    let meta = oip
        .model_metadata(tlb::proto::inference::ModelMetadataRequest {
            name: job.clone(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.outputs[0].shape, vec![-1, 10], "{meta:?}");
}

/// A server on the embedded store with `flags`, the S3 credentials in its environment.
fn server(root: &Path, s3: &S3, flags: &[String], secret: Option<&str>) -> Server {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut cmd = Server::command(root, &flags);
    s3.credentials(&mut cmd);
    if let Some(secret) = secret {
        cmd.env("AWS_SECRET_ACCESS_KEY", secret);
    }
    Server::spawn(cmd, root)
}

async fn start_status(server: &Server) -> Result<String, (Code, String)> {
    let mut client = server.training().await;
    client
        .start_training(start_request("tiny", 1, "synth"))
        .await
        .map(|r| r.into_inner().job_id)
        .map_err(|s| (s.code(), s.message().to_string()))
}

/// Wrong credentials and a missing bucket are FAILED_PRECONDITION at StartTraining, a store
/// that is down UNAVAILABLE, before anything queues; once it is back, jobs train into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_refuses_or_is_down_is_reported_before_a_job_queues() {
    let mut s3 = S3::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_cifar(&dir.path().join("datasets/synth"), 200, 50);

    let wrong_key = server(
        dir.path(),
        &s3,
        &store_flags(&s3, "p"),
        Some("not-the-secret-key"),
    );
    let (code, message) = start_status(&wrong_key).await.unwrap_err();
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(
        message.contains(&format!("s3://{BUCKET}/p refuses this server")),
        "{message}"
    );
    assert!(!message.contains(common::s3::SECRET_KEY) && !message.contains("not-the-secret"));
    drop(wrong_key);

    let mut flags = store_flags(&s3, "p");
    flags[1] = "s3://no-such-bucket/p".into();
    let no_bucket = server(dir.path(), &s3, &flags, None);
    let (code, message) = start_status(&no_bucket).await.unwrap_err();
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("no such bucket"), "{message}");
    drop(no_bucket);

    let server = server(dir.path(), &s3, &store_flags(&s3, "p"), None);
    s3.stop();
    let (code, message) = start_status(&server).await.unwrap_err();
    assert_eq!(code, Code::Unavailable, "{message}");
    // Nothing was queued by the refusals.
    let listed = server
        .training()
        .await
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.jobs.is_empty(), "{listed:?}");

    s3.restart();
    let job = start_status(&server).await.expect("the store is back");
    let mut client = server.training().await;
    succeeded(&mut client, &job, Duration::from_secs(300)).await;
    assert_all_stored(&s3, dir.path(), "p", &job);

    // The S3 server stops while a job trains: its checkpoints wait (the job does not end on
    // partial data), and once the server is back the job goes on and ends with all of them
    // stored.
    let mut request = start_request("tiny", 6, "synth");
    request.config.as_mut().unwrap().batch_size = Some(50);
    let job = client
        .start_training(request)
        .await
        .unwrap()
        .into_inner()
        .job_id;
    s3.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let j = crate::common::server::get_job(&mut client, &job).await;
    assert_eq!(state(&j), pb::JobState::Running, "{j:?}");
    assert!(j.epochs_completed < 6, "{j:?}");
    s3.restart();
    let j = wait_job(
        &mut client,
        &job,
        Duration::from_secs(300),
        "the end",
        ended,
    )
    .await;
    assert_eq!(
        (state(&j), j.epochs_completed),
        (pb::JobState::Succeeded, 6),
        "{j:?}"
    );
    assert_all_stored(&s3, dir.path(), "p", &job);
    // The store was pruned like the disk: the newest `keep_last` epochs and the best copy.
    let stored = s3.names(BUCKET, &format!("p/jobs/{job}/checkpoints"));
    assert_eq!(stored, checkpoint_files(dir.path(), &job));
    assert!(stored.len() <= 3, "{stored:?}");
}

/// Every checkpoint file of `job` in the data dir under `root` is in S3 under `prefix`, the
/// same bytes (read from the S3 server's disk).
fn assert_all_stored(s3: &S3, root: &Path, prefix: &str, job: &str) {
    let names = checkpoint_files(root, job);
    assert!(!names.is_empty());
    for name in names {
        let key = format!("{prefix}/jobs/{job}/checkpoints/{name}");
        let local = std::fs::read(root.join(format!("data/jobs/{job}/checkpoints/{name}")));
        assert_eq!(s3.stored(BUCKET, &key), local.ok(), "{name}");
    }
}

/// A dataset uploaded to one replica trains on another that shares no disk with it: its
/// archive goes to S3 and is checked and extracted on the replica that starts the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataset_uploaded_to_one_replica_trains_on_another() {
    use crate::datasets::{header, images, messages, tar_gz, upload};
    let Some(pg) = Postgres::start() else { return };
    let s3 = S3::start(BUCKET);
    let roots = [(); 2].map(|_| tempfile::tempdir().unwrap());
    let a = replica(roots[0].path(), &pg, &s3, IDS[0]);
    let b = replica(roots[1].path(), &pg, &s3, IDS[1]);
    let bytes = tar_gz(&images(2, 10));
    let info = upload(&a, messages(header("shared", &bytes), &bytes))
        .await
        .unwrap();
    let key = format!("runs/uploads/{}.archive", info.sha256);
    assert_eq!(s3.stored(BUCKET, &key).as_deref(), Some(&bytes[..]));
    let tree = |i: usize| roots[i].path().join("data/uploads").join(&info.sha256);
    assert!(tree(0).is_dir() && !tree(1).exists());

    let mut client = b.training().await;
    let mut request = start_request("tiny", 1, "");
    request.dataset = Some(pb::Dataset {
        id: "shared".into(),
        ..Default::default()
    });
    let job = start_job(&mut client, request).await;
    assert!(tree(1).is_dir(), "fetched from S3 and extracted by b");
    succeeded(&mut client, &job, Duration::from_secs(300)).await;
}

/// Datasets named by `s3://` URIs train: a prefix holding an image folder's files and one
/// archive, read with the server's S3 settings and fetched once per content; a missing key
/// is NOT_FOUND, a URI that is not `s3://` INVALID_ARGUMENT, before anything queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_named_by_s3_uris_train() {
    use crate::datasets::{images, tar_gz};
    let s3 = S3::start("data");
    let bucket = s3.root.path().join("data");
    for (path, bytes) in images(2, 8) {
        let file = bucket.join("pets").join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, bytes).unwrap();
    }
    std::fs::write(bucket.join("pets.tar.gz"), tar_gz(&images(2, 8))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = server(
        dir.path(),
        &s3,
        &["--s3-endpoint".into(), s3.endpoint()],
        None,
    );
    let mut client = server.training().await;
    let request = |uri: &str| {
        let mut r = start_request("tiny", 1, "");
        r.dataset = Some(pb::Dataset {
            uri: uri.into(),
            ..Default::default()
        });
        r
    };
    for uri in [
        "s3://data/pets/",
        "s3://data/pets.tar.gz",
        "s3://data/pets/",
    ] {
        let job = start_job(&mut client, request(uri)).await;
        let j = succeeded(&mut client, &job, Duration::from_secs(300)).await;
        assert_eq!(j.dataset.unwrap().uri, uri);
    }
    let cache = dir.path().join("data/cache/datasets");
    assert_eq!(trees(&cache).len(), 2, "one tree per content, fetched once");
    assert!(!dir.path().join("data/uploads").exists());
    for (uri, code, expected) in [
        ("s3://data/missing.tar.gz", Code::NotFound, "does not exist"),
        ("s3://data/nothing/", Code::NotFound, "no objects under"),
        (
            "http://data/pets/",
            Code::InvalidArgument,
            "is not an s3:// URI",
        ),
        ("s3://data/../x/", Code::InvalidArgument, "'..'"),
    ] {
        let refused = client.start_training(request(uri)).await.unwrap_err();
        assert_eq!(refused.code(), code, "{uri}: {refused:?}");
        assert!(refused.message().contains(expected), "{uri}: {refused:?}");
    }
}

/// The fetched trees in a cache dir, by id.
fn trees(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// Fetched datasets are a cache in `--cache-dir` bounded by `--dataset-cache-bytes`: past it
/// the least recently used tree goes, and a job that names it again fetches it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_datasets_are_a_bounded_cache() {
    use crate::datasets::{images, tar_gz};
    let s3 = S3::start("data");
    let bucket = s3.root.path().join("data");
    let files = images(2, 8);
    for (path, bytes) in &files {
        let file = bucket.join("pets").join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, bytes).unwrap();
    }
    std::fs::write(bucket.join("pets.tar.gz"), tar_gz(&files)).unwrap();
    // Room for one tree and a half.
    let tree_bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
    let (dir, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let flags = [
        "--s3-endpoint".to_string(),
        s3.endpoint(),
        "--cache-dir".into(),
        cache.path().display().to_string(),
        "--dataset-cache-bytes".into(),
        (tree_bytes * 3 / 2).to_string(),
        "--upload-ttl".into(),
        "10".into(),
    ];
    let server = server(dir.path(), &s3, &flags, None);
    let mut client = server.training().await;
    let datasets = cache.path().join("datasets");
    let mut seen = Vec::new();
    for uri in [
        "s3://data/pets/",
        "s3://data/pets.tar.gz",
        "s3://data/pets/",
    ] {
        let mut request = start_request("tiny", 1, "");
        request.dataset = Some(pb::Dataset {
            uri: uri.into(),
            ..Default::default()
        });
        let job = start_job(&mut client, request).await;
        succeeded(&mut client, &job, Duration::from_secs(300)).await;
        // The sweeper (every second here) leaves one tree: the one just used.
        let mut left = trees(&datasets);
        for _ in 0..50 {
            if left.len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            left = trees(&datasets);
        }
        assert_eq!(left.len(), 1, "{uri}: {left:?}");
        seen.push(left[0].clone());
    }
    // The prefix's tree went when the archive's came, and was fetched again after it.
    assert_ne!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);
    assert!(
        !dir.path().join("data/cache").exists(),
        "--cache-dir is used"
    );
}

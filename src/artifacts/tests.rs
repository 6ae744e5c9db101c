//! The artifact store's rules, on the data dir alone and on object_store's in-memory store
//! (the integration tests run a real S3 server).

use std::path::PathBuf;
use std::sync::Arc;

use object_store::memory::InMemory;
use object_store::ObjectStore;

use super::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn without_a_store_the_data_dir_is_all_there_is() {
    let dir = tempfile::tempdir().unwrap();
    let a = Artifacts::local(dir.path());
    assert!(!a.is_remote());
    assert_eq!(a.describe(), format!("file://{}", dir.path().display()));
    let file = dir.path().join("jobs/x/checkpoints/epoch-0001.a1.ckpt");
    let rt = runtime();
    rt.block_on(a.check()).unwrap();
    // Publishing copies nothing; a file that is not there cannot be fetched.
    rt.block_on(a.publish(&file)).unwrap();
    assert!(!rt.block_on(a.fetch(&file)).unwrap());
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, b"weights").unwrap();
    assert!(rt.block_on(a.fetch(&file)).unwrap());
}

#[test]
fn a_file_published_by_one_replica_is_fetched_by_another_under_the_same_key() {
    let memory: Arc<InMemory> = Arc::new(InMemory::new());
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Artifacts::with_store(a_dir.path(), memory.clone(), "runs", u64::MAX);
    let b = Artifacts::with_store(b_dir.path(), memory.clone(), "runs", u64::MAX);
    let rel = "jobs/j1/checkpoints/epoch-0001.a1.ckpt";
    let rt = runtime();
    std::fs::create_dir_all(a_dir.path().join("jobs/j1/checkpoints")).unwrap();
    std::fs::write(a_dir.path().join(rel), b"epoch one").unwrap();
    rt.block_on(a.publish(&a_dir.path().join(rel))).unwrap();
    // Stored under the prefix and the path relative to the data dir.
    let stored = rt
        .block_on(memory.get(&Key::from(format!("runs/{rel}").as_str())))
        .unwrap();
    assert_eq!(&rt.block_on(stored.bytes()).unwrap()[..], b"epoch one");
    // The other replica has no such file, and downloads it into its own data dir.
    let theirs = b_dir.path().join(rel);
    assert!(rt.block_on(b.fetch(&theirs)).unwrap());
    assert_eq!(std::fs::read(&theirs).unwrap(), b"epoch one");
    // Nothing left behind by the download but the file.
    let names: Vec<_> = std::fs::read_dir(theirs.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("epoch-0001.a1.ckpt")]);
    // What neither holds is absent, not an error.
    let missing = b_dir.path().join("jobs/j1/checkpoints/epoch-0002.a1.ckpt");
    assert!(!rt.block_on(b.fetch(&missing)).unwrap());
    // A path outside the data dir has no key.
    let outside = rt.block_on(b.fetch(Path::new("/etc/passwd-not-here")));
    assert!(
        matches!(outside, Err(ArtifactError::Local(_))),
        "{outside:?}"
    );
}

#[test]
fn store_urls_are_checked_before_anything_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let open = |url: &str| {
        let args = ArtifactArgs {
            artifact_store: Some(url.into()),
            s3_endpoint: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        };
        Artifacts::open(&args, dir.path()).map(|a| a.describe())
    };
    assert_eq!(
        open("s3://bucket/some/prefix/").unwrap(),
        "s3://bucket/some/prefix"
    );
    let data_dir_url = format!("file://{}", dir.path().display());
    assert_eq!(open(&data_dir_url).unwrap(), data_dir_url);
    for (url, says) in [
        ("s3:///prefix", "the bucket name is missing"),
        ("gs://bucket", "expected s3://BUCKET/PREFIX"),
        ("file:///elsewhere", "a file:// store is the data dir"),
    ] {
        let e = format!("{:#}", open(url).unwrap_err());
        assert!(e.contains(says), "{url}: {e}");
    }
    let unset = Artifacts::open(&ArtifactArgs::default(), dir.path()).unwrap();
    assert!(!unset.is_remote());
}

#[test]
fn an_unreachable_store_is_unavailable_and_names_itself_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let args = ArtifactArgs {
        // Nothing listens on the discard port.
        s3_endpoint: Some("http://127.0.0.1:9".into()),
        ..Default::default()
    };
    let credentials = object_store::aws::AmazonS3Builder::new()
        .with_access_key_id("test-access-key")
        .with_secret_access_key("test-secret-key");
    let (store, prefix) = config::s3_from(credentials, &args, "s3://bucket/p").unwrap();
    let a = Artifacts::with_store(dir.path(), store, prefix.as_ref(), u64::MAX);
    let e = runtime().block_on(a.check()).unwrap_err();
    assert!(matches!(e, ArtifactError::Unavailable { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("the artifact store test://p is unavailable"),
        "{e}"
    );
    assert!(!format!("{e:?}").contains("test-secret-key"), "{e:?}");
}

/// A checkpoint file of 100 bytes, `name`, in job `job`'s run directory under `root`.
fn checkpoint(root: &Path, job: &str, name: &str) -> PathBuf {
    let dir = root.join("jobs").join(job).join("checkpoints");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(name);
    std::fs::write(&file, [name.len() as u8; 100]).unwrap();
    file
}

#[test]
fn the_data_dir_keeps_the_most_recently_used_copies_within_the_cache_bound() {
    let memory: Arc<InMemory> = Arc::new(InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    // On disk before the server started, and not in the store: never removed.
    let unknown = checkpoint(dir.path(), "old", "epoch-0001.a1.ckpt");
    let a = Artifacts::with_store(dir.path(), memory.clone(), "p", 250);
    let rt = runtime();
    let files: Vec<PathBuf> = ["e1.ckpt", "e2.ckpt", "e3.ckpt"]
        .iter()
        .map(|n| checkpoint(dir.path(), "j", n))
        .collect();
    for f in &files {
        rt.block_on(a.publish(f)).unwrap();
    }
    // 400 bytes on disk, 250 allowed: the least recently used stored copies went (the first
    // two: the unknown one stays, the newest is the one just written).
    assert!(unknown.exists());
    assert_eq!(
        files.iter().map(|f| f.exists()).collect::<Vec<_>>(),
        [false, false, true]
    );
    // Fetched again when needed, which pushes out the next least recently used.
    assert!(rt.block_on(a.fetch(&files[0])).unwrap());
    assert_eq!(std::fs::read(&files[0]).unwrap(), [7u8; 100]);
    assert_eq!(
        files.iter().map(|f| f.exists()).collect::<Vec<_>>(),
        [true, false, false]
    );
    // Once the store holds the unknown copy (same size), it may go too.
    rt.block_on(a.publish(&unknown)).unwrap();
    rt.block_on(a.fetch(&files[1])).unwrap();
    assert!(!files[0].exists() || !unknown.exists());

    // A held run directory (a job training here) keeps everything.
    let held = a.hold(&dir.path().join("jobs/h")).unwrap();
    let busy: Vec<PathBuf> = ["b1.ckpt", "b2.ckpt", "b3.ckpt"]
        .iter()
        .map(|n| checkpoint(dir.path(), "h", n))
        .collect();
    for f in &busy {
        rt.block_on(a.publish(f)).unwrap();
    }
    assert!(busy.iter().all(|f| f.exists()));
    drop(held);
    rt.block_on(a.fetch(&files[2])).unwrap();
    assert!(busy.iter().filter(|f| f.exists()).count() < 3);
}

#[test]
fn a_stored_checkpoint_is_never_replaced_but_best_and_last_copies_are() {
    let memory: Arc<InMemory> = Arc::new(InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    let a = Artifacts::with_store(dir.path(), memory.clone(), "p", u64::MAX);
    let rt = runtime();
    let stored = |name: &str| {
        let key = Key::from(format!("p/jobs/j/checkpoints/{name}").as_str());
        rt.block_on(async { memory.get(&key).await.unwrap().bytes().await.unwrap() })
    };
    let epoch = checkpoint(dir.path(), "j", "epoch-0001.a1.ckpt");
    rt.block_on(a.publish(&epoch)).unwrap();
    // A retry of the same bytes (an earlier try that landed) succeeds.
    rt.block_on(a.publish(&epoch)).unwrap();
    // Other bytes under a stored epoch's key are refused, and the stored ones stay.
    std::fs::write(&epoch, b"other weights").unwrap();
    let e = rt.block_on(a.publish(&epoch)).unwrap_err().to_string();
    assert!(e.contains("already holds other bytes"), "{e}");
    assert_eq!(&stored("epoch-0001.a1.ckpt")[..], &[18u8; 100]);
    // A run's best copy is rewritten when a better epoch comes.
    let best = checkpoint(dir.path(), "j", "best.a1.ckpt");
    rt.block_on(a.publish(&best)).unwrap();
    std::fs::write(&best, b"a better epoch").unwrap();
    rt.block_on(a.publish(&best)).unwrap();
    assert_eq!(&stored("best.a1.ckpt")[..], b"a better epoch");
}

#[test]
fn what_a_run_prunes_is_listed_and_deleted_in_the_store() {
    let memory: Arc<InMemory> = Arc::new(InMemory::new());
    let dir = tempfile::tempdir().unwrap();
    let a = Artifacts::with_store(dir.path(), memory.clone(), "p", u64::MAX);
    let rt = runtime();
    let names = ["epoch-0001.a1.ckpt", "epoch-0002.a1.ckpt", "best.a1.ckpt"];
    let files: Vec<PathBuf> = names
        .iter()
        .map(|n| checkpoint(dir.path(), "j", n))
        .collect();
    for f in &files {
        rt.block_on(a.publish(f)).unwrap();
    }
    // Another job's objects share the prefix but not the folder.
    rt.block_on(a.publish(&checkpoint(dir.path(), "k", "epoch-0001.a1.ckpt")))
        .unwrap();
    let folder = files[0].parent().unwrap();
    let mut listed = rt.block_on(a.list(folder)).unwrap();
    listed.sort();
    assert_eq!(
        listed,
        ["best.a1.ckpt", "epoch-0001.a1.ckpt", "epoch-0002.a1.ckpt"]
    );
    // Deleted in the store (a missing one is no error); the local files are the caller's.
    let gone = [files[0].clone(), folder.join("epoch-0009.a1.ckpt")];
    rt.block_on(a.delete(&gone)).unwrap();
    let mut listed = rt.block_on(a.list(folder)).unwrap();
    listed.sort();
    assert_eq!(listed, ["best.a1.ckpt", "epoch-0002.a1.ckpt"]);
    assert!(files[0].exists());
}

//! Your own data: a folder uploaded with `tlb train --dataset ./dir` trains and serves;
//! uploads resume, are stored once per content, and bad archives and bad streams are refused
//! with a precise status, leaving nothing behind.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tlb::proto::v1 as pb;
use tlb::proto::v1::dataset_service_client::DatasetServiceClient;
use tlb::proto::v1::upload_dataset_request::Part;
use tonic::transport::Channel;
use tonic::Code;

use crate::common;
use common::server::{encoded, png, Server};

/// An image folder: `classes` sub-folders of `per_class` PNGs, a text file and a broken PNG.
fn image_folder(dir: &Path, classes: usize, per_class: usize) {
    for c in 0..classes {
        let class = dir.join(format!("kind-{c}"));
        std::fs::create_dir_all(&class).unwrap();
        for i in 0..per_class {
            std::fs::write(
                class.join(format!("{i:03}.png")),
                png(32, (c * 50 + i) as u8),
            )
            .unwrap();
        }
    }
    std::fs::write(dir.join("kind-0/notes.txt"), "not an image").unwrap();
    std::fs::write(dir.join("kind-1/broken.png"), b"\x89PNG nothing else").unwrap();
}

/// A `.tar.gz` of `(path, bytes)` files (paths as written: relative, no `..`).
pub(crate) fn tar_gz(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (path, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, path, bytes.as_slice()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// Image-folder files for [`tar_gz`]: `classes` classes of `per_class` PNGs.
pub(crate) fn images(classes: usize, per_class: usize) -> Vec<(String, Vec<u8>)> {
    (0..classes)
        .flat_map(|c| {
            (0..per_class).map(move |i| (format!("data/c{c}/{i}.png"), png(32, (c * 9 + i) as u8)))
        })
        .collect()
}

/// A deflated `.zip` of `(path, bytes)` files, then a symlink `(name, target)` if given.
fn zip_of(files: &[(String, Vec<u8>)], symlink: Option<(&str, &str)>) -> Vec<u8> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (path, bytes) in files {
        zip.start_file(path.as_str(), options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    if let Some((name, target)) = symlink {
        zip.add_symlink(name, target, options).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// A tar with one entry whose raw name and type are written as given (what no well-behaved
/// archiver produces), after a valid image folder.
fn evil_tar(name: &[u8], kind: tar::EntryType, link: &[u8]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (path, bytes) in images(2, 2) {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, path, bytes.as_slice()).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
    h.as_gnu_mut().unwrap().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    let data: &[u8] = if kind.is_file() { b"owned" } else { b"" };
    h.set_size(data.len() as u64);
    h.set_cksum();
    tar.append(&h, data).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn header(name: &str, bytes: &[u8]) -> pb::UploadHeader {
    pb::UploadHeader {
        name: name.into(),
        format: "image-folder".into(),
        total_bytes: bytes.len() as u64,
        sha256: sha256(bytes),
        offset: 0,
    }
}

pub(crate) fn messages(h: pb::UploadHeader, bytes: &[u8]) -> Vec<pb::UploadDatasetRequest> {
    let mut out = vec![pb::UploadDatasetRequest {
        part: Some(Part::Header(h)),
    }];
    out.extend(bytes.chunks(16 << 10).map(|c| pb::UploadDatasetRequest {
        part: Some(Part::Chunk(c.to_vec())),
    }));
    out
}

async fn client(server: &Server) -> DatasetServiceClient<Channel> {
    DatasetServiceClient::new(server.channel().await)
}

pub(crate) async fn upload(
    server: &Server,
    m: Vec<pb::UploadDatasetRequest>,
) -> Result<pb::DatasetInfo, (Code, String)> {
    client(server)
        .await
        .upload_dataset(tokio_stream::iter(m))
        .await
        .map(|r| r.into_inner())
        .map_err(|s| (s.code(), s.message().to_string()))
}

/// What the uploads folder holds besides stored trees: nothing once uploads have ended.
fn leftovers(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("data/uploads"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.') || n.ends_with(".part"))
                .collect()
        })
        .unwrap_or_default()
}

/// `tlb train --dataset ./folder` uploads the folder (its non-images skipped and reported),
/// trains on it and serves a model whose labels are the folder's classes; the same folder
/// again is the same dataset, stored once, and the tree goes with its last name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_folder_trains_with_one_command() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("pets");
    image_folder(&folder, 3, 12);
    let server = Server::start(dir.path(), &[]);
    let tlb = env!("CARGO_BIN_EXE_tlb");
    let train = || {
        Command::new(tlb)
            .args([
                "train",
                "--server",
                &server.addr,
                "--preset",
                "tiny",
                "--epochs",
                "1",
            ])
            .arg("--dataset")
            .arg(&folder)
            .output()
            .unwrap()
    };
    let out = train();
    assert!(out.status.success(), "{out:?}");
    let job = String::from_utf8(out.stdout).unwrap().trim().to_string();

    let info = client(&server)
        .await
        .get_dataset(pb::GetDatasetRequest {
            name: "pets".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let classes: Vec<(String, u64)> = info
        .classes
        .iter()
        .map(|c| (c.name.clone(), c.images))
        .collect();
    assert_eq!(
        classes,
        [("kind-0", 12), ("kind-1", 12), ("kind-2", 12)].map(|(n, i)| (n.to_string(), i))
    );
    assert_eq!((info.images, info.skipped_count), (36, 2), "{info:?}");
    let reasons: Vec<(String, String)> = info
        .skipped
        .iter()
        .map(|s| (s.path.clone(), s.reason.clone()))
        .collect();
    assert!(
        reasons
            .iter()
            .any(|(p, r)| p == "kind-0/notes.txt" && r.contains("not a .png")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(p, r)| p == "kind-1/broken.png" && r.contains("not a decodable image")),
        "{reasons:?}"
    );

    let mut training = server.training().await;
    let events = common::server::watch_to_end(&mut training, &job, Duration::from_secs(300)).await;
    assert_eq!(
        common::server::final_state(&events),
        pb::JobState::Succeeded
    );
    let answer = server
        .inference()
        .await
        .classify(pb::ClassifyRequest {
            model: job.clone(),
            images: vec![encoded(png(32, 3))],
            top_k: 3,
        })
        .await
        .unwrap()
        .into_inner();
    let mut labels: Vec<String> = answer.results[0]
        .predictions
        .iter()
        .map(|p| p.label.clone())
        .collect();
    labels.sort();
    assert_eq!(labels, ["kind-0", "kind-1", "kind-2"]);

    // Again: the same dataset (nothing sent twice), and a job on it.
    let again = train();
    assert!(again.status.success(), "{again:?}");
    let mut c = client(&server).await;
    let listed = c
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .unwrap()
        .into_inner()
        .datasets;
    assert_eq!(listed.len(), 1, "{listed:?}");
    // The same bytes under a second name: stored once; the tree goes with the last name.
    let state = c
        .get_upload(pb::GetUploadRequest {
            sha256: info.sha256.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(state.stored);
    let second = pb::UploadHeader {
        name: "pets-2".into(),
        format: "image-folder".into(),
        total_bytes: info.archive_bytes,
        sha256: info.sha256.clone(),
        offset: info.archive_bytes,
    };
    let copy = upload(&server, messages(second, &[])).await.unwrap();
    assert_eq!(
        (copy.sha256.as_str(), copy.images),
        (info.sha256.as_str(), 36)
    );
    let tree = dir.path().join("data/uploads").join(&info.sha256);
    let events = common::server::watch_to_end(
        &mut training,
        String::from_utf8(again.stdout).unwrap().trim(),
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(
        common::server::final_state(&events),
        pb::JobState::Succeeded
    );
    c.delete_dataset(pb::DeleteDatasetRequest {
        name: "pets".into(),
    })
    .await
    .unwrap();
    assert!(tree.is_dir(), "pets-2 still uses it");
    c.delete_dataset(pb::DeleteDatasetRequest {
        name: "pets-2".into(),
    })
    .await
    .unwrap();
    assert!(!tree.exists());
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

/// An upload cut short continues from what the server holds; a second upload of the same
/// name waits for none; a dataset a job is training on cannot be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_resume_and_one_in_use_is_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let bytes = tar_gz(&images(2, 20));
    let half = bytes.len() / 2;

    // The first half, then the stream ends: kept, and said how to continue.
    let (code, message) = upload(&server, messages(header("resumed", &bytes), &bytes[..half]))
        .await
        .unwrap_err();
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(
        message.contains(&format!("continue with offset {half}")),
        "{message}"
    );
    let mut c = client(&server).await;
    let state = c
        .get_upload(pb::GetUploadRequest {
            sha256: sha256(&bytes),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((state.committed_bytes, state.stored), (half as u64, false));
    // Past what the server holds: refused, naming the offset to use.
    let mut beyond = header("resumed", &bytes);
    beyond.offset = half as u64 + 10;
    let (code, message) = upload(&server, messages(beyond, &bytes[half + 10..]))
        .await
        .unwrap_err();
    assert_eq!(code, Code::InvalidArgument, "{message}");
    assert!(
        message.contains(&format!("continue from {half}")),
        "{message}"
    );
    // While one upload of the name is open, another is refused.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut open = header("resumed", &bytes);
    open.offset = half as u64;
    tx.send(pb::UploadDatasetRequest {
        part: Some(Part::Header(open)),
    })
    .await
    .unwrap();
    tx.send(pb::UploadDatasetRequest {
        part: Some(Part::Chunk(bytes[half..half + 100].to_vec())),
    })
    .await
    .unwrap();
    let mut first = client(&server).await;
    let pending = tokio::spawn(async move {
        first
            .upload_dataset(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, message) = upload(&server, messages(header("resumed", &bytes), &bytes))
        .await
        .unwrap_err();
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("in progress"), "{message}");
    // The open one finishes: the dataset exists, whole.
    for chunk in bytes[half + 100..].chunks(16 << 10) {
        tx.send(pb::UploadDatasetRequest {
            part: Some(Part::Chunk(chunk.to_vec())),
        })
        .await
        .unwrap();
    }
    drop(tx);
    let info = pending.await.unwrap().unwrap().into_inner();
    assert_eq!(
        (info.name.as_str(), info.images, info.classes.len()),
        ("resumed", 40, 2)
    );

    // In use by a job: not deleted; once the job is cancelled, deleted.
    let mut training = server.training().await;
    let job = training
        .start_training(pb::StartTrainingRequest {
            preset: "tiny".into(),
            config: Some(pb::TrainingConfig {
                epochs: Some(500),
                ..Default::default()
            }),
            dataset: Some(pb::Dataset {
                id: "resumed".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let refused = c
        .delete_dataset(pb::DeleteDatasetRequest {
            name: "resumed".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(&job), "{refused:?}");
    training
        .cancel_job(pb::CancelJobRequest {
            job_id: job.clone(),
        })
        .await
        .unwrap();
    let events = common::server::watch_to_end(&mut training, &job, Duration::from_secs(120)).await;
    assert_eq!(
        common::server::final_state(&events),
        pb::JobState::Cancelled
    );
    c.delete_dataset(pb::DeleteDatasetRequest {
        name: "resumed".into(),
    })
    .await
    .unwrap();
    let gone = c
        .get_dataset(pb::GetDatasetRequest {
            name: "resumed".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

/// Every bad archive and bad stream: its status, a message naming the cause, nothing stored
/// (no dataset, no temp folder, no file outside the upload's folder), and the server serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_are_refused_precisely_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--max-dataset-bytes",
            "400000",
            "--max-dataset-entries",
            "40",
            "--dataset-quota-bytes",
            "3000000",
        ],
    );
    let good = tar_gz(&images(2, 3));
    let one_class = tar_gz(&images(1, 3));
    let mut empty_class = images(2, 3);
    empty_class.push(("data/c2/readme.txt".into(), b"no images here".to_vec()));
    let empty_class = tar_gz(&empty_class);
    let bomb = tar_gz(&[
        ("data/c0/a.png".into(), vec![0; 500_000]),
        ("data/c1/b.png".into(), png(32, 1)),
    ]);
    let crowded = tar_gz(&images(2, 25));
    let parent = evil_tar(b"data/../../escaped.png", tar::EntryType::Regular, b"");
    let absolute = evil_tar(b"/tmp/tlb-absolute.png", tar::EntryType::Regular, b"");
    let symlink = evil_tar(b"data/c0/link.png", tar::EntryType::Symlink, b"/etc/passwd");
    let hardlink = evil_tar(b"data/c0/hard.png", tar::EntryType::Link, b"data/c0/0.png");
    let zip = b"PK\x03\x04 the start of a zip file, nothing else".to_vec();
    let good_zip = zip_of(&images(2, 4), None);
    let mut parent_zip = images(2, 2);
    parent_zip.push(("data/../../escaped-zip.png".into(), png(32, 1)));
    let parent_zip = zip_of(&parent_zip, None);
    let symlink_zip = zip_of(&images(2, 2), Some(("data/c0/link.png", "/etc/passwd")));
    let bomb_zip = zip_of(
        &[
            ("data/c0/a.png".into(), vec![0; 500_000]),
            ("data/c1/b.png".into(), png(32, 1)),
        ],
        None,
    );
    let not_tar = b"plain text, neither tar nor gzip".to_vec();
    let mut wrong_sha = header("wrong-sha", &good);
    wrong_sha.sha256 = "0".repeat(64);
    let mut bad_name = header("no spaces please", &good);
    bad_name.name = "no spaces please".into();
    let mut too_long = header("too-long", &good);
    too_long.total_bytes -= 10;
    let mut quota = header("quota", &good);
    quota.total_bytes = 4_000_000;
    let file = |name: &str, bytes: &[u8]| messages(header(name, bytes), bytes);

    let cases: Vec<(&str, Vec<pb::UploadDatasetRequest>, Code, &str)> = vec![
        (
            "no header",
            file("x", &good)[1..].to_vec(),
            Code::InvalidArgument,
            "header: the first message must be the header",
        ),
        (
            "name",
            messages(bad_name, &good),
            Code::InvalidArgument,
            "name: 'no spaces please' is not",
        ),
        (
            "sha",
            messages(wrong_sha, &good),
            Code::InvalidArgument,
            "sha256: the bytes received hash to",
        ),
        (
            "too long",
            messages(too_long, &good),
            Code::InvalidArgument,
            "more bytes than that were sent",
        ),
        (
            "quota",
            messages(quota, &good),
            Code::ResourceExhausted,
            "dataset quota",
        ),
        (
            "one class",
            file("one", &one_class),
            Code::InvalidArgument,
            "has 1 class folder(s)",
        ),
        (
            "empty class",
            file("empty", &empty_class),
            Code::InvalidArgument,
            "class folder 'data/c2' has no PNG/JPEG images",
        ),
        (
            "bomb",
            file("bomb", &bomb),
            Code::ResourceExhausted,
            "expands to more than 400000 bytes",
        ),
        (
            "entries",
            file("crowded", &crowded),
            Code::ResourceExhausted,
            "more than 40 entries",
        ),
        (
            "parent",
            file("parent", &parent),
            Code::InvalidArgument,
            "entry 'data/../../escaped.png' leaves the archive",
        ),
        (
            "absolute",
            file("absolute", &absolute),
            Code::InvalidArgument,
            "entry '/tmp/tlb-absolute.png' is an absolute path",
        ),
        (
            "symlink",
            file("symlink", &symlink),
            Code::InvalidArgument,
            "entry 'data/c0/link.png' is a link",
        ),
        (
            "hardlink",
            file("hardlink", &hardlink),
            Code::InvalidArgument,
            "entry 'data/c0/hard.png' is a link",
        ),
        (
            "zip",
            file("zip", &zip),
            Code::InvalidArgument,
            "is not a readable zip archive",
        ),
        (
            "zip parent",
            file("zipparent", &parent_zip),
            Code::InvalidArgument,
            "entry 'data/../../escaped-zip.png' leaves the archive",
        ),
        (
            "zip symlink",
            file("ziplink", &symlink_zip),
            Code::InvalidArgument,
            "entry 'data/c0/link.png' is a link",
        ),
        (
            "zip bomb",
            file("zipbomb", &bomb_zip),
            Code::ResourceExhausted,
            "expands to more than 400000 bytes",
        ),
        (
            "not tar",
            file("nottar", &not_tar),
            Code::InvalidArgument,
            "archive: ",
        ),
    ];
    for (what, m, code, expected) in cases {
        let (got, message) = upload(&server, m).await.unwrap_err();
        assert_eq!(got, code, "{what}: {message}");
        assert!(message.contains(expected), "{what}: {message}");
    }
    assert!(
        !dir.path().join("escaped.png").exists() && !dir.path().join("data/escaped.png").exists()
    );
    assert!(!Path::new("/tmp/tlb-absolute.png").exists());
    assert!(!dir.path().join("escaped-zip.png").exists());
    let mut c = client(&server).await;
    let listed = c
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .unwrap()
        .into_inner()
        .datasets;
    assert!(listed.is_empty(), "{listed:?}");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
    let trees = std::fs::read_dir(dir.path().join("data/uploads"))
        .unwrap()
        .count();
    assert_eq!(trees, 0, "nothing stored");
    // The server serves on: the good archive is a dataset, and a job names it.
    let info = upload(&server, file("good", &good)).await.unwrap();
    assert_eq!(info.images, 6);
    let info = upload(&server, file("good-zip", &good_zip)).await.unwrap();
    assert_eq!((info.images, info.classes.len()), (8, 2), "{info:?}");
    let unknown = server
        .training()
        .await
        .start_training(pb::StartTrainingRequest {
            preset: "tiny".into(),
            config: None,
            dataset: Some(pb::Dataset {
                id: "nope".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
}

/// What an upload left unfinished is removed once nobody has continued it for --upload-ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_nobody_continues_is_removed_after_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--upload-ttl", "1"]);
    let bytes = tar_gz(&images(2, 4));
    let half = bytes.len() / 2;
    upload(&server, messages(header("left", &bytes), &bytes[..half]))
        .await
        .unwrap_err();
    let state = || async {
        client(&server)
            .await
            .get_upload(pb::GetUploadRequest {
                sha256: sha256(&bytes),
            })
            .await
            .unwrap()
            .into_inner()
            .committed_bytes
    };
    assert_eq!(state().await, half as u64);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while state().await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the partial upload stayed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(leftovers(dir.path()).is_empty());
}

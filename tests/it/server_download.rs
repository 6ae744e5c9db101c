//! `--allow-download`: a missing CIFAR set is fetched (from a local HTTP server serving an
//! archive made here), checked against its MD5, installed, and trained on.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::server::{final_state, get_job, start_job, Server};
use common::write_synthetic_cifar;
use tlb::proto::v1 as pb;
use tlb::proto::v1::job_event::Event;

/// A CIFAR-10-style archive: `cifar-10-batches-bin/*.bin` in a .tar.gz, plus `padding`
/// incompressible bytes.
fn archive(padding: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_cifar(&dir.path().join("cifar-10-batches-bin"), 300, 50);
    let mut x = 0x9e3779b97f4a7c15u64;
    let noise: Vec<u8> = (0..padding)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(dir.path().join("cifar-10-batches-bin/padding"), noise).unwrap();
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(
        "cifar-10-batches-bin",
        dir.path().join("cifar-10-batches-bin"),
    )
    .unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

/// Serves `body` to up to `count` GET requests on a free loopback port, pausing `pause`
/// after each 16 KiB.
fn http_server(body: Vec<u8>, count: usize, pause: Duration) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(count) {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).unwrap();
            for piece in body.chunks(16 << 10) {
                // The client may hang up (an abandoned download).
                if stream.write_all(piece).is_err() {
                    break;
                }
                std::thread::sleep(pause);
            }
        }
    });
    format!("http://{addr}/cifar.tar.gz")
}

fn request(format: &str, path: &str) -> pb::StartTrainingRequest {
    pb::StartTrainingRequest {
        preset: "tiny".into(),
        config: Some(pb::TrainingConfig {
            epochs: Some(1),
            ..Default::default()
        }),
        dataset: Some(pb::Dataset {
            format: format.into(),
            path: path.into(),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_cifar_is_downloaded_checked_and_installed() {
    let body = archive(0);
    let md5 = format!("{:x}", md5::compute(&body));
    let url = http_server(body.clone(), 2, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    // cifar100 points at the same archive with a wrong checksum.
    let server = Server::start(
        dir.path(),
        &[
            "--allow-download",
            "--cifar10-url",
            &url,
            "--cifar10-md5",
            &md5,
            "--cifar100-url",
            &url,
            "--cifar100-md5",
            "00000000000000000000000000000000",
        ],
    );
    let mut t = server.training().await;
    let id = start_job(&mut t, request("cifar10", "downloaded/cifar10")).await;
    let events = common::server::watch_to_end(&mut t, &id, Duration::from_secs(120)).await;
    assert_eq!(final_state(&events), pb::JobState::Succeeded, "{events:?}");
    let downloaded: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Download(d) => Some(d.bytes_done),
            _ => None,
        })
        .collect();
    assert_eq!(downloaded.last(), Some(&(body.len() as u64)));
    let installed = dir.path().join("datasets/downloaded/cifar10");
    assert!(installed.join("data_batch_1.bin").exists());
    assert!(installed.join("test_batch.bin").exists());
    // No staging leftovers beside it.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("datasets"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".download"))
        .collect();
    assert!(leftovers.is_empty());

    let id = start_job(&mut t, request("cifar100", "c100")).await;
    let events = common::server::watch_to_end(&mut t, &id, Duration::from_secs(120)).await;
    assert_eq!(final_state(&events), pb::JobState::Failed);
    let job = get_job(&mut t, &id).await;
    assert!(job.error.contains("checksum mismatch"), "{}", job.error);
    assert!(!dir.path().join("datasets/c100").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_job_abandons_its_download() {
    let body = archive(3 << 20);
    let md5 = format!("{:x}", md5::compute(&body));
    // About 2 s for the whole archive.
    let url = http_server(body, 1, Duration::from_millis(10));
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--allow-download",
            "--cifar10-url",
            &url,
            "--cifar10-md5",
            &md5,
        ],
    );
    let mut t = server.training().await;
    let id = start_job(&mut t, request("cifar10", "slow")).await;
    common::server::wait_for(&mut t, &id, |e| matches!(e, Event::Download(_))).await;
    let job = t
        .cancel_job(pb::CancelJobRequest { job_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, pb::JobState::Cancelled as i32);
    assert!(job.error.is_empty(), "{}", job.error);
    assert!(!dir.path().join("datasets/slow").exists());
}

//! What the integration tests share: small generated datasets and models, free ports, a
//! process's peak memory; `server` runs the real `tlb serve`, `postgres` a throw-away
//! PostgreSQL, `faults` damages checkpoint files.
#![allow(dead_code)]

pub mod faults;
pub mod postgres;
pub mod s3;
pub mod server;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use tlb::engine::data::{write_cifar10, PIXELS};
use tlb::engine::model::{Readout, TlbConfig};

/// Tests that train in this process run one at a time, whichever module they are in: each
/// has both cores, and a test that seeds burn's process-wide CPU RNG itself sees its own
/// sequence. (The library draws from that RNG only under `with_rng_lock`.)
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A learnable synthetic CIFAR-10 set: each class is a distinct colour pattern plus noise.
pub fn synthetic_images(n: usize, seed: u64) -> (Vec<[u8; PIXELS]>, Vec<u8>) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    let mut images = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for i in 0..n {
        let label = (i % 10) as u8;
        let mut img = [0u8; PIXELS];
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    let stripe = ((x + y * (label as usize % 3)) / (2 + label as usize / 3)) % 2;
                    let base = if (label as usize + c).is_multiple_of(3) {
                        180
                    } else {
                        60
                    };
                    let v = base + if stripe == 0 { 50 } else { -50 } + (next() % 40) as i32 - 20;
                    img[c * 1024 + y * 32 + x] = v.clamp(0, 255) as u8;
                }
            }
        }
        images.push(img);
        labels.push(label);
    }
    (images, labels)
}

/// Writes a synthetic CIFAR-10 directory with `train` training and `test` test images.
pub fn write_synthetic_cifar(dir: &Path, train: usize, test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let (imgs, labels) = synthetic_images(train, 1);
    write_cifar10(&dir.join("data_batch_1.bin"), &imgs, &labels).unwrap();
    let (imgs, labels) = synthetic_images(test, 2);
    write_cifar10(&dir.join("test_batch.bin"), &imgs, &labels).unwrap();
    let names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ];
    std::fs::write(dir.join("batches.meta.txt"), names.join("\n")).unwrap();
}

/// A small synthetic CIFAR-10 set written to `dir` and loaded with its splits.
pub fn synthetic_splits(dir: &Path) -> tlb::engine::data::Splits {
    write_synthetic_cifar(dir, 160, 40);
    tlb::engine::data::DatasetSpec {
        format: tlb::engine::data::DatasetFormat::Cifar10,
        path: dir.to_path_buf(),
    }
    .load()
    .unwrap()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A small model for fast tests: 16 px, patch 4 (16 tokens in 4 chunks of 4), D16, L3, r2,
/// 7 classes.
pub fn small_model(readout: Readout, heads: usize) -> TlbConfig {
    TlbConfig::new()
        .with_image_size(16)
        .with_patch_size(4)
        .with_embed_dim(16)
        .with_chunk_size(4)
        .with_r(2)
        .with_num_layers(3)
        .with_num_heads(heads)
        .with_num_classes(7)
        .with_readout(readout)
}

/// A process's peak resident memory so far (VmHWM), in KiB.
pub fn rss_peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

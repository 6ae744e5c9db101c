//! Downloading a CIFAR archive: stream to a temporary file while hashing, check the MD5,
//! extract, and move the folder with the `.bin` files into place in one rename.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Where an archive comes from and the checksum it must have.
#[derive(Clone, Debug)]
pub struct DownloadSource {
    pub url: String,
    /// Lower-case hex MD5 of the archive.
    pub md5: String,
}

/// Fetches `source`, checks it, and installs the folder holding `marker` at `target`.
/// `progress(url, bytes_done, bytes_total)` is called about every MiB (total 0 = unknown);
/// when it returns false the download is abandoned.
pub fn download_cifar(
    source: &DownloadSource,
    root: &Path,
    target: &Path,
    marker: &str,
    progress: &mut dyn FnMut(&str, u64, u64) -> bool,
) -> Result<()> {
    let staging = root.join(format!(".download-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let result = fetch_and_install(source, &staging, target, marker, progress);
    let _ = std::fs::remove_dir_all(&staging);
    result
}

fn fetch_and_install(
    source: &DownloadSource,
    staging: &Path,
    target: &Path,
    marker: &str,
    progress: &mut dyn FnMut(&str, u64, u64) -> bool,
) -> Result<()> {
    tracing::info!(url = %source.url, "downloading dataset");
    let response = ureq::get(&source.url)
        .call()
        .with_context(|| format!("downloading {}", source.url))?;
    let total: u64 = response
        .header("Content-Length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let archive = staging.join("archive.tar.gz");
    let mut file = std::fs::File::create(&archive)?;
    let mut reader = response.into_reader();
    let mut hash = md5::Context::new();
    let (mut done, mut reported) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 16];
    let _ = progress(&source.url, 0, total);
    loop {
        let n = reader.read(&mut buf).context("reading the download")?;
        if n == 0 {
            break;
        }
        hash.consume(&buf[..n]);
        file.write_all(&buf[..n])?;
        done += n as u64;
        if done - reported >= 1 << 20 {
            if !progress(&source.url, done, total) {
                bail!("download of {} abandoned (job stopped)", source.url);
            }
            reported = done;
        }
    }
    file.sync_all()?;
    let _ = progress(&source.url, done, total);
    let digest = format!("{:x}", hash.finalize());
    if !digest.eq_ignore_ascii_case(&source.md5) {
        bail!(
            "checksum mismatch for {}: MD5 {digest}, expected {}",
            source.url,
            source.md5
        );
    }
    let extracted = staging.join("extracted");
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(&archive)?);
    tar::Archive::new(gz)
        .unpack(&extracted)
        .context("extracting the archive")?;
    let folder = find_marker(&extracted, marker, 2)?
        .with_context(|| format!("the archive from {} has no {marker}", source.url))?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if target.exists() {
        // Only an empty folder is replaced: whatever else is there is the user's.
        std::fs::remove_dir(target).with_context(|| {
            format!(
                "{} exists without {marker} and is not empty: remove it or put the files there",
                target.display()
            )
        })?;
    }
    std::fs::rename(&folder, target)
        .with_context(|| format!("moving the dataset to {}", target.display()))?;
    tracing::info!(path = %target.display(), bytes = done, "dataset installed");
    Ok(())
}

/// The folder under `dir` (itself or up to `depth` levels below) that holds `marker`.
fn find_marker(dir: &Path, marker: &str, depth: usize) -> Result<Option<PathBuf>> {
    if dir.join(marker).is_file() {
        return Ok(Some(dir.to_path_buf()));
    }
    if depth == 0 {
        return Ok(None);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_marker(&path, marker, depth - 1)? {
                return Ok(Some(found));
            }
        }
    }
    Ok(None)
}

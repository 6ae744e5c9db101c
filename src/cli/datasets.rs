//! `tlb datasets upload|ls|show|rm`: your own data on the server (DatasetService).
//!
//! A folder is packed into a `.tar.gz` that is the same bytes every time (sorted entries, no
//! times or owners), so running `upload` again after Ctrl-C continues where the server stopped
//! receiving, and the same folder is stored once.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::client::{runtime, status_err};
use super::connect::{channel, Conn, ServerArg};
use crate::datasets::upload::sha256_hex;
use crate::proto::v1 as pb;
use crate::proto::v1::dataset_service_client::DatasetServiceClient;
use crate::proto::v1::upload_dataset_request::Part;

const CHUNK_BYTES: usize = 1 << 20;

#[derive(Args, Debug)]
pub struct DatasetsArgs {
    #[command(subcommand)]
    pub command: DatasetsCommand,
}

#[derive(Subcommand, Debug)]
pub enum DatasetsCommand {
    /// Upload a folder (one sub-folder of images per class) or a .tar/.tar.gz/.zip archive; run it
    /// again to continue an interrupted upload.
    Upload(UploadArgs),
    /// List the server's datasets.
    Ls(ServerOnly),
    /// One dataset: classes, images per class, skipped files.
    Show(NameArgs),
    /// Delete a dataset (refused while a queued or running job uses it).
    Rm(NameArgs),
}

#[derive(Args, Debug)]
pub struct UploadArgs {
    #[command(flatten)]
    pub server: ServerArg,
    pub path: PathBuf,
    /// Defaults to the folder's or archive's name.
    #[arg(long)]
    pub name: Option<String>,
    /// image-folder, cifar10 or cifar100.
    #[arg(long, default_value = "image-folder")]
    pub format: String,
}

#[derive(Args, Debug)]
pub struct ServerOnly {
    #[command(flatten)]
    pub server: ServerArg,
}

#[derive(Args, Debug)]
pub struct NameArgs {
    #[command(flatten)]
    pub server: ServerArg,
    pub name: String,
}

pub fn datasets(a: DatasetsArgs) -> Result<()> {
    match a.command {
        DatasetsCommand::Upload(u) => {
            let info =
                runtime()?.block_on(upload(&u.server, &u.path, u.name.as_deref(), &u.format))?;
            println!("{}", serde_json::to_string_pretty(&json(&info))?);
            Ok(())
        }
        DatasetsCommand::Ls(s) => runtime()?.block_on(async {
            let mut client = DatasetServiceClient::new(channel(&s.server).await?);
            let list = client
                .list_datasets(pb::ListDatasetsRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            for d in list.datasets {
                println!(
                    "{:<24} {:<12} {:>3} classes {:>8} images {:>12} bytes  {}",
                    d.name,
                    d.format,
                    d.classes.len(),
                    d.images,
                    d.archive_bytes,
                    &d.sha256[..12]
                );
            }
            Ok(())
        }),
        DatasetsCommand::Show(n) => runtime()?.block_on(async {
            let mut client = DatasetServiceClient::new(channel(&n.server).await?);
            let d = client
                .get_dataset(pb::GetDatasetRequest { name: n.name })
                .await
                .map_err(status_err)?
                .into_inner();
            println!("{}", serde_json::to_string_pretty(&json(&d))?);
            Ok(())
        }),
        DatasetsCommand::Rm(n) => runtime()?.block_on(async {
            let mut client = DatasetServiceClient::new(channel(&n.server).await?);
            client
                .delete_dataset(pb::DeleteDatasetRequest {
                    name: n.name.clone(),
                })
                .await
                .map_err(status_err)?;
            eprintln!("deleted {}", n.name);
            Ok(())
        }),
    }
}

fn json(d: &pb::DatasetInfo) -> serde_json::Value {
    serde_json::json!({
        "name": d.name, "sha256": d.sha256, "format": d.format,
        "archive_bytes": d.archive_bytes, "extracted_bytes": d.extracted_bytes,
        "images": d.images,
        "classes": d.classes.iter().map(|c| (c.name.clone(), c.images)).collect::<Vec<_>>(),
        "skipped": d.skipped.iter().map(|s| (s.path.clone(), s.reason.clone())).collect::<Vec<_>>(),
        "skipped_count": d.skipped_count, "created_by": d.created_by,
    })
}

/// Packs `dir` into a `.tar.gz` whose bytes depend on the files alone.
fn pack(dir: &Path) -> Result<tempfile::NamedTempFile> {
    let out = tempfile::NamedTempFile::new()?;
    let gz = flate2::write::GzEncoder::new(out.reopen()?, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(dir.join(&rel))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        entries.sort();
        for name in entries.into_iter().rev() {
            let rel = rel.join(name);
            let full = dir.join(&rel);
            if full.is_dir() {
                stack.push(rel);
            } else if full.is_file() {
                tar.append_path_with_name(&full, &rel)
                    .with_context(|| format!("packing {}", full.display()))?;
            }
        }
    }
    tar.into_inner()?.finish()?;
    Ok(out)
}

/// Uploads `path` (a folder or an archive) as `name`, continuing an interrupted upload.
pub async fn upload(
    server: &ServerArg,
    path: &Path,
    name: Option<&str>,
    format: &str,
) -> Result<pb::DatasetInfo> {
    let packed;
    let archive = if path.is_dir() {
        eprintln!("packing {} ...", path.display());
        packed = pack(path)?;
        packed.path().to_path_buf()
    } else if path.is_file() {
        path.to_path_buf()
    } else {
        bail!("{} is neither a folder nor an archive", path.display());
    };
    let mut file = std::fs::File::open(&archive)?;
    let total = file.metadata()?.len();
    let sha256 = sha256_hex(&mut file)?;
    let name = name
        .map(str::to_string)
        .unwrap_or_else(|| default_name(path));
    let mut client: DatasetServiceClient<Conn> = DatasetServiceClient::new(channel(server).await?);
    let state = client
        .get_upload(pb::GetUploadRequest {
            sha256: sha256.clone(),
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let offset = if state.stored {
        total
    } else {
        state.committed_bytes
    };
    let header = pb::UploadHeader {
        name,
        format: format.into(),
        total_bytes: total,
        sha256,
        offset,
    };
    let bar = ProgressBar::new(total).with_position(offset);
    bar.set_style(ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )?);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::UploadDatasetRequest {
        part: Some(Part::Header(header)),
    })
    .await?;
    let sender = {
        let bar = bar.clone();
        file.seek(SeekFrom::Start(offset))?;
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut buf = vec![0u8; CHUNK_BYTES];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                let part = Some(Part::Chunk(buf[..n].to_vec()));
                if tx.blocking_send(pb::UploadDatasetRequest { part }).is_err() {
                    return Ok(()); // the server answered early (it holds these bytes already)
                }
                bar.inc(n as u64);
            }
        })
    };
    let answer = client
        .upload_dataset(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    sender.await??;
    bar.finish_and_clear();
    Ok(answer.map_err(status_err)?.into_inner())
}

/// A folder's or archive's name without its extensions, as a dataset name.
fn default_name(path: &Path) -> String {
    let base = path
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "dataset".into());
    let base = base.split('.').next().unwrap_or("dataset");
    base.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect()
}

//! `tlb import`: a safetensors file of `tlb export` becomes a model on the server.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::client::{runtime, status_err};
use super::connect::{channel, ServerArg};
use crate::datasets::upload::sha256_hex;
use crate::proto::v1 as pb;
use crate::proto::v1::import_model_request::Part;
use crate::proto::v1::inference_service_client::InferenceServiceClient;

/// Bytes per message of the upload.
const CHUNK_BYTES: usize = 1 << 20;

#[derive(Args, Debug)]
pub struct ImportArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// The safetensors file (`tlb export` writes the config and class names into it).
    pub file: PathBuf,
    /// Shown as the model's source; defaults to the file's name.
    #[arg(long)]
    pub name: Option<String>,
    /// Class names, comma-separated, instead of the file's.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
}

pub fn import(a: ImportArgs) -> Result<()> {
    let bytes = std::fs::read(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let digest = sha256_hex(bytes.as_slice())?;
    let name = a.name.clone().unwrap_or_else(|| {
        a.file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    });
    let header = pb::ImportModelHeader {
        name,
        total_bytes: bytes.len() as u64,
        sha256: digest,
        labels: a.labels.clone(),
        config_json: String::new(),
    };
    let mut messages = vec![pb::ImportModelRequest {
        part: Some(Part::Header(header)),
    }];
    messages.extend(bytes.chunks(CHUNK_BYTES).map(|c| pb::ImportModelRequest {
        part: Some(Part::Chunk(c.to_vec())),
    }));
    runtime()?.block_on(async {
        let mut client = InferenceServiceClient::new(channel(&a.server).await?);
        let model = client
            .import_model(tokio_stream::iter(messages))
            .await
            .map_err(status_err)?
            .into_inner();
        println!(
            "{}",
            serde_json::json!({
                "model_id": model.model_id, "job_id": model.job_id,
                "labels": model.labels, "is_default": model.is_default,
            })
        );
        Ok(())
    })
}

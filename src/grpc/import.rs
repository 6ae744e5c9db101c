//! `ImportModel`: the checks of the upload stream (header, size, checksum), then the engine's
//! import and the worker's bookkeeping.

use tonic::{Request, Status, Streaming};

use super::is_sha256_hex;
use super::InferenceApi;
use crate::auth::Caller;
use crate::datasets::upload::sha256_hex;
use crate::engine::backend::{cpu_device, Cpu};
use crate::engine::train::{import_safetensors, Checkpoint};
use crate::error::ApiError;
use crate::proto::v1 as pb;
use crate::proto::v1::import_model_request::Part;
use crate::worker::add_imported;

/// Largest file ImportModel takes (held in memory until it is checked: a model, not a dataset).
pub const MAX_IMPORT_BYTES: u64 = 128 << 20;
/// Largest model an import may describe: as many parameters as the largest file holds.
const MAX_IMPORT_PARAMS: u64 = MAX_IMPORT_BYTES / 4;
const MAX_NAME_CHARS: usize = 200;

impl InferenceApi {
    pub(super) async fn import(
        &self,
        request: Request<Streaming<pb::ImportModelRequest>>,
    ) -> Result<pb::ModelInfo, Status> {
        let created_by = Caller::of(&request)
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(pb::ImportModelRequest {
                part: Some(Part::Header(h)),
            }) => h,
            Some(_) => {
                let e = ApiError::field("header", "the first message must be the header");
                return Err(e.into());
            }
            None => {
                let e = ApiError::field("header", "the stream ended before the header");
                return Err(e.into());
            }
        };
        check_header(&header)?;
        let bytes = receive(&mut stream, header.total_bytes).await?;
        if !header.sha256.is_empty() {
            let digest = sha256_hex(bytes.as_slice()).map_err(|e| ApiError::internal(e.into()))?;
            if !digest.eq_ignore_ascii_case(&header.sha256) {
                return Err(ApiError::field(
                    "sha256",
                    format!("the bytes received hash to {digest}, not {}", header.sha256),
                )
                .into());
            }
        }
        let pb::ImportModelHeader {
            name,
            labels,
            config_json,
            ..
        } = header;
        let checkpoint =
            tokio::task::spawn_blocking(move || read_model(&bytes, &config_json, labels))
                .await
                .map_err(|e| ApiError::internal(anyhow::anyhow!("import task: {e}")))??;
        let state = &self.0;
        let (job, row) = add_imported(
            &state.store,
            &state.artifacts,
            &state.data_dir,
            checkpoint,
            &name,
            created_by,
        )
        .await?;
        let default = state.store.default_checkpoint().await.ok().flatten();
        tracing::info!(job = %job.id, model = %row.id, name = %name, "model imported");
        Ok(pb::ModelInfo {
            model_id: row.id.to_string(),
            job_id: job.id.to_string(),
            epoch: row.epoch,
            val_accuracy: None,
            labels: job.labels,
            is_default: default.is_some_and(|d| d.id == row.id),
        })
    }
}

fn check_header(h: &pb::ImportModelHeader) -> Result<(), ApiError> {
    if h.name.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::field(
            "name",
            format!(
                "{} characters; the limit is {MAX_NAME_CHARS}",
                h.name.chars().count()
            ),
        ));
    }
    if h.total_bytes == 0 {
        return Err(ApiError::field(
            "total_bytes",
            "is required (the file's size)",
        ));
    }
    if h.total_bytes > MAX_IMPORT_BYTES {
        return Err(ApiError::ResourceExhausted(format!(
            "total_bytes: {} bytes; the limit is {MAX_IMPORT_BYTES} (128 MiB)",
            h.total_bytes
        )));
    }
    if !h.sha256.is_empty() && !is_sha256_hex(&h.sha256) {
        return Err(ApiError::field(
            "sha256",
            "must be 64 hex digits (the SHA-256 of the file) or empty",
        ));
    }
    Ok(())
}

/// The file's bytes: exactly `total` of them, from chunks after the header.
async fn receive(
    stream: &mut Streaming<pb::ImportModelRequest>,
    total: u64,
) -> Result<Vec<u8>, Status> {
    // Reserved as the bytes arrive, not as declared.
    let mut bytes = Vec::with_capacity(total.min(4 << 20) as usize);
    while let Some(message) = stream.message().await? {
        match message.part {
            Some(Part::Chunk(chunk)) => {
                if bytes.len() as u64 + chunk.len() as u64 > total {
                    return Err(ApiError::field(
                        "total_bytes",
                        format!("is {total}, but more bytes than that were sent"),
                    )
                    .into());
                }
                bytes.extend_from_slice(&chunk);
            }
            Some(Part::Header(_)) => return Err(ApiError::field("header", "sent twice").into()),
            None => {
                let e = ApiError::field("part", "a message holds neither header nor chunk");
                return Err(e.into());
            }
        }
    }
    if (bytes.len() as u64) < total {
        return Err(ApiError::field(
            "total_bytes",
            format!(
                "is {total}, but the stream ended after {} bytes",
                bytes.len()
            ),
        )
        .into());
    }
    Ok(bytes)
}

/// The engine's import (every check of the file's contents), as a checkpoint to store.
fn read_model(
    bytes: &[u8],
    config_json: &str,
    labels: Vec<String>,
) -> Result<Checkpoint, ApiError> {
    let device = cpu_device();
    let imported =
        import_safetensors::<Cpu>(bytes, config_json, labels, MAX_IMPORT_PARAMS, &device)
            .map_err(|e| ApiError::field(e.field, e.message))?;
    imported.into_checkpoint().map_err(ApiError::internal)
}

//! `ExportModel`: a model's weights as the safetensors file of `tlb export`, streamed.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::Status;

use super::inference::InferenceApi;
use crate::datasets::upload::sha256_hex;
use crate::engine::train::checkpoint_safetensors;
use crate::error::ApiError;
use crate::proto::v1 as pb;

/// Bytes per chunk message.
const CHUNK: usize = 1 << 20;

pub type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportModelResponse, Status>> + Send>>;

impl InferenceApi {
    /// The model's file, its header first, then the bytes in chunks.
    pub(super) async fn export(&self, model: &str) -> Result<ExportStream, ApiError> {
        let model = self.resolve_model(model).await?;
        let id = model.checkpoint_id;
        let file = model.file().to_path_buf();
        let bytes = tokio::task::spawn_blocking(move || checkpoint_safetensors(&file))
            .await
            .map_err(|e| ApiError::internal(e.into()))?
            .map_err(ApiError::internal)?;
        let sha256 = sha256_hex(bytes.as_slice()).map_err(|e| ApiError::internal(e.into()))?;
        let header = pb::ExportModelHeader {
            model: id.to_string(),
            total_bytes: bytes.len() as u64,
            sha256,
            file_name: format!("tlb-{id}.safetensors"),
        };
        let mut parts = vec![Ok(pb::ExportModelResponse {
            part: Some(pb::export_model_response::Part::Header(header)),
        })];
        parts.extend(bytes.chunks(CHUNK).map(|c| {
            Ok(pb::ExportModelResponse {
                part: Some(pb::export_model_response::Part::Chunk(c.to_vec())),
            })
        }));
        Ok(Box::pin(tokio_stream::iter(parts)))
    }
}

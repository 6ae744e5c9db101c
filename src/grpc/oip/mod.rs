//! `inference.GRPCInferenceService`: the Open Inference Protocol (KServe v2), so Triton's and
//! KServe's clients use tlb models unchanged. Model names: a job id (its best checkpoint), a
//! checkpoint id, or `tlb` (the default model); versions: empty or an epoch number. ModelInfer
//! goes through the same queue, limits and device batches as Classify.

mod tensors;
mod unimplemented;

use std::time::Instant;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::images::{check_pixel_budget, decode_all};
use super::{deadline_of, within, AppState};
use crate::engine::infer::top_k;
use crate::engine::train::TrainConfig;
use crate::error::ApiError;
use crate::proto::inference as oip;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::store::CheckpointRow;
use crate::worker::local_model;
use tensors::{Output, ATTENTION, ENCODED, IMAGES, LABELS, PROBABILITIES};
pub use unimplemented::OnlyOpenInference;

/// The default model's name.
pub const DEFAULT_MODEL: &str = "tlb";
const PLATFORM: &str = "tlb_burn";

pub struct OipApi(pub AppState);

/// What ModelMetadata says about a checkpoint's model.
struct Shapes {
    classes: i64,
    /// Chunks, heads, latents, chunk size of the attention maps.
    attention: [i64; 4],
}

fn not_found(name: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::NotFound(format!(
        "no model '{name}': {why} (models are job ids, search ids, checkpoint ids, or `{DEFAULT_MODEL}`)"
    ))
}

impl OipApi {
    /// The checkpoint a model name and version stand for.
    /// While the store cannot be reached: the checkpoint it last stood for.
    async fn checkpoint(&self, name: &str, version: &str) -> Result<CheckpointRow, ApiError> {
        let answer = self.lookup_checkpoint(name, version).await;
        self.0.remembered(&format!("oip/{name}/{version}"), answer)
    }

    async fn lookup_checkpoint(
        &self,
        name: &str,
        version: &str,
    ) -> Result<CheckpointRow, ApiError> {
        let epoch = match version {
            "" => None,
            v => Some(v.parse::<u32>().map_err(|_| {
                ApiError::field("version", format!("'{v}' is not an epoch number"))
            })?),
        };
        let store = &self.0.store;
        let row = if name == DEFAULT_MODEL {
            store.default_checkpoint().await?.ok_or_else(|| {
                ApiError::FailedPrecondition(
                    "no trained model yet: no job has succeeded; name a job or checkpoint".into(),
                )
            })?
        } else {
            if name.is_empty() {
                return Err(ApiError::field(
                    "model_name",
                    format!("is required: a job id, a checkpoint id or `{DEFAULT_MODEL}`"),
                ));
            }
            let id = Uuid::parse_str(name).map_err(|_| not_found(name, "not a UUID"))?;
            // A search stands for its best trial.
            let id = crate::grpc::through_search(store, id).await?;
            if store.get_job(id).await?.is_some() {
                let rows = store.list_checkpoints(id).await?;
                let pick = match epoch {
                    Some(e) => rows.into_iter().find(|r| r.epoch == e),
                    None => rows.into_iter().find(|r| r.is_best),
                };
                return pick.ok_or_else(|| match epoch {
                    Some(e) => not_found(name, format!("job {id} has no checkpoint of epoch {e}")),
                    None => not_found(name, format!("job {id} has no checkpoint yet")),
                });
            }
            store
                .get_checkpoint(id)
                .await?
                .ok_or_else(|| not_found(name, "no such job or checkpoint"))?
        };
        match epoch {
            Some(e) if e != row.epoch => Err(not_found(
                name,
                format!("it is epoch {}, not version {e}", row.epoch),
            )),
            _ => Ok(row),
        }
    }

    /// Shapes of the model's outputs, from its job's config in the store (every replica
    /// reads the same, whichever trained or imported the model).
    async fn shapes(&self, row: &CheckpointRow) -> Result<Shapes, ApiError> {
        let config: TrainConfig = self
            .0
            .store
            .get_job(row.job_id)
            .await?
            .map(|job| job.config)
            .ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "the job {} of this model is gone",
                    row.job_id
                ))
            })?;
        let m = &config.model;
        Ok(Shapes {
            classes: m.num_classes as i64,
            attention: [m.num_chunks(), m.num_heads, m.num_latents(), m.chunk_size]
                .map(|d| d as i64),
        })
    }

    fn ready(&self) -> bool {
        !*self.0.shutdown.borrow() && self.0.worker.any_device_ready()
    }
}

fn meta(name: &str, datatype: &str, shape: &[i64]) -> oip::model_metadata_response::TensorMetadata {
    oip::model_metadata_response::TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for OipApi {
    async fn server_live(
        &self,
        _request: Request<oip::ServerLiveRequest>,
    ) -> Result<Response<oip::ServerLiveResponse>, Status> {
        Ok(Response::new(oip::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<oip::ServerReadyRequest>,
    ) -> Result<Response<oip::ServerReadyResponse>, Status> {
        Ok(Response::new(oip::ServerReadyResponse {
            ready: self.ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<oip::ModelReadyRequest>,
    ) -> Result<Response<oip::ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = match self.checkpoint(&r.name, &r.version).await {
            Ok(row) => {
                let model = local_model(&self.0.artifacts, &self.0.data_dir, &row).await;
                self.ready() && model.is_ok_and(|m| m.file().exists())
            }
            Err(ApiError::NotFound(_) | ApiError::FailedPrecondition(_)) => false,
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(oip::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<oip::ServerMetadataRequest>,
    ) -> Result<Response<oip::ServerMetadataResponse>, Status> {
        Ok(Response::new(oip::ServerMetadataResponse {
            name: "tlb".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<oip::ModelMetadataRequest>,
    ) -> Result<Response<oip::ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let row = self.checkpoint(&r.name, &r.version).await?;
        let s = self.shapes(&row).await?;
        let [chunks, heads, latents, chunk] = s.attention;
        Ok(Response::new(oip::ModelMetadataResponse {
            name: r.name,
            versions: vec![row.epoch.to_string()],
            platform: PLATFORM.into(),
            inputs: vec![
                meta(IMAGES, "UINT8", &[-1, -1, -1, 3]),
                meta(ENCODED, "BYTES", &[-1]),
            ],
            outputs: vec![
                meta(PROBABILITIES, "FP32", &[-1, s.classes]),
                meta(ATTENTION, "FP32", &[-1, chunks, heads, latents, chunk]),
                meta(LABELS, "BYTES", &[-1]),
            ],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<oip::ModelInferRequest>,
    ) -> Result<Response<oip::ModelInferResponse>, Status> {
        let deadline = deadline_of(&request);
        within(deadline, self.infer_until(request.into_inner(), deadline)).await
    }
}

impl OipApi {
    async fn infer_until(
        &self,
        mut r: oip::ModelInferRequest,
        deadline: Option<Instant>,
    ) -> Result<Response<oip::ModelInferResponse>, Status> {
        // Argument errors first: inputs, outputs, limits; then the model.
        // (The outputs first: `images` also refuses more images than one request may hold,
        // before it copies them out.)
        let outputs = tensors::requested_outputs(&r)?;
        let images = tensors::images(&mut r)?;
        check_pixel_budget(&images)?;
        let n = images.len();
        let ticket = self.0.worker.reserve(n, deadline)?;
        let decoded = decode_all(images, false).await?;
        let row = self.checkpoint(&r.model_name, &r.model_version).await?;
        let model = local_model(&self.0.artifacts, &self.0.data_dir, &row).await?;
        let planar: Vec<Vec<u8>> = decoded.into_iter().map(|d| d.planar).collect();
        let wants = |name| outputs.contains(&name);
        let mut attention: Vec<f32> = Vec::new();
        let mut attention_dims = [0usize; 4];
        if wants(ATTENTION) {
            for image in &planar {
                let ticket = self.0.worker.reserve(1, deadline)?;
                let out = self
                    .0
                    .worker
                    .attention(model.clone(), image.clone(), ticket)
                    .await?;
                attention_dims = out.maps.dims;
                attention.extend(out.maps.weights);
            }
        }
        let classified = if wants(PROBABILITIES) || wants(LABELS) {
            Some(self.0.worker.classify(model, planar, ticket).await?)
        } else {
            drop(ticket);
            None
        };
        let mut answer = Vec::with_capacity(outputs.len());
        for name in &outputs {
            answer.push(match *name {
                PROBABILITIES => {
                    let c = classified.as_ref().expect("classified");
                    let classes = c.labels.len() as i64;
                    let values = c.probabilities.iter().flatten().copied();
                    tensors::fp32(PROBABILITIES, vec![n as i64, classes], values)
                }
                LABELS => {
                    let c = classified.as_ref().expect("classified");
                    let top: Vec<&str> = c
                        .probabilities
                        .iter()
                        .map(|p| {
                            let (class, _) = top_k(p, 1)[0];
                            c.labels.get(class).map_or("", String::as_str)
                        })
                        .collect();
                    tensors::strings(LABELS, top)
                }
                _ => {
                    let mut shape = vec![n as i64];
                    shape.extend(attention_dims.map(|d| d as i64));
                    tensors::fp32(ATTENTION, shape, std::mem::take(&mut attention))
                }
            });
        }
        let (tensors, raw): (Vec<_>, Vec<_>) = answer
            .into_iter()
            .map(|o: Output| (o.tensor, o.raw))
            .unzip();
        // Images in the device batch this request was part of (as Classify's batch_images).
        let parameters = classified
            .iter()
            .map(|c| {
                let batch =
                    oip::infer_parameter::ParameterChoice::Int64Param(c.batch_images as i64);
                let value = oip::InferParameter {
                    parameter_choice: Some(batch),
                };
                ("batch_images".to_string(), value)
            })
            .collect();
        Ok(Response::new(oip::ModelInferResponse {
            model_name: r.model_name,
            model_version: row.epoch.to_string(),
            id: r.id,
            parameters,
            outputs: tensors,
            raw_output_contents: raw,
        }))
    }
}

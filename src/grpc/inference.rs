//! `tlb.v1.InferenceService`.

use std::time::Instant;

use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use super::images::{check_pixel_budget, decode_all};
use super::{deadline_of, within, AppState, MAX_BATCH};
use crate::engine::infer::top_k;
use crate::engine::viz::{attention_picture, png_bytes, token_scores};
use crate::error::ApiError;
use crate::names::Named;
use crate::proto::v1 as pb;
use crate::proto::v1::inference_service_server::InferenceService;
use crate::store::{job_dir, CheckpointRow};
use crate::worker::{local_model, ModelRef};

const OVERLAY_DEFAULT: u32 = 256;
const OVERLAY_RANGE: std::ops::RangeInclusive<u32> = 32..=1024;

pub struct InferenceApi(pub AppState);

impl InferenceApi {
    async fn model_ref(&self, row: &CheckpointRow) -> Result<ModelRef, ApiError> {
        local_model(&self.0.artifacts, &self.0.data_dir, row).await
    }

    /// A job id (its best checkpoint), a search id (its best trial's), a checkpoint id, or empty (the default model); while
    /// the store cannot be reached, the checkpoint the name last stood for.
    pub(super) async fn resolve_model(&self, model: &str) -> Result<ModelRef, ApiError> {
        let answer = self.lookup_model(model).await;
        let row = self.0.remembered(&format!("tlb.v1/{model}"), answer)?;
        self.model_ref(&row).await
    }

    async fn lookup_model(&self, model: &str) -> Result<CheckpointRow, ApiError> {
        let store = &self.0.store;
        if model.is_empty() {
            let default = store.default_checkpoint().await?.ok_or_else(|| {
                ApiError::FailedPrecondition(
                    "no trained model yet: no job has succeeded. Train one with \
                         StartTraining, or name a job or checkpoint in `model`"
                        .into(),
                )
            })?;
            return Ok(default);
        }
        let id = Uuid::parse_str(model).map_err(|_| {
            ApiError::field(
                "model",
                format!("'{model}' is not a UUID (a job, search or checkpoint id)"),
            )
        })?;
        // A search stands for its best trial.
        let id = super::through_search(store, id).await?;
        if let Some(job) = store.get_job(id).await? {
            let best = match job.best_checkpoint_id {
                Some(c) => store.get_checkpoint(c).await?,
                None => None,
            };
            return best.ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "job {id} has no checkpoint yet ({}, {} of {} epochs done)",
                    job.state.name(),
                    job.epochs_completed,
                    job.epochs_total
                ))
            });
        }
        let row = store
            .get_checkpoint(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no job or checkpoint with id {id}")))?;
        Ok(row)
    }
}

fn prediction(labels: &[String], class: usize, p: f32) -> pb::Prediction {
    pb::Prediction {
        class_index: class as u32,
        label: labels.get(class).cloned().unwrap_or_default(),
        probability: p,
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let deadline = deadline_of(&request);
        within(
            deadline,
            self.classify_until(request.into_inner(), deadline),
        )
        .await
    }

    async fn get_attention(
        &self,
        request: Request<pb::GetAttentionRequest>,
    ) -> Result<Response<pb::GetAttentionResponse>, Status> {
        let deadline = deadline_of(&request);
        within(
            deadline,
            self.attention_until(request.into_inner(), deadline),
        )
        .await
    }
    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let store = &self.0.store;
        let rows = store.best_checkpoints().await.map_err(ApiError::from)?;
        let default = store
            .default_checkpoint()
            .await
            .map_err(ApiError::from)?
            .map(|c| c.id);
        let mut models = Vec::with_capacity(rows.len());
        for row in &rows {
            let labels = self.labels_of(row.job_id).await;
            models.push(pb::ModelInfo {
                model_id: row.id.to_string(),
                job_id: row.job_id.to_string(),
                epoch: row.epoch,
                val_accuracy: row.val_accuracy,
                labels,
                is_default: Some(row.id) == default,
            });
        }
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn import_model(
        &self,
        request: Request<Streaming<pb::ImportModelRequest>>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        self.import(request).await.map(Response::new)
    }

    type ExportModelStream = super::export::ExportStream;

    async fn export_model(
        &self,
        request: Request<pb::ExportModelRequest>,
    ) -> Result<Response<Self::ExportModelStream>, Status> {
        Ok(Response::new(self.export(&request.get_ref().model).await?))
    }
}

impl InferenceApi {
    async fn classify_until(
        &self,
        r: pb::ClassifyRequest,
        deadline: Option<Instant>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        if r.images.is_empty() {
            return Err(ApiError::field("images", "empty batch; send at least one image").into());
        }
        if r.images.len() > MAX_BATCH {
            return Err(ApiError::ResourceExhausted(format!(
                "images: {} images in one request; the limit is {MAX_BATCH}",
                r.images.len()
            ))
            .into());
        }
        check_pixel_budget(&r.images)?;
        let k = r.top_k.max(1) as usize;
        // A place in the queue before any decoding: a flood is refused, not buffered.
        let ticket = self.0.worker.reserve(r.images.len(), deadline)?;
        let t = std::time::Instant::now();
        // Argument errors (undecodable images) before state errors (no such model).
        let decoded = decode_all(r.images, false).await?;
        let decoded_at = t.elapsed();
        let model = self.resolve_model(&r.model).await?;
        let resolved = t.elapsed();
        let out = self
            .0
            .worker
            .classify(
                model,
                decoded.into_iter().map(|d| d.planar).collect(),
                ticket,
            )
            .await?;
        tracing::debug!(?decoded_at, ?resolved, worker = ?t.elapsed(), "classify timings");
        let classes = out.labels.len();
        if k > classes {
            return Err(ApiError::field(
                "top_k",
                format!("{k} is out of range: the model has {classes} classes (1..={classes})"),
            )
            .into());
        }
        let results = out
            .probabilities
            .iter()
            .map(|p| pb::ClassifyResult {
                predictions: top_k(p, k)
                    .into_iter()
                    .map(|(c, p)| prediction(&out.labels, c, p))
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ClassifyResponse {
            results,
            model: out.checkpoint_id.to_string(),
            batch_images: out.batch_images as u32,
        }))
    }

    async fn attention_until(
        &self,
        r: pb::GetAttentionRequest,
        deadline: Option<Instant>,
    ) -> Result<Response<pb::GetAttentionResponse>, Status> {
        let size = match r.overlay_size {
            0 => OVERLAY_DEFAULT,
            s if OVERLAY_RANGE.contains(&s) => s,
            s => {
                return Err(ApiError::field(
                    "overlay_size",
                    format!("{s} is out of range {OVERLAY_RANGE:?}"),
                )
                .into())
            }
        };
        let image = r
            .image
            .ok_or_else(|| ApiError::field("image", "is required (encoded or raw)"))?;
        let ticket = self.0.worker.reserve(1, deadline)?;
        let render = r.render_overlay;
        let side_by_side = r.side_by_side.unwrap_or(true);
        let mut decoded = decode_all(vec![image], render).await?;
        let decoded = decoded.pop().expect("one image");
        let model = self.resolve_model(&r.model).await?;
        let out = self
            .0
            .worker
            .attention(model, decoded.planar, ticket)
            .await?;
        let maps = out.maps;
        let [chunks, heads, latents, chunk] = maps.dims;
        let scores = token_scores(&maps.weights, maps.dims);
        let overlay_png = match decoded.rgb {
            Some(rgb) => {
                let (scores, grid) = (scores.clone(), out.grid);
                tokio::task::spawn_blocking(move || {
                    png_bytes(&attention_picture(&rgb, &scores, grid, size, side_by_side))
                })
                .await
                .map_err(|e| ApiError::internal(anyhow::anyhow!("rendering task: {e}")))?
            }
            None => Vec::new(),
        };
        let per_chunk = heads * latents * chunk;
        let (class, p) = top_k(&maps.probabilities, 1)[0];
        Ok(Response::new(pb::GetAttentionResponse {
            chunks: maps
                .weights
                .chunks(per_chunk.max(1))
                .enumerate()
                .map(|(i, w)| pb::ChunkAttention {
                    chunk_index: i as u32,
                    weights: w.to_vec(),
                    first_token: (i * chunk) as u32,
                })
                .collect(),
            num_heads: heads as u32,
            num_latents: latents as u32,
            chunk_size: chunk as u32,
            grid_height: out.grid as u32,
            grid_width: out.grid as u32,
            token_scores: scores,
            prediction: Some(prediction(&out.labels, class, p)),
            overlay_png,
            model: out.checkpoint_id.to_string(),
            num_chunks: chunks as u32,
        }))
    }

    /// Class names of a job's model: from the store (every replica sees them), or for a job
    /// from before they were stored, from its run's `labels.json`; empty if neither is there.
    async fn labels_of(&self, job: Uuid) -> Vec<String> {
        if let Ok(Some(row)) = self.0.store.get_job(job).await {
            if !row.labels.is_empty() {
                return row.labels;
            }
        }
        let path = job_dir(&self.0.data_dir, job).join("labels.json");
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }
}

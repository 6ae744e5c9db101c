//! `tlb.v1.DatasetService`: uploads into the server's datasets (the stream's checks here;
//! receiving, extraction and inspection in `datasets::upload`; rows in the store).

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::{is_sha256_hex, AppState};
use crate::auth::{Caller, Role};
use crate::datasets::upload::{Inspected, Receiving, Uploads, UPLOAD_PREFIX};
use crate::engine::data::DatasetFormat;
use crate::error::ApiError;
use crate::proto::v1 as pb;
use crate::proto::v1::dataset_service_server::DatasetService;
use crate::proto::v1::upload_dataset_request::Part;
use crate::store::{now_ms, DatasetRow};

const MAX_NAME_CHARS: usize = 100;

pub struct DatasetApi(pub AppState);

/// The `dataset_path` of jobs that train on `d`.
pub fn job_path(d: &DatasetRow) -> String {
    let root = if d.root.is_empty() {
        d.sha256.clone()
    } else {
        format!("{}/{}", d.sha256, d.root)
    };
    format!("{UPLOAD_PREFIX}{root}")
}

fn info(d: &DatasetRow) -> pb::DatasetInfo {
    let inspected: Inspected = serde_json::from_str(&d.info_json).unwrap_or_default();
    pb::DatasetInfo {
        name: d.name.clone(),
        sha256: d.sha256.clone(),
        format: d.format.clone(),
        archive_bytes: d.archive_bytes,
        extracted_bytes: d.extracted_bytes,
        classes: inspected
            .classes
            .into_iter()
            .map(|(name, images)| pb::ClassImages { name, images })
            .collect(),
        images: inspected.images,
        skipped: inspected
            .skipped
            .into_iter()
            .map(|(path, reason)| pb::SkippedFile { path, reason })
            .collect(),
        skipped_count: inspected.skipped_count,
        created_by: d.created_by.clone(),
        created_at_ms: d.created_at_ms,
    }
}

fn check_sha256(field: &str, sha: &str) -> Result<String, ApiError> {
    if is_sha256_hex(sha) {
        Ok(sha.to_ascii_lowercase())
    } else {
        Err(ApiError::field(
            field,
            "must be 64 hex digits (the archive's SHA-256)",
        ))
    }
}

/// The header's fields, checked: name, format, digest.
fn check_header(h: &pb::UploadHeader) -> Result<(DatasetFormat, String), ApiError> {
    let name_ok = (1..=MAX_NAME_CHARS).contains(&h.name.len())
        && h.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !name_ok {
        return Err(ApiError::field(
            "name",
            format!(
                "'{}' is not 1 to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-'",
                h.name
            ),
        ));
    }
    let format = match h.format.as_str() {
        "" => DatasetFormat::ImageFolder,
        f => f
            .parse()
            .map_err(|e: String| ApiError::field("format", e))?,
    };
    if h.total_bytes == 0 {
        return Err(ApiError::field(
            "total_bytes",
            "is required (the archive's size)",
        ));
    }
    Ok((format, check_sha256("sha256", &h.sha256)?))
}

fn owner_of<T>(request: &Request<T>) -> (String, bool) {
    match Caller::of(request) {
        Some(c) => (c.name.clone(), c.role == Role::Admin),
        None => (String::new(), true),
    }
}

impl DatasetApi {
    fn uploads(&self) -> &Arc<Uploads> {
        &self.0.datasets.uploads
    }

    /// Refusals that need no bytes: a name taken by other bytes, a spent quota. The same
    /// name and bytes again: the dataset there is (`Some`).
    async fn admit(
        &self,
        h: &pb::UploadHeader,
        sha256: &str,
        owner: &str,
    ) -> Result<Option<DatasetRow>, ApiError> {
        if let Some(existing) = self.0.store.get_dataset(&h.name).await? {
            if existing.sha256 == sha256 {
                return Ok(Some(existing));
            }
            return Err(ApiError::FailedPrecondition(format!(
                "a dataset named '{}' exists (sha256 {}); delete it first or choose another name",
                h.name, existing.sha256
            )));
        }
        let quota = self.uploads().quota_bytes;
        let used = self.0.store.dataset_bytes_of(owner).await?;
        if quota > 0 && used.saturating_add(h.total_bytes) > quota {
            return Err(ApiError::ResourceExhausted(format!(
                "dataset quota: {used} of {quota} bytes used; this upload needs {} more \
                 (--dataset-quota-bytes); delete a dataset first",
                h.total_bytes
            )));
        }
        Ok(None)
    }

    async fn receive(
        &self,
        stream: &mut Streaming<pb::UploadDatasetRequest>,
        rx: &mut Receiving,
    ) -> Result<(), Status> {
        while let Some(message) = stream.message().await? {
            match message.part {
                Some(Part::Chunk(chunk)) => rx.write(&chunk).await?,
                Some(Part::Header(_)) => return Err(ApiError::field("header", "sent twice").into()),
                None => return Err(ApiError::field("part", "neither header nor chunk").into()),
            }
        }
        Ok(())
    }

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadDatasetRequest>>,
    ) -> Result<pb::DatasetInfo, Status> {
        let (owner, _) = owner_of(&request);
        let mut stream = request.into_inner();
        let header = match stream.message().await? {
            Some(pb::UploadDatasetRequest {
                part: Some(Part::Header(h)),
            }) => h,
            _ => {
                let e = ApiError::field("header", "the first message must be the header");
                return Err(e.into());
            }
        };
        let (format, sha256) = check_header(&header)?;
        if let Some(existing) = self.admit(&header, &sha256, &owner).await? {
            return Ok(info(&existing));
        }
        let uploads = self.uploads().clone();
        if !uploads.tree(&sha256).is_dir() {
            let mut rx = uploads
                .begin(&sha256, &header.name, header.offset, header.total_bytes)
                .await?;
            // Cut short (the client went away): what arrived stays for a resume. A stream
            // that breaks the protocol (bytes beyond its total, a second header) is discarded.
            let received = self.receive(&mut stream, &mut rx).await;
            rx.sync().await?;
            if let Err(e) = received {
                if e.code() == tonic::Code::InvalidArgument {
                    drop(rx);
                    uploads.discard(&sha256);
                }
                return Err(e);
            }
            if rx.received < rx.total {
                return Err(ApiError::FailedPrecondition(format!(
                    "the stream ended after {} of {} bytes; they are kept: continue with offset {}",
                    rx.received, rx.total, rx.received
                ))
                .into());
            }
            drop(rx);
        }
        let sha = sha256.clone();
        let finishing = uploads.clone();
        let (inspected, extracted_bytes) =
            tokio::task::spawn_blocking(move || finishing.finish(&sha, format))
                .await
                .map_err(|e| ApiError::internal(anyhow::anyhow!("upload task: {e}")))??;
        // The archive goes to the artifact store for the other replicas; alone, it goes.
        let archive = uploads.archive(&sha256);
        if self.0.artifacts.is_remote() {
            if archive.exists() {
                self.0
                    .artifacts
                    .publish(&archive)
                    .await
                    .map_err(ApiError::from)?;
            }
        } else {
            let _ = tokio::fs::remove_file(&archive).await;
        }
        let row = DatasetRow {
            name: header.name.clone(),
            sha256,
            format: <&str>::from(format).to_string(),
            root: inspected.root.clone(),
            archive_bytes: header.total_bytes,
            extracted_bytes,
            info_json: serde_json::to_string(&inspected)
                .map_err(|e| ApiError::internal(e.into()))?,
            created_by: owner,
            created_at_ms: now_ms(),
        };
        if !self
            .0
            .store
            .insert_dataset(&row)
            .await
            .map_err(ApiError::from)?
        {
            return Err(ApiError::FailedPrecondition(format!(
                "a dataset named '{}' was created meanwhile",
                row.name
            ))
            .into());
        }
        tracing::info!(dataset = %row.name, sha256 = %row.sha256, images = inspected.images, "dataset uploaded");
        Ok(info(&row))
    }

    async fn dataset(&self, name: &str) -> Result<DatasetRow, ApiError> {
        if name.is_empty() {
            return Err(ApiError::field("name", "is required"));
        }
        self.0
            .store
            .get_dataset(name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no dataset named '{name}' (ListDatasets)")))
    }
}

#[tonic::async_trait]
impl DatasetService for DatasetApi {
    async fn upload_dataset(
        &self,
        request: Request<Streaming<pb::UploadDatasetRequest>>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        self.upload(request).await.map(Response::new)
    }

    async fn get_upload(
        &self,
        request: Request<pb::GetUploadRequest>,
    ) -> Result<Response<pb::UploadState>, Status> {
        let sha256 = check_sha256("sha256", &request.into_inner().sha256)?;
        let uploads = self.uploads();
        Ok(Response::new(pb::UploadState {
            committed_bytes: uploads.committed(&sha256),
            stored: uploads.tree(&sha256).is_dir(),
            sha256,
        }))
    }

    async fn list_datasets(
        &self,
        _request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let rows = self.0.store.list_datasets().await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListDatasetsResponse {
            datasets: rows.iter().map(info).collect(),
        }))
    }

    async fn get_dataset(
        &self,
        request: Request<pb::GetDatasetRequest>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        let row = self.dataset(&request.into_inner().name).await?;
        Ok(Response::new(info(&row)))
    }

    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> Result<Response<pb::DeleteDatasetResponse>, Status> {
        let (caller, admin) = owner_of(&request);
        let row = self.dataset(&request.into_inner().name).await?;
        if !admin && row.created_by != caller {
            return Err(Status::permission_denied(format!(
                "dataset '{}' was uploaded by '{}'; only they or an admin may delete it",
                row.name, row.created_by
            )));
        }
        match self
            .0
            .store
            .delete_dataset(&row, &job_path(&row))
            .await
            .map_err(ApiError::from)?
        {
            Err(jobs) => Err(ApiError::FailedPrecondition(format!(
                "dataset '{}' is in use by queued or running job(s) {}; cancel them or wait",
                row.name,
                jobs.join(", ")
            ))
            .into()),
            Ok(shared) => {
                if !shared {
                    let tree = self.uploads().tree(&row.sha256);
                    let _ = tokio::fs::remove_dir_all(&tree).await;
                    let _ = tokio::fs::remove_file(self.uploads().archive(&row.sha256)).await;
                }
                tracing::info!(dataset = %row.name, "dataset deleted");
                Ok(Response::new(pb::DeleteDatasetResponse {}))
            }
        }
    }
}

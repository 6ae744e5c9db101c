//! Uploaded datasets on replicas that did not receive them: the kept archive is fetched from
//! the artifact store and extracted here before a job reads it.

use crate::artifacts::Artifacts;
use crate::datasets::upload::fetched::InUse;
use crate::datasets::upload::{remote, UPLOAD_PREFIX};
use crate::datasets::Datasets;
use crate::engine::data::DatasetFormat;
use crate::error::ApiError;

/// Makes the upload a job's `dataset_path` names present on this replica (nothing to do for
/// a path under the datasets root, or an upload already here).
async fn local_upload(
    artifacts: &Artifacts,
    datasets: &Datasets,
    format: &str,
    dataset_path: &str,
) -> Result<(), ApiError> {
    let Some(rest) = dataset_path.strip_prefix(UPLOAD_PREFIX) else {
        return Ok(());
    };
    let sha256 = rest.split('/').next().unwrap_or_default().to_string();
    let uploads = datasets.uploads.clone();
    if uploads.tree(&sha256).is_dir() {
        return Ok(());
    }
    let format: DatasetFormat = format
        .parse()
        .map_err(|e: String| ApiError::field("dataset.format", e))?;
    if !artifacts.fetch(&uploads.archive(&sha256)).await? {
        return Err(ApiError::FailedPrecondition(format!(
            "uploaded dataset {sha256} is neither on this replica nor in the artifact store \
             (uploads reach other replicas through --artifact-store)"
        )));
    }
    tokio::task::spawn_blocking(move || uploads.restore(&sha256, format))
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("extracting an upload: {e}")))?
}

/// The path a job reads its dataset at on this replica: an `s3://` URI fetched (or found
/// fetched) into the cache dir and held until the guard is dropped, an upload made present,
/// a datasets-root path as it is.
pub async fn local_dataset(
    artifacts: &Artifacts,
    datasets: &Datasets,
    format: &str,
    dataset_path: &str,
) -> Result<(String, Option<InUse>), ApiError> {
    if dataset_path.starts_with("s3://") {
        let format: DatasetFormat = format
            .parse()
            .map_err(|e: String| ApiError::field("dataset.format", e))?;
        let (path, held) = remote::fetch(&datasets.uploads, dataset_path, format).await?;
        return Ok((path, Some(held)));
    }
    local_upload(artifacts, datasets, format, dataset_path).await?;
    Ok((dataset_path.to_string(), None))
}

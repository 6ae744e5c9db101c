//! Datasets named by a URI in the user's object storage: `s3://BUCKET/KEY.tar.gz` (one
//! archive) or `s3://BUCKET/PREFIX/` (the files of an image folder or the CIFAR binaries).
//! They are fetched through the server's S3 settings (`--s3-endpoint`, `--s3-addressing`, the
//! AWS environment) and checked like uploads. They are kept in the cache dir (see
//! [`super::fetched`]) under an id made of the objects' keys, sizes and ETags: the same
//! objects are fetched once (while cached), changed ones again.

use std::path::Path;
use std::sync::Arc;

use object_store::path::Path as Key;
use object_store::ObjectStore;
use tokio_stream::StreamExt;

use super::fetched::{InUse, FETCHED_PREFIX};
use super::{archive, inspect, io, sha256_hex, Uploads};
use crate::engine::data::DatasetFormat;
use crate::error::ApiError;

const ARCHIVES: [&str; 4] = [".tar", ".tar.gz", ".tgz", ".zip"];

/// A checked `s3://` URI: the bucket's URL and the key or prefix in it.
pub fn parse(uri: &str) -> Result<(String, String), ApiError> {
    let bad = |what: &str| ApiError::field("dataset.uri", format!("'{uri}' {what}"));
    let rest = uri.strip_prefix("s3://").ok_or_else(|| {
        bad("is not an s3:// URI (s3://BUCKET/KEY.tar.gz or s3://BUCKET/PREFIX/)")
    })?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || key.trim_matches('/').is_empty() {
        return Err(bad(
            "names no bucket and key (s3://BUCKET/KEY.tar.gz or s3://BUCKET/PREFIX/)",
        ));
    }
    if key.split('/').any(|p| p == ".." || p == ".") {
        return Err(bad("has '.' or '..' in its key"));
    }
    Ok((format!("s3://{bucket}"), key.to_string()))
}

fn unavailable(uri: &str, e: object_store::Error) -> ApiError {
    match e {
        object_store::Error::NotFound { .. } => {
            ApiError::NotFound(format!("dataset.uri: '{uri}' does not exist"))
        }
        e => ApiError::Unavailable(format!("dataset.uri: '{uri}' could not be read: {e}")),
    }
}

/// Makes the dataset at `uri` present in the cache dir; its job path (`fetched:…`), and the
/// tree held until the caller is done with it.
pub async fn fetch(
    uploads: &Arc<Uploads>,
    uri: &str,
    format: DatasetFormat,
) -> Result<(String, InUse), ApiError> {
    let (bucket, key) = parse(uri)?;
    let (store, _) = crate::artifacts::bucket(&uploads.s3, &bucket)
        .map_err(|e| ApiError::FailedPrecondition(format!("dataset.uri: {e:#}")))?;
    let is_archive = ARCHIVES.iter().any(|s| key.ends_with(s));
    // Every object with its size and ETag: the content's id.
    let objects: Vec<object_store::ObjectMeta> = if is_archive {
        vec![store
            .head(&Key::from(key.as_str()))
            .await
            .map_err(|e| unavailable(uri, e))?]
    } else {
        let prefix = Key::from(key.trim_end_matches('/'));
        let listed: Vec<_> = store.list(Some(&prefix)).collect().await;
        listed
            .into_iter()
            .filter(|o| !o.as_ref().is_ok_and(|o| o.location.as_ref().ends_with('/')))
            .collect::<Result<_, _>>()
            .map_err(|e| unavailable(uri, e))?
    };
    if objects.is_empty() {
        return Err(ApiError::NotFound(format!(
            "dataset.uri: no objects under '{uri}'"
        )));
    }
    let limits = uploads.limits;
    let total: u64 = objects.iter().map(|o| o.size).sum();
    if total > limits.bytes || objects.len() as u64 > limits.entries {
        return Err(ApiError::ResourceExhausted(format!(
            "dataset.uri: '{uri}' holds {} objects of {total} bytes; the limits are {} entries and \
             {} bytes (--max-dataset-entries, --max-dataset-bytes)",
            objects.len(),
            limits.entries,
            limits.bytes
        )));
    }
    let listing: String = objects
        .iter()
        .map(|o| {
            let etag = o.e_tag.as_deref().unwrap_or("");
            format!("{uri}\n{}\n{}\n{etag}\n", o.location, o.size)
        })
        .collect();
    let id = sha256_hex(listing.as_bytes()).map_err(io("naming the dataset"))?;
    let (root, in_use) = match uploads.hold_fetched(&id) {
        Some(held) => {
            let tree = uploads.fetched.tree(&id);
            let root = tokio::task::spawn_blocking(move || inspect::inspect(&tree, format))
                .await
                .map_err(|e| ApiError::internal(anyhow::anyhow!("reading the dataset: {e}")))??
                .root;
            (root, held)
        }
        None => {
            let temp = uploads.fetched_temp(&id)?;
            let archive = if is_archive {
                let file = tempfile::Builder::new()
                    .prefix(".archive.tmp-")
                    .tempfile_in(&uploads.fetched.dir)
                    .map_err(io("fetching the dataset"))?;
                download(store.as_ref(), &objects[0].location, file.path(), uri).await?;
                Some(file)
            } else {
                let prefix = Key::from(key.trim_end_matches('/'));
                for o in &objects {
                    let rel: Vec<String> = o
                        .location
                        .prefix_match(&prefix)
                        .map(|parts| parts.map(|p| p.as_ref().to_string()).collect())
                        .unwrap_or_default();
                    let rel = rel.join("/");
                    if rel.is_empty() {
                        continue;
                    }
                    let dest = archive::safe_path(temp.path(), Path::new(&rel))?;
                    download(store.as_ref(), &o.location, &dest, uri).await?;
                }
                None
            };
            let uploads = uploads.clone();
            tokio::task::spawn_blocking(move || {
                if let Some(file) = archive {
                    archive::extract(file.path(), temp.path(), uploads.limits)?;
                }
                let (inspected, held) = uploads.adopt_fetched(temp, &id, format)?;
                Ok::<_, ApiError>((inspected.root, held))
            })
            .await
            .map_err(|e| ApiError::internal(anyhow::anyhow!("storing the dataset: {e}")))??
        }
    };
    let id = &in_use.id;
    let path = match root.as_str() {
        "" => format!("{FETCHED_PREFIX}{id}"),
        root => format!("{FETCHED_PREFIX}{id}/{root}"),
    };
    Ok((path, in_use))
}

async fn download(
    store: &dyn ObjectStore,
    key: &Key,
    dest: &Path,
    uri: &str,
) -> Result<(), ApiError> {
    let bytes = store
        .get(key)
        .await
        .map_err(|e| unavailable(uri, e))?
        .bytes()
        .await
        .map_err(|e| unavailable(uri, e))?;
    if let Some(parent) = dest.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(io("fetching the dataset"))?;
    }
    tokio::fs::write(dest, &bytes)
        .await
        .map_err(io("fetching the dataset"))
}

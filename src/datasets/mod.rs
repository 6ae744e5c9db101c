//! Datasets a job may name: paths resolved strictly inside the datasets root, class counts
//! known before training starts, and CIFAR archives downloaded on demand.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

mod download;
pub mod upload;

use crate::engine::data::{DatasetFormat, DatasetSpec, Splits};
use crate::error::ApiError;
use download::download_cifar;
pub use download::DownloadSource;

/// Official archives (checksums as published with them).
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const CIFAR10_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
pub const CIFAR100_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz";
pub const CIFAR100_MD5: &str = "03b5dce01913d631647c71ecec9e9cb8";

/// The server's datasets root and download policy.
#[derive(Clone, Debug)]
pub struct Datasets {
    pub root: PathBuf,
    pub allow_download: bool,
    pub cifar10: DownloadSource,
    pub cifar100: DownloadSource,
    /// Uploaded datasets (`dataset_path` `upload:<sha256>/<root>`).
    pub uploads: Arc<upload::Uploads>,
}

/// A dataset request that passed validation.
#[derive(Clone, Debug)]
pub struct ResolvedDataset {
    pub spec: DatasetSpec,
    pub num_classes: usize,
    /// Not on disk yet: the job downloads it first.
    pub needs_download: bool,
}

fn marker(format: DatasetFormat) -> &'static str {
    match format {
        DatasetFormat::Cifar10 => "data_batch_1.bin",
        DatasetFormat::Cifar100 => "train.bin",
        DatasetFormat::ImageFolder => "",
    }
}

impl Datasets {
    /// Checks a `{format, path}` request: the path must stay inside the root and the data
    /// must be there (or downloadable).
    pub fn resolve(&self, format: &str, path: &str) -> Result<ResolvedDataset, ApiError> {
        let format: DatasetFormat = format
            .parse()
            .map_err(|e: String| ApiError::field("dataset.format", e))?;
        let fetched = path.strip_prefix(upload::fetched::FETCHED_PREFIX);
        let (base, path) = match (path.strip_prefix(upload::UPLOAD_PREFIX), fetched) {
            (Some(rest), _) => (&self.uploads.dir, rest),
            (_, Some(rest)) => (&self.uploads.fetched.dir, rest),
            _ => (&self.root, path),
        };
        let rel = Path::new(path);
        if path.is_empty() {
            return Err(ApiError::field(
                "dataset.path",
                "is empty; expected a directory relative to the datasets root",
            ));
        }
        let escapes = rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if escapes {
            return Err(ApiError::field(
                "dataset.path",
                format!("'{path}' escapes the datasets root (use a relative path without '..')"),
            ));
        }
        let full = base.join(rel);
        if full.exists() {
            // A symlink may still lead outside the root.
            let (canon, root) = (full.canonicalize(), base.canonicalize());
            if let (Ok(canon), Ok(root)) = (canon, root) {
                if !canon.starts_with(&root) {
                    return Err(ApiError::field(
                        "dataset.path",
                        format!("'{path}' escapes the datasets root through a link"),
                    ));
                }
            }
        }
        let num_classes = match format {
            DatasetFormat::Cifar10 => 10,
            DatasetFormat::Cifar100 => 100,
            DatasetFormat::ImageFolder => folder_classes(&full).ok_or_else(|| {
                ApiError::FailedPrecondition(format!(
                    "no image folder at {}: put one sub-folder of PNG/JPEG images per class there",
                    full.display()
                ))
            })?,
        };
        let present = format == DatasetFormat::ImageFolder || full.join(marker(format)).exists();
        if !present && !self.allow_download {
            return Err(ApiError::FailedPrecondition(format!(
                "dataset not found: {} has no {}. Put the official binary files there \
                 (extract the {} archive's *.bin files into it), or start the server with \
                 --allow-download",
                full.display(),
                marker(format),
                if format == DatasetFormat::Cifar10 {
                    "cifar-10-binary.tar.gz"
                } else {
                    "cifar-100-binary.tar.gz"
                },
            )));
        }
        Ok(ResolvedDataset {
            spec: DatasetSpec { format, path: full },
            num_classes,
            needs_download: !present,
        })
    }

    /// Downloads the dataset if needed, then reads and splits it (blocking). `progress`
    /// returns false to abandon a download.
    pub fn prepare(
        &self,
        dataset: &ResolvedDataset,
        progress: &mut dyn FnMut(&str, u64, u64) -> bool,
    ) -> anyhow::Result<Splits> {
        let spec = &dataset.spec;
        if spec.format != DatasetFormat::ImageFolder
            && !spec.path.join(marker(spec.format)).exists()
        {
            anyhow::ensure!(
                self.allow_download,
                "dataset {} disappeared and downloads are off",
                spec.path.display()
            );
            let source = match spec.format {
                DatasetFormat::Cifar10 => &self.cifar10,
                _ => &self.cifar100,
            };
            download_cifar(
                source,
                &self.root,
                &spec.path,
                marker(spec.format),
                progress,
            )?;
        }
        Ok(spec.load()?)
    }
}

/// Number of class sub-folders of an image folder (of `train/` when it has one).
fn folder_classes(dir: &Path) -> Option<usize> {
    let dir = if dir.join("train").is_dir() && dir.join("test").is_dir() {
        dir.join("train")
    } else {
        dir.to_path_buf()
    };
    let n = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .count();
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests;

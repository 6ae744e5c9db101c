//! What an extracted upload holds: where the dataset's folder is, its classes and images per
//! class, and the files that were skipped (removed, with the reason), so that a job reads
//! only what it can decode.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::data::DatasetFormat;
use crate::error::ApiError;

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
/// Skipped files listed in full; beyond, only counted.
const SKIPPED_LISTED: usize = 100;
/// Folders a dataset may sit under inside its archive (`tar czf x.tgz photos/`: one).
const MAX_WRAPPING: usize = 3;

/// GetDataset's view of an upload.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Inspected {
    /// The dataset's folder inside the extracted tree, `/`-separated (`""`: the tree).
    pub root: String,
    /// `(class, images)`, in class order (CIFAR: none; its records are counted in `images`).
    pub classes: Vec<(String, u64)>,
    pub images: u64,
    /// `(path inside the archive, reason)`, the first [`SKIPPED_LISTED`].
    pub skipped: Vec<(String, String)>,
    pub skipped_count: u64,
}

fn sorted(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    entries.sort();
    entries
}

fn hidden(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.starts_with('.') || name == "__MACOSX"
}

/// The folder the dataset starts at: the tree, or the single folder that wraps it (one that
/// `wraps` accepts: an image folder's class folders hold no folders).
fn dataset_root(
    tree: &Path,
    is_root: impl Fn(&Path) -> bool,
    wraps: impl Fn(&Path) -> bool,
) -> PathBuf {
    let mut dir = tree.to_path_buf();
    for _ in 0..MAX_WRAPPING {
        if is_root(&dir) {
            break;
        }
        let visible: Vec<PathBuf> = sorted(&dir).into_iter().filter(|p| !hidden(p)).collect();
        match visible.as_slice() {
            [only] if only.is_dir() && wraps(only) => dir = only.clone(),
            _ => break,
        }
    }
    dir
}

fn has_folders(dir: &Path) -> bool {
    sorted(dir).iter().any(|p| p.is_dir() && !hidden(p))
}

fn relative(tree: &Path, p: &Path) -> String {
    p.strip_prefix(tree)
        .unwrap_or(p)
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Inspects the extracted `tree` as a dataset of `format`; refuses one a job could not train on.
pub fn inspect(tree: &Path, format: DatasetFormat) -> Result<Inspected, ApiError> {
    match format {
        DatasetFormat::ImageFolder => image_folder(tree),
        DatasetFormat::Cifar10 => cifar(tree, "data_batch_1.bin", 3073),
        DatasetFormat::Cifar100 => cifar(tree, "train.bin", 3074),
    }
}

fn cifar(tree: &Path, marker: &str, record: u64) -> Result<Inspected, ApiError> {
    let root = dataset_root(tree, |d| d.join(marker).is_file(), |_| true);
    if !root.join(marker).is_file() {
        return Err(ApiError::field(
            "archive",
            format!("holds no {marker}: put the official binary files in it"),
        ));
    }
    let images = sorted(&root)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .filter_map(|p| p.metadata().ok())
        .map(|m| m.len() / record)
        .sum();
    Ok(Inspected {
        root: relative(tree, &root),
        images,
        ..Default::default()
    })
}

/// Whether `file` is a PNG or JPEG whose header decodes; the reason when not.
fn check_image(file: &Path) -> Result<(), String> {
    let ext = file
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
        return Err("not a .png/.jpg/.jpeg file".into());
    }
    image::ImageReader::open(file)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| e.to_string())?
        .into_dimensions()
        .map(|_| ())
        .map_err(|e| format!("not a decodable image ({e})"))
}

fn image_folder(tree: &Path) -> Result<Inspected, ApiError> {
    let split = |d: &Path| d.join("train").is_dir() && d.join("test").is_dir();
    let root = dataset_root(tree, split, has_folders);
    let mut out = Inspected {
        root: relative(tree, &root),
        ..Default::default()
    };
    let parts = if split(&root) {
        vec![root.join("train"), root.join("test")]
    } else {
        vec![root.clone()]
    };
    for part in &parts {
        let mut classes = 0;
        for entry in sorted(part).into_iter().filter(|p| !hidden(p)) {
            if !entry.is_dir() {
                out.skip(tree, &entry, "not in a class folder".into());
                continue;
            }
            classes += 1;
            let name = relative(part, &entry);
            let mut images = 0;
            for file in sorted(&entry) {
                match check_image(&file) {
                    Ok(()) => images += 1,
                    Err(reason) => {
                        // Removed, so that the job's loader never meets it.
                        let _ =
                            std::fs::remove_dir_all(&file).or_else(|_| std::fs::remove_file(&file));
                        out.skip(tree, &file, reason);
                    }
                }
            }
            if images == 0 {
                return Err(ApiError::field(
                    "archive",
                    format!(
                        "class folder '{}' has no PNG/JPEG images",
                        relative(tree, &entry)
                    ),
                ));
            }
            out.images += images;
            if part == &parts[0] {
                out.classes.push((name, images));
            }
        }
        if classes < 2 {
            return Err(ApiError::field(
                "archive",
                format!(
                    "'{}' has {classes} class folder(s); an image folder needs at least 2 \
                     (one sub-folder of PNG/JPEG images per class)",
                    relative(tree, part)
                ),
            ));
        }
    }
    Ok(out)
}

impl Inspected {
    fn skip(&mut self, tree: &Path, file: &Path, reason: String) {
        self.skipped_count += 1;
        if self.skipped.len() < SKIPPED_LISTED {
            self.skipped.push((relative(tree, file), reason));
        }
    }
}

//! Datasets: CIFAR binaries and image folders, the reference splits, augmentation and the
//! prefetching batch loader.

mod augment;
mod cifar;
mod folder;
mod loader;
mod set;

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

pub use augment::{Augmenter, CropFlip, Taps};
pub use cifar::{cifar_hint, read_test, read_train, write_cifar10, CifarKind, PIXELS, SIDE};
pub use folder::{decode_planar, planar_to_rgb, read_image_folder, rgb_to_planar};
pub use loader::{mix64, rng_for, Batch, EpochPlan, Loader};
pub use set::{DataError, ImageSet, Split, Splits};

/// On-disk format of a dataset.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    strum::Display,
    strum::EnumIter,
)]
#[serde(rename_all = "kebab-case")]
#[strum(parse_err_ty = String, parse_err_fn = unknown_format)]
pub enum DatasetFormat {
    #[strum(to_string = "cifar10", serialize = "cifar-10")]
    Cifar10,
    #[strum(to_string = "cifar100", serialize = "cifar-100")]
    Cifar100,
    #[strum(to_string = "image-folder", serialize = "imagefolder")]
    ImageFolder,
}

fn unknown_format(name: &str) -> String {
    crate::names::unknown::<DatasetFormat>("dataset format", name)
}

/// A dataset on disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub format: DatasetFormat,
    pub path: PathBuf,
}

/// The validation share of the training images (10,000 of CIFAR's 50,000).
pub const VAL_FRACTION: f64 = 0.2;
/// Side at which image-folder images are stored before augmentation.
pub const FOLDER_SIDE: usize = 32;

impl DatasetSpec {
    /// Guesses the format from the directory's contents.
    pub fn detect(path: &Path) -> Self {
        let format = if path.join("data_batch_1.bin").exists() {
            DatasetFormat::Cifar10
        } else if path.join("train.bin").exists() {
            DatasetFormat::Cifar100
        } else {
            DatasetFormat::ImageFolder
        };
        Self {
            format,
            path: path.to_path_buf(),
        }
    }

    /// Reads the dataset and splits it as the reference does.
    ///
    /// An image folder with `train/` and `test/` sub-folders uses them; otherwise its images
    /// are shuffled once (fixed seed, so the split is stable) before the validation cut.
    pub fn load(&self) -> Result<Splits, DataError> {
        let kind = match self.format {
            DatasetFormat::Cifar10 => CifarKind::Cifar10,
            DatasetFormat::Cifar100 => CifarKind::Cifar100,
            DatasetFormat::ImageFolder => return self.load_folder(),
        };
        let train = read_train(&self.path, kind)?;
        let test = read_test(&self.path, kind).ok();
        Ok(Splits::new(train, test, VAL_FRACTION))
    }

    fn load_folder(&self) -> Result<Splits, DataError> {
        let (train_dir, test_dir) = (self.path.join("train"), self.path.join("test"));
        if train_dir.is_dir() && test_dir.is_dir() {
            let train = shuffled(read_image_folder(&train_dir, FOLDER_SIDE)?);
            let test = read_image_folder(&test_dir, FOLDER_SIDE)?;
            if test.class_names != train.class_names {
                return Err(DataError::Invalid {
                    path: test_dir,
                    message: "test classes differ from train classes".into(),
                });
            }
            return Ok(Splits::new(train, Some(test), VAL_FRACTION));
        }
        let set = shuffled(read_image_folder(&self.path, FOLDER_SIDE)?);
        Ok(Splits::new(set, None, VAL_FRACTION))
    }
}

/// Puts an image set in a fixed pseudo-random order (so a tail split mixes all classes).
fn shuffled(set: ImageSet) -> ImageSet {
    let mut order: Vec<usize> = (0..set.len()).collect();
    order.shuffle(&mut rng_for(0x71b, 0, 0, 0));
    let mut out = ImageSet {
        side: set.side,
        pixels: Vec::with_capacity(set.pixels.len()),
        labels: Vec::with_capacity(set.len()),
        class_names: set.class_names.clone(),
    };
    for i in order {
        out.pixels.extend_from_slice(set.image(i));
        out.labels.push(set.labels[i]);
    }
    out
}

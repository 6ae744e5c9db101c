//! In-memory image sets: decoded once, stored as planar RGB8, shared between splits.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// Why a dataset could not be read. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: missing ({hint})")]
    Missing { path: PathBuf, hint: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: size {size} bytes is not a whole number of {record}-byte records")]
    BadSize {
        path: PathBuf,
        size: u64,
        record: usize,
    },
    #[error("{path}: record {index} has label {label}, but there are only {classes} classes")]
    BadLabel {
        path: PathBuf,
        index: usize,
        label: u8,
        classes: usize,
    },
    #[error("{path}: cannot decode image: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::Missing {
                path,
                hint: "file not found".into(),
            }
        } else {
            Self::Io { path, source }
        }
    }
}

/// Images of one size, `side × side`, stored planar (R plane, G plane, B plane) per image:
/// exactly the CIFAR binary layout, so CIFAR records are used without rearranging.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub side: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u16>,
    pub class_names: Vec<String>,
}

impl ImageSet {
    pub fn image_len(&self) -> usize {
        3 * self.side * self.side
    }
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[i * n..(i + 1) * n]
    }
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }
}

/// A contiguous range of an [`ImageSet`], shared without copying.
#[derive(Debug, Clone)]
pub struct Split {
    pub set: Arc<ImageSet>,
    pub range: Range<usize>,
}

impl Split {
    pub fn whole(set: Arc<ImageSet>) -> Self {
        let range = 0..set.len();
        Self { set, range }
    }
    pub fn len(&self) -> usize {
        self.range.len()
    }
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
    /// The `i`-th image of this split and its label.
    pub fn get(&self, i: usize) -> (&[u8], u16) {
        let j = self.range.start + i;
        (self.set.image(j), self.set.labels[j])
    }
}

/// Train / validation / test, as the reference splits CIFAR: the last `val_fraction` of the
/// training file(s) is the validation split (10,000 of 50,000 for CIFAR-10).
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: Split,
    pub val: Split,
    pub test: Option<Split>,
}

impl Splits {
    pub fn new(train: ImageSet, test: Option<ImageSet>, val_fraction: f64) -> Self {
        let n = train.len();
        let n_val = ((n as f64) * val_fraction).round() as usize;
        let train = Arc::new(train);
        Self {
            train: Split {
                set: train.clone(),
                range: 0..n - n_val,
            },
            val: Split {
                set: train,
                range: n - n_val..n,
            },
            test: test.map(|t| Split::whole(Arc::new(t))),
        }
    }

    pub fn class_names(&self) -> &[String] {
        &self.train.set.class_names
    }
}

//! Readers for the official CIFAR-10 and CIFAR-100 binary layouts.
//!
//! CIFAR-10: `data_batch_{1..5}.bin`, `test_batch.bin`, `batches.meta.txt`; a record is one
//! label byte and 3072 pixel bytes (R, G, B planes of 32×32). CIFAR-100: `train.bin`,
//! `test.bin`, `fine_label_names.txt`; a record is a coarse and a fine label byte, then pixels.

use std::path::{Path, PathBuf};

use super::set::{DataError, ImageSet};

pub const SIDE: usize = 32;
pub const PIXELS: usize = 3 * SIDE * SIDE;

/// Which of the two CIFAR binary formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    Cifar10,
    Cifar100,
}

impl CifarKind {
    fn label_bytes(self) -> usize {
        match self {
            Self::Cifar10 => 1,
            Self::Cifar100 => 2,
        }
    }
    fn num_classes(self) -> usize {
        match self {
            Self::Cifar10 => 10,
            Self::Cifar100 => 100,
        }
    }
    pub fn train_files(self) -> Vec<&'static str> {
        match self {
            Self::Cifar10 => vec![
                "data_batch_1.bin",
                "data_batch_2.bin",
                "data_batch_3.bin",
                "data_batch_4.bin",
                "data_batch_5.bin",
            ],
            Self::Cifar100 => vec!["train.bin"],
        }
    }
    pub fn test_file(self) -> &'static str {
        match self {
            Self::Cifar10 => "test_batch.bin",
            Self::Cifar100 => "test.bin",
        }
    }
    fn meta_file(self) -> &'static str {
        match self {
            Self::Cifar10 => "batches.meta.txt",
            Self::Cifar100 => "fine_label_names.txt",
        }
    }
}

/// Class names from the meta file (one per line), or `class_N` when it is absent.
fn class_names(dir: &Path, kind: CifarKind) -> Result<Vec<String>, DataError> {
    let path = dir.join(kind.meta_file());
    let names: Vec<String> = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(DataError::io(path, e)),
    };
    if names.is_empty() {
        return Ok((0..kind.num_classes())
            .map(|i| format!("class_{i}"))
            .collect());
    }
    if names.len() != kind.num_classes() {
        return Err(DataError::Invalid {
            path,
            message: format!(
                "expected {} class names, found {}",
                kind.num_classes(),
                names.len()
            ),
        });
    }
    Ok(names)
}

/// Appends one binary file's records to `set`, checking size and labels.
fn read_file(path: &Path, kind: CifarKind, set: &mut ImageSet) -> Result<(), DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let record = kind.label_bytes() + PIXELS;
    if bytes.is_empty() || bytes.len() % record != 0 {
        return Err(DataError::BadSize {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            record,
        });
    }
    let n = bytes.len() / record;
    set.pixels.reserve(n * PIXELS);
    set.labels.reserve(n);
    for (index, rec) in bytes.chunks_exact(record).enumerate() {
        // CIFAR-100: the fine label (second byte) is the class.
        let label = rec[kind.label_bytes() - 1];
        if label as usize >= kind.num_classes() {
            return Err(DataError::BadLabel {
                path: path.to_path_buf(),
                index,
                label,
                classes: kind.num_classes(),
            });
        }
        set.labels.push(label as u16);
        set.pixels.extend_from_slice(&rec[kind.label_bytes()..]);
    }
    Ok(())
}

fn read_files(dir: &Path, kind: CifarKind, files: &[PathBuf]) -> Result<ImageSet, DataError> {
    let mut set = ImageSet {
        side: SIDE,
        pixels: Vec::new(),
        labels: Vec::new(),
        class_names: class_names(dir, kind)?,
    };
    for f in files {
        read_file(f, kind, &mut set)?;
    }
    Ok(set)
}

/// Reads the test file of a CIFAR directory.
pub fn read_test(dir: &Path, kind: CifarKind) -> Result<ImageSet, DataError> {
    let file = dir.join(kind.test_file());
    if !file.exists() {
        return Err(DataError::Missing {
            path: file,
            hint: cifar_hint(kind),
        });
    }
    read_files(dir, kind, &[file])
}

/// Where the files are expected, for error messages.
pub fn cifar_hint(kind: CifarKind) -> String {
    format!(
        "expected the official binary layout: {} and {}",
        kind.train_files().join(", "),
        kind.test_file()
    )
}

/// Reads the training files present in `dir` (a subset such as cifar10-mini ships only
/// `data_batch_1.bin`); at least the first must exist.
pub fn read_train(dir: &Path, kind: CifarKind) -> Result<ImageSet, DataError> {
    let files: Vec<PathBuf> = kind
        .train_files()
        .iter()
        .map(|f| dir.join(f))
        .filter(|f| f.exists())
        .collect();
    if files.is_empty() {
        return Err(DataError::Missing {
            path: dir.join(kind.train_files()[0]),
            hint: cifar_hint(kind),
        });
    }
    read_files(dir, kind, &files)
}

/// Writes records in the CIFAR-10 binary layout (for tests and tools that make small sets).
pub fn write_cifar10(path: &Path, images: &[[u8; PIXELS]], labels: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(images.len() * (PIXELS + 1));
    for (img, &label) in images.iter().zip(labels) {
        out.push(label);
        out.extend_from_slice(img);
    }
    std::fs::write(path, out)
}

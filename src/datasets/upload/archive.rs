//! Extraction of an uploaded archive (`.tar`, `.tar.gz` or `.zip`) that cannot write outside its
//! folder or fill the disk: every entry's path is checked before anything is written, links
//! are refused, and the expanded size and entry count are bounded as the archive is read.

use std::io::{BufReader, Read};
use std::path::{Component, Path, PathBuf};

use crate::error::ApiError;

/// How much an archive may expand to.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of all files together.
    pub bytes: u64,
    /// Entries (files, folders) together.
    pub entries: u64,
}

/// What was extracted.
#[derive(Debug, Default)]
pub struct Extracted {
    pub bytes: u64,
    pub files: u64,
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZIP_MAGIC: [u8; 4] = *b"PK\x03\x04";

fn entry_error(path: &str, what: &str) -> ApiError {
    ApiError::field(
        "archive",
        format!("entry '{path}' {what}; nothing was stored"),
    )
}

/// The entry's path inside `dest`, or why it may not be written.
pub(super) fn safe_path(dest: &Path, raw: &Path) -> Result<PathBuf, ApiError> {
    let shown = raw.to_string_lossy();
    let mut out = dest.to_path_buf();
    for c in raw.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(entry_error(&shown, "leaves the archive ('..')")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(entry_error(&shown, "is an absolute path"))
            }
        }
    }
    Ok(out)
}

/// Extracts the archive at `file` into `dest` (which must exist and be empty).
pub fn extract(file: &Path, dest: &Path, limits: Limits) -> Result<Extracted, ApiError> {
    let io = |e: std::io::Error| ApiError::internal(anyhow::anyhow!("reading the upload: {e}"));
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(file)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(io)?;
    if n == 4 && magic == ZIP_MAGIC {
        return unzip(std::fs::File::open(file).map_err(io)?, dest, limits);
    }
    let reader = BufReader::new(std::fs::File::open(file).map_err(io)?);
    if n >= 2 && magic[..2] == GZIP_MAGIC {
        unpack(flate2::read::GzDecoder::new(reader), dest, limits)
    } else {
        unpack(reader, dest, limits)
    }
}

fn unpack(reader: impl Read, dest: &Path, limits: Limits) -> Result<Extracted, ApiError> {
    let bad = |e: std::io::Error| {
        ApiError::field("archive", format!("is not a readable tar archive ({e})"))
    };
    let write =
        |e: std::io::Error| ApiError::internal(anyhow::anyhow!("extracting the upload: {e}"));
    let mut archive = tar::Archive::new(reader);
    let mut done = Extracted::default();
    let mut entries = 0u64;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        entries += 1;
        if entries > limits.entries {
            return Err(ApiError::ResourceExhausted(format!(
                "archive: more than {} entries; nothing was stored",
                limits.entries
            )));
        }
        let raw = entry.path().map_err(bad)?.into_owned();
        let shown = raw.to_string_lossy().into_owned();
        let path = safe_path(dest, &raw)?;
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            return Err(entry_error(&shown, "is a link"));
        }
        if kind.is_dir() {
            std::fs::create_dir_all(&path).map_err(write)?;
            continue;
        }
        if !kind.is_file() {
            // Devices, FIFOs, tar metadata: nothing to store.
            continue;
        }
        let size = entry.header().size().map_err(bad)?;
        // The header's size bounds what the entry yields.
        done.write(&path, size, &mut entry, limits)
            .map_err(|e| e.or(bad))?;
    }
    Ok(done)
}

/// What went wrong writing one file: the limit, or a read or write error.
enum WriteError {
    Api(ApiError),
    Read(std::io::Error),
}

impl WriteError {
    /// The ApiError, with read errors described by `bad`.
    fn or(self, bad: impl Fn(std::io::Error) -> ApiError) -> ApiError {
        match self {
            Self::Api(e) => e,
            Self::Read(e) => bad(e),
        }
    }
}

impl Extracted {
    /// Writes one file of `size` bytes from `from` to `path`, within the limits: at most the
    /// bytes left under `--max-dataset-bytes` are read, whatever the archive claims.
    fn write(
        &mut self,
        path: &Path,
        size: u64,
        from: &mut impl Read,
        limits: Limits,
    ) -> Result<(), WriteError> {
        let over = || {
            WriteError::Api(ApiError::ResourceExhausted(format!(
                "archive: expands to more than {} bytes (--max-dataset-bytes); nothing was stored",
                limits.bytes
            )))
        };
        let left = limits.bytes.saturating_sub(self.bytes);
        if size > left {
            return Err(over());
        }
        let write = |e: std::io::Error| {
            WriteError::Api(ApiError::internal(anyhow::anyhow!(
                "extracting the upload: {e}"
            )))
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(write)?;
        }
        let mut out = std::fs::File::create(path).map_err(write)?;
        let copied = std::io::copy(&mut from.take(left + 1), &mut out).map_err(WriteError::Read)?;
        if copied > left {
            return Err(over());
        }
        self.bytes += copied;
        self.files += 1;
        Ok(())
    }
}

/// [`unpack`] for a zip archive: the same checks, the entries read from its central directory.
fn unzip(file: std::fs::File, dest: &Path, limits: Limits) -> Result<Extracted, ApiError> {
    let bad = |e: zip::result::ZipError| {
        ApiError::field("archive", format!("is not a readable zip archive ({e})"))
    };
    let bad_io = |e: std::io::Error| bad(e.into());
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(bad)?;
    if archive.len() as u64 > limits.entries {
        return Err(ApiError::ResourceExhausted(format!(
            "archive: more than {} entries; nothing was stored",
            limits.entries
        )));
    }
    let mut done = Extracted::default();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(bad)?;
        let raw = PathBuf::from(entry.name());
        let path = safe_path(dest, &raw)?;
        if entry.is_symlink() {
            return Err(entry_error(entry.name(), "is a link"));
        }
        if entry.is_dir() {
            std::fs::create_dir_all(&path)
                .map_err(|e| ApiError::internal(anyhow::anyhow!("extracting the upload: {e}")))?;
            continue;
        }
        let size = entry.size();
        done.write(&path, size, &mut entry, limits)
            .map_err(|e| e.or(bad_io))?;
    }
    Ok(done)
}

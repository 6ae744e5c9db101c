//! One server per data dir: an exclusive lock on `<data-dir>/tlb.lock`, held for the server's
//! life. The kernel drops it when the process dies (kill -9 included), so it never goes stale.
//! (Several servers sharing one job store is done through PostgreSQL and leases instead.)

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::host::host_name;

/// Holds the data dir's lock until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Takes the lock or says which process holds it.
    pub fn acquire(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let path = data_dir.join("tlb.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                bail!(
                    "data dir {} in use by {} (it holds {}); stop that server or give this \
                     one another --data-dir",
                    data_dir.display(),
                    if holder.is_empty() {
                        "another process"
                    } else {
                        holder
                    },
                    path.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "pid {} on host {}", std::process::id(), host_name())?;
        file.sync_all()?;
        Ok(Self { _file: file })
    }
}

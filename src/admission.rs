//! What the machine can give a new job: free space in the data dir and the memory a process
//! may use. StartTraining refuses, at once and with the figures, a job that cannot fit.

use std::path::{Path, PathBuf};

use crate::engine::backend::DeviceSpec;
use crate::engine::train::{human_bytes, TrainConfig};
use crate::error::ApiError;

/// The resource checks StartTraining makes.
#[derive(Clone, Debug)]
pub struct Admission {
    pub data_dir: PathBuf,
    /// Free bytes the data dir keeps beyond a job's checkpoints (for the job store).
    pub min_free_bytes: u64,
    pub device: DeviceSpec,
    /// The training device's memory as the operator states it (`--device-memory`); unset,
    /// the CPU's is read from the system, and a GPU's is not checked.
    pub device_memory: Option<u64>,
}

/// Bytes an unprivileged process may still write under `path`.
pub fn free_disk_bytes(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

fn meminfo_bytes(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn vm_size_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmSize:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The cgroup v2 memory limit of this process, if one is set.
fn cgroup_limit_bytes() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{rel}/memory.max")).ok()?;
    max.trim().parse().ok()
}

/// The memory this process can still get on the CPU, and what limits it: the host's RAM, a
/// cgroup limit, or the address-space limit (`ulimit -v`) less what is mapped already.
pub fn cpu_memory_limit() -> Option<(u64, String)> {
    let mut limits: Vec<(u64, String)> = Vec::new();
    if let Some(total) = meminfo_bytes("MemTotal:") {
        limits.push((total, "the host's memory".into()));
    }
    if let Some(cg) = cgroup_limit_bytes() {
        limits.push((cg, "the cgroup's memory.max".into()));
    }
    // `None`: unlimited.
    if let Some(cap) = rustix::process::getrlimit(rustix::process::Resource::As).current {
        let left = cap.saturating_sub(vm_size_bytes().unwrap_or(0));
        limits.push((
            left,
            "the address-space limit (ulimit -v) less what is mapped".into(),
        ));
    }
    limits.into_iter().min_by_key(|l| l.0)
}

impl Admission {
    /// Refuses (RESOURCE_EXHAUSTED) a job whose memory cannot fit the device, or one the
    /// data dir has no room for.
    pub fn check(&self, config: &TrainConfig) -> Result<(), ApiError> {
        self.device
            .supports(config.precision)
            .map_err(|e| ApiError::FailedPrecondition(format!("config.precision: {e}")))?;
        let f = config.footprint(self.device.replicas());
        // burn 0.21 has no query for a GPU's memory: unless the operator states it, the
        // crash-loop breaker is the net there.
        let limit = match (self.device_memory, &self.device) {
            (Some(bytes), _) => Some((bytes, "--device-memory".to_string())),
            (None, DeviceSpec::Cpu) => cpu_memory_limit(),
            (None, DeviceSpec::Cuda(_) | DeviceSpec::Wgpu(_)) => None,
        };
        if let Some((limit, what)) = limit {
            if f.memory_bytes() > limit {
                return Err(ApiError::ResourceExhausted(format!(
                    "the job needs about {} of memory ({} parameters: {} for weights, \
                     gradients and AdamW moments; {} of activations for {} images in flight) \
                     but {} leaves {}; use a smaller model, batch_size or micro_batch",
                    human_bytes(f.memory_bytes()),
                    f.params,
                    human_bytes(f.state_bytes),
                    human_bytes(f.activation_bytes),
                    f.images_in_flight,
                    what,
                    human_bytes(limit)
                )));
            }
        }
        let free = free_disk_bytes(&self.data_dir).map_err(|e| {
            ApiError::Unavailable(format!(
                "cannot read the free space of {}: {e}",
                self.data_dir.display()
            ))
        })?;
        let needed = f.disk_bytes() + self.min_free_bytes;
        if free < needed {
            return Err(ApiError::ResourceExhausted(format!(
                "data dir full: {free} bytes free in {}; this job needs about {needed} \
                 ({} checkpoint files of {} plus the {} kept free, --min-free-bytes)",
                self.data_dir.display(),
                f.checkpoint_files,
                human_bytes(f.checkpoint_bytes),
                human_bytes(self.min_free_bytes)
            )));
        }
        Ok(())
    }
}

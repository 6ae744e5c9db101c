//! Backend choice. The CPU backend is `flex` by default (fastest here by measurement) or
//! `ndarray`; the `cuda` feature adds burn-cuda.

use burn::backend::Autodiff;

#[cfg(feature = "flex")]
pub type Cpu = burn::backend::Flex;
#[cfg(all(not(feature = "flex"), feature = "ndarray"))]
pub type Cpu = burn::backend::NdArray<f32>;
#[cfg(not(any(feature = "flex", feature = "ndarray")))]
compile_error!("enable a CPU backend feature: `flex` (default) or `ndarray`");

pub type CpuAutodiff = Autodiff<Cpu>;

/// The backends this build has (`tlb_build_info{backend}`): the CPU one, and `cuda` when built in.
pub const BACKEND: &str = if cfg!(feature = "cuda-autotune") {
    if cfg!(feature = "flex") {
        "flex+cuda-fusion-autotune"
    } else {
        "ndarray+cuda-fusion-autotune"
    }
} else if cfg!(feature = "cuda-fusion") {
    if cfg!(feature = "flex") {
        "flex+cuda-fusion"
    } else {
        "ndarray+cuda-fusion"
    }
} else if cfg!(feature = "cuda") {
    if cfg!(feature = "flex") {
        "flex+cuda"
    } else {
        "ndarray+cuda"
    }
} else if cfg!(feature = "flex") {
    "flex"
} else {
    "ndarray"
};

/// Keeps freed memory in the process (glibc): a training step allocates and frees the same
/// buffers every step, and by default glibc returns large ones to the kernel at once (mmap /
/// trim), so every step paid page faults and page clearing for memory it had a moment ago.
/// Call once at start-up, before threads allocate.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator thresholds; it is called before the
    // program's threads start.
    unsafe {
        // Blocks up to 32 MiB (glibc's maximum) come from the heap, not their own mmap.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // Free memory at the top of a heap stays mapped up to 1 GiB.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

pub fn cpu_device() -> <Cpu as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}

#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<f32, i32>;
#[cfg(feature = "cuda")]
pub type CudaAutodiff = Autodiff<Cuda>;

/// A device named on the command line: `cpu` or (with the `cuda` feature) `cuda:N`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Model replicas for data-parallel work: one per core on the CPU, one on a GPU.
    pub fn replicas(&self) -> usize {
        match self {
            Self::Cpu => crate::engine::train::cpu_threads(),
            Self::Cuda(_) => 1,
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "cpu" {
            return Ok(Self::Cpu);
        }
        let n = s
            .strip_prefix("cuda:")
            .or_else(|| (s == "cuda").then_some("0"))
            .ok_or_else(|| format!("unknown device '{s}' (expected cpu or cuda:N)"))?;
        if !cfg!(feature = "cuda") {
            return Err(format!("device '{s}' needs a build with `--features cuda`"));
        }
        n.parse()
            .map(Self::Cuda)
            .map_err(|_| format!("bad CUDA device index in '{s}'"))
    }
}

/// Runs `$body` with `$B` bound to the autodiff backend of `$spec` and `$device` to its device.
#[macro_export]
macro_rules! with_backend {
    ($spec:expr, |$B:ident, $device:ident| $body:expr) => {{
        match $spec {
            $crate::engine::backend::DeviceSpec::Cpu => {
                type $B = $crate::engine::backend::CpuAutodiff;
                let $device = $crate::engine::backend::cpu_device();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::engine::backend::DeviceSpec::Cuda(n) => {
                type $B = $crate::engine::backend::CudaAutodiff;
                let $device = burn::backend::cuda::CudaDevice::new(n);
                $body
            }
            #[cfg(not(feature = "cuda"))]
            $crate::engine::backend::DeviceSpec::Cuda(_) => unreachable!("parsed only with cuda"),
        }
    }};
}

//! Backend choice. The CPU backend is `flex` by default (fastest here by measurement) or
//! `ndarray`; the `cuda` feature adds burn-cuda, the `wgpu` feature burn-wgpu.

use burn::backend::Autodiff;

#[cfg(feature = "flex")]
pub type Cpu = burn::backend::Flex;
#[cfg(all(not(feature = "flex"), feature = "ndarray"))]
pub type Cpu = burn::backend::NdArray<f32>;
#[cfg(not(any(feature = "flex", feature = "ndarray")))]
compile_error!("enable a CPU backend feature: `flex` (default) or `ndarray`");

pub type CpuAutodiff = Autodiff<Cpu>;

/// The backends this build has (`tlb_build_info{backend}`): the CPU one, then `cuda` (and how
/// it fuses) and `wgpu` when built in, joined by `+`.
pub fn backend_name() -> String {
    let cpu = if cfg!(feature = "flex") {
        "flex"
    } else {
        "ndarray"
    };
    let cuda = if cfg!(feature = "cuda-autotune") {
        "+cuda-fusion-autotune"
    } else if cfg!(feature = "cuda-fusion") {
        "+cuda-fusion"
    } else if cfg!(feature = "cuda") {
        "+cuda"
    } else {
        ""
    };
    let wgpu = if cfg!(feature = "wgpu") { "+wgpu" } else { "" };
    format!("{cpu}{cuda}{wgpu}")
}

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

/// burn's wgpu backend, unfused and without autotune (both slow to start, and fusion has open
/// wrong-result issues): Vulkan, Metal or DX12, and Mesa's lavapipe where there is no GPU.
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu<f32, i32>;
#[cfg(feature = "wgpu")]
pub type WgpuAutodiff = Autodiff<Wgpu>;

/// Which adapter a `wgpu` device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adapter {
    /// wgpu's choice: the most powerful GPU, or a software one (lavapipe) where there is none.
    Default,
    /// The N-th discrete GPU.
    Discrete(usize),
    /// The N-th integrated GPU.
    Integrated(usize),
    /// A software adapter (Mesa's lavapipe): for tests without a GPU.
    Cpu,
}

/// A device named on the command line: `cpu`, `cuda:N` (with the `cuda` feature), `wgpu`,
/// `wgpu:N`, `wgpu:integrated:N` or `wgpu:cpu` (with the `wgpu` feature).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Wgpu(Adapter),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Wgpu(Adapter::Default) => f.write_str("wgpu"),
            Self::Wgpu(Adapter::Discrete(n)) => write!(f, "wgpu:{n}"),
            Self::Wgpu(Adapter::Integrated(n)) => write!(f, "wgpu:integrated:{n}"),
            Self::Wgpu(Adapter::Cpu) => f.write_str("wgpu:cpu"),
        }
    }
}

impl DeviceSpec {
    /// Model replicas for data-parallel work: one per core on the CPU, one on a GPU.
    pub fn replicas(&self) -> usize {
        match self {
            Self::Cpu => crate::engine::train::cpu_threads(),
            Self::Cuda(_) | Self::Wgpu(_) => 1,
        }
    }
}

impl DeviceSpec {
    /// Whether the device computes in `precision`: burn's wgpu backend has no bf16 (WGSL, the
    /// language its kernels compile to, has no such type).
    pub fn supports(&self, precision: crate::engine::model::Precision) -> Result<(), String> {
        match (self, precision) {
            (Self::Wgpu(_), crate::engine::model::Precision::Bf16) => Err(format!(
                "precision bf16 is not available on {self}: burn's wgpu backend compiles to \
                 WGSL, which has no bf16 type; use f32 there (bf16 runs on cpu and cuda)"
            )),
            _ => Ok(()),
        }
    }
}

const EXPECTED: &str = "expected cpu, cuda:N, wgpu, wgpu:N, wgpu:integrated:N or wgpu:cpu";

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "cpu" {
            return Ok(Self::Cpu);
        }
        let index = |n: &str| {
            n.parse::<usize>()
                .map_err(|_| format!("bad device index in '{s}' ({EXPECTED})"))
        };
        let spec = if let Some(n) = s.strip_prefix("cuda:") {
            Self::Cuda(index(n)?)
        } else if s == "cuda" {
            Self::Cuda(0)
        } else if s == "wgpu" {
            Self::Wgpu(Adapter::Default)
        } else if s == "wgpu:cpu" {
            Self::Wgpu(Adapter::Cpu)
        } else if let Some(n) = s.strip_prefix("wgpu:integrated:") {
            Self::Wgpu(Adapter::Integrated(index(n)?))
        } else if let Some(n) = s.strip_prefix("wgpu:") {
            Self::Wgpu(Adapter::Discrete(index(n)?))
        } else {
            return Err(format!("unknown device '{s}' ({EXPECTED})"));
        };
        match spec {
            Self::Cuda(_) if !cfg!(feature = "cuda") => {
                Err(format!("device '{s}' needs a build with `--features cuda`"))
            }
            Self::Wgpu(_) if !cfg!(feature = "wgpu") => {
                Err(format!("device '{s}' needs a build with `--features wgpu`"))
            }
            spec => Ok(spec),
        }
    }
}

/// The wgpu device an adapter names.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(adapter: Adapter) -> burn::backend::wgpu::WgpuDevice {
    use burn::backend::wgpu::WgpuDevice;
    match adapter {
        Adapter::Default => WgpuDevice::DefaultDevice,
        Adapter::Discrete(n) => WgpuDevice::DiscreteGpu(n),
        Adapter::Integrated(n) => WgpuDevice::IntegratedGpu(n),
        Adapter::Cpu => WgpuDevice::Cpu,
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
            #[cfg(feature = "wgpu")]
            $crate::engine::backend::DeviceSpec::Wgpu(adapter) => {
                type $B = $crate::engine::backend::WgpuAutodiff;
                let $device = $crate::engine::backend::wgpu_device(adapter);
                $body
            }
            #[cfg(not(feature = "wgpu"))]
            $crate::engine::backend::DeviceSpec::Wgpu(_) => unreachable!("parsed only with wgpu"),
        }
    }};
}

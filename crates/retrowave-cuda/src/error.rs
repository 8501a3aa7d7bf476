use retrowave_core::BackendError;

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The CUDA driver library (libcuda) is not installed or cannot be loaded.
    #[error("no GPU: the CUDA driver (libcuda.so) was not found on this machine; use --device cpu")]
    NoDriver,
    /// The driver loaded but the requested device does not exist.
    #[error(
        "no GPU {requested}: this machine has {count} CUDA device(s); use --device cpu or cuda:N with N < {count}"
    )]
    NoDevice { requested: usize, count: usize },
    /// A host tier that would take a rank past its share of the node's pinned host budget.
    #[error(
        "host tier: rank {rank} of {ranks} needs {wanted_gib:.2} GiB more pinned host memory but holds {used_gib:.2} GiB of its {share_gib:.2} GiB share of the node's host-tier budget (RETROWAVE_HOST_KV_GIB sets it; default: available memory less 8 GiB)",
        wanted_gib = *wanted as f64 / (1u64 << 30) as f64,
        used_gib = *used as f64 / (1u64 << 30) as f64,
        share_gib = *share as f64 / (1u64 << 30) as f64
    )]
    HostBudget {
        rank: usize,
        ranks: usize,
        wanted: u64,
        used: u64,
        share: u64,
    },
    /// A tensor-parallel group that needs more GPUs than the machine has.
    #[error(
        "tensor parallel {tp} from GPU {first} needs GPUs {first}..={last}, but this machine has {count} GPU(s)",
        last = first + tp - 1
    )]
    NotEnoughDevices {
        tp: usize,
        first: usize,
        count: usize,
    },
    /// A `--device` value that is not `auto`, `cpu`, `cuda` or `cuda:N`.
    #[error("invalid device {0:?}: expected auto, cpu, cuda or cuda:N")]
    BadDeviceSpec(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {what}: {source}")]
    Driver {
        what: String,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// NVRTC is missing or failed to compile a kernel source.
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {what}: {source}")]
    Cublas {
        what: String,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// A kernel the module should contain is missing.
    #[error("kernel {0} not found in the compiled module")]
    MissingKernel(String),
    /// Reading or writing the kernel cache failed.
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A shape or argument the kernels cannot handle.
    #[error("{0}")]
    Unsupported(String),
}

impl CudaError {
    pub(crate) fn driver(
        what: impl Into<String>,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        let what = what.into();
        move |source| CudaError::Driver { what, source }
    }
}

impl CudaError {
    /// Maps a driver error of `what` (for callers outside this crate).
    pub fn driver_error(what: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        move |source| CudaError::Driver {
            what: what.to_string(),
            source,
        }
    }
}

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Driver { what, source }
                if source.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY =>
            {
                BackendError::OutOfMemory(format!("GPU memory exhausted in {what}"))
            }
            e => BackendError::Device(e.to_string()),
        }
    }
}

//! CUDA backend of retrowave.
//!
//! Built on [cudarc] with the driver, NVRTC and cuBLAS loaded at run time, so this crate compiles
//! and its tests run on machines without CUDA: asking for a GPU there is a [`CudaError`] value,
//! never a panic. The kernels are the CUDA C sources in the repository's `kernels/` folder,
//! embedded in the binary and compiled by NVRTC for the device's own architecture the first time
//! they are needed; the compiled module is cached on disk, keyed by the hash of the sources, the
//! compile options, the architecture and the driver and NVRTC versions ([`compile`]).
//!
//! [`CudaBackend`] implements [`retrowave_core::Backend`]: weights are dequantized to bf16 at load,
//! projections are cuBLAS bf16 GEMMs with f32 accumulation, activations are f32, and the KV cache is
//! bf16 in a head-major layout that both attention kernels (flash-decoding with split-K and a
//! tensor-core flash-attention prefill) read directly.

pub mod backend;
pub mod checks;
pub mod compile;
pub mod dequant;
pub mod device;
mod error;
pub mod host_budget;
pub mod nccl;
pub mod pinned;
pub mod timing;
pub mod wave;
pub mod wave_build;
mod wave_checks;
pub mod wave_step;
pub mod wave_tier;

pub use backend::{CudaBackend, DevActs, DevKv, DevMatrix, DevVector};
pub use device::{DeviceInfo, DeviceRequest, cuda_devices};
pub use error::CudaError;
pub use pinned::PinnedBuffer;

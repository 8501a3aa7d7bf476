//! Device discovery and the `--device` choice.

use std::str::FromStr;
use std::sync::Arc;

use cudarc::driver::{CudaContext, sys};

use crate::CudaError;

/// What `--device` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The first GPU if there is one, else the CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// GPU `N`.
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = CudaError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| CudaError::BadDeviceSpec(s.to_string())),
        }
    }
}

impl DeviceRequest {
    /// Resolves `auto`: the GPU ordinal to use, or `None` for the CPU. Asking for a GPU that does
    /// not exist is an error; `auto` without a GPU is the CPU.
    /// The GPUs of a tensor-parallel group of `tp` ranks: consecutive ordinals from the one
    /// [`Self::resolve`] picks (`None` for the CPU); an error when the machine has too few.
    pub fn resolve_group(self, tp: usize) -> Result<Option<Vec<usize>>, CudaError> {
        let Some(first) = self.resolve()? else {
            return Ok(None);
        };
        let tp = tp.max(1);
        let count = device_count()?;
        if first + tp > count {
            return Err(CudaError::NotEnoughDevices { tp, first, count });
        }
        Ok(Some((first..first + tp).collect()))
    }

    pub fn resolve(self) -> Result<Option<usize>, CudaError> {
        match self {
            DeviceRequest::Cpu => Ok(None),
            DeviceRequest::Auto => match device_count() {
                Ok(n) if n > 0 => Ok(Some(0)),
                _ => Ok(None),
            },
            DeviceRequest::Cuda(n) => {
                let count = device_count()?;
                if n < count {
                    Ok(Some(n))
                } else {
                    Err(CudaError::NoDevice {
                        requested: n,
                        count,
                    })
                }
            }
        }
    }
}

/// What a GPU is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    pub total_memory: usize,
    pub multiprocessors: i32,
}

/// Whether the CUDA driver library can be loaded (cudarc panics on first use otherwise).
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { sys::is_culib_present() }
}

/// Number of CUDA devices; [`CudaError::NoDriver`] when there is no driver.
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    let n = CudaContext::device_count().map_err(CudaError::driver("cuDeviceGetCount"))?;
    Ok(n.max(0) as usize)
}

/// Opens the primary context of GPU `ordinal`, checking first that it exists.
pub fn open(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(CudaError::NoDevice {
            requested: ordinal,
            count,
        });
    }
    CudaContext::new(ordinal).map_err(CudaError::driver("cuCtxCreate"))
}

/// Describes an open context's device.
pub fn info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo, CudaError> {
    let e = |what: &'static str| CudaError::driver(what);
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name().map_err(e("cuDeviceGetName"))?,
        compute_capability: ctx
            .compute_capability()
            .map_err(e("cuDeviceGetAttribute"))?,
        total_memory: ctx.total_mem().map_err(e("cuDeviceTotalMem"))?,
        multiprocessors: ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(e("cuDeviceGetAttribute"))?,
    })
}

/// Every GPU of the machine; [`CudaError::NoDriver`] without a driver.
pub fn cuda_devices() -> Result<Vec<DeviceInfo>, CudaError> {
    let n = device_count()?;
    (0..n).map(|i| open(i).and_then(|c| info(&c))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_specs() {
        assert_eq!(
            "auto".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Auto
        );
        assert_eq!("cpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceRequest>().unwrap(),
            DeviceRequest::Cuda(3)
        );
        for bad in ["cuda:", "cuda:x", "tpu", "cuda:-1", ""] {
            let e = bad.parse::<DeviceRequest>().unwrap_err();
            assert!(e.to_string().contains("expected auto, cpu, cuda"), "{e}");
        }
    }

    #[test]
    fn asking_for_a_missing_gpu_is_an_error_not_a_panic() {
        // On a machine without a driver (CI) this is NoDriver; on a GPU machine, device 999
        // does not exist either way.
        match DeviceRequest::Cuda(999).resolve() {
            Err(CudaError::NoDriver) => assert!(!driver_present()),
            Err(CudaError::NoDevice { requested, count }) => {
                assert_eq!(requested, 999);
                assert!(count < 999);
            }
            other => panic!("expected an error, got {other:?}"),
        }
        // auto never fails: it falls back to the CPU without a GPU.
        let auto = DeviceRequest::Auto.resolve().unwrap();
        assert_eq!(
            auto.is_some(),
            device_count().map(|n| n > 0).unwrap_or(false)
        );
        assert_eq!(DeviceRequest::Cpu.resolve().unwrap(), None);
    }

    #[test]
    fn a_group_larger_than_the_machine_is_a_clear_error() {
        assert_eq!(DeviceRequest::Cpu.resolve_group(4).unwrap(), None);
        match DeviceRequest::Auto.resolve_group(1000) {
            // No GPU here: auto is the CPU, whatever the degree.
            Ok(None) => assert!(device_count().map(|n| n == 0).unwrap_or(true)),
            Err(CudaError::NotEnoughDevices { tp, first, count }) => {
                assert_eq!((tp, first), (1000, 0));
                let msg = CudaError::NotEnoughDevices { tp, first, count }.to_string();
                assert!(msg.contains("needs GPUs 0..=999"), "{msg}");
            }
            other => panic!("expected no GPU or too few GPUs, got {other:?}"),
        }
        let msg = CudaError::NotEnoughDevices {
            tp: 4,
            first: 1,
            count: 2,
        }
        .to_string();
        assert_eq!(
            msg,
            "tensor parallel 4 from GPU 1 needs GPUs 1..=4, but this machine has 2 GPU(s)"
        );
    }
}

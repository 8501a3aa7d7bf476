//! Run-time compilation of `kernels/*.cu` with NVRTC and the on-disk cache of the results.
//!
//! The sources are embedded in the binary (so a copied binary carries them); `#include
//! "common.cuh"` is resolved by inlining the embedded header. Each source file becomes one CUDA
//! module compiled to a cubin for the device's own architecture (`sm_90` on Hopper). The cubin is
//! cached under [`cache_dir`] as `<sha256>.cubin`, the hash covering the inlined source, the
//! options, the architecture and the NVRTC and driver versions, so an edit, a different GPU or a
//! driver update each compile afresh; a cache file that fails to load is recompiled and replaced.

use std::ffi::{CString, c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{Ptx, result as nvrtc, sys as nvrtc_sys};
use sha2::{Digest, Sha256};

use crate::CudaError;

/// The shared header every kernel file includes.
pub const COMMON_HEADER: &str = include_str!("../../../kernels/common.cuh");

/// The kernel sources: (file name, text).
pub const SOURCES: &[(&str, &str)] = &[
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
    ),
    ("sampling.cu", include_str!("../../../kernels/sampling.cu")),
    ("gemv.cu", include_str!("../../../kernels/gemv.cu")),
    ("dequant.cu", include_str!("../../../kernels/dequant.cu")),
    (
        "attention_decode.cu",
        include_str!("../../../kernels/attention_decode.cu"),
    ),
    (
        "attention_prefill.cu",
        include_str!("../../../kernels/attention_prefill.cu"),
    ),
    ("wave.cu", include_str!("../../../kernels/wave.cu")),
    (
        "wave_build.cu",
        include_str!("../../../kernels/wave_build.cu"),
    ),
];

/// Where compiled kernels are cached: `$RETROWAVE_KERNEL_CACHE`, else
/// `$RETROWAVE_HOME/kernels`, else `~/.cache/retrowave/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("RETROWAVE_KERNEL_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("RETROWAVE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/retrowave")))
        .unwrap_or_else(|| PathBuf::from(".retrowave"));
    home.join("kernels")
}

/// The folder holding `cuda_bf16.h`: `$RETROWAVE_CUDA_INCLUDE`, `$CUDA_HOME/include`,
/// `$CUDA_PATH/include`, `/usr/local/cuda/include`, the first that has the header.
pub fn cuda_include_dir() -> Result<PathBuf, CudaError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("RETROWAVE_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            candidates.push(PathBuf::from(p).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    candidates
        .iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
        .cloned()
        .ok_or_else(|| {
            CudaError::Nvrtc(format!(
                "cuda_bf16.h not found in {}; set RETROWAVE_CUDA_INCLUDE to the CUDA include folder",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

/// Whether the NVRTC library can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::Nvrtc(
            "libnvrtc.so not found (install the CUDA toolkit's NVRTC or add it to LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let (mut a, mut b): (c_int, c_int) = (0, 0);
    // SAFETY: two out-pointers to live integers.
    unsafe { nvrtc_sys::nvrtcVersion(&mut a, &mut b) }
        .result()
        .map_err(|e| CudaError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
    Ok((a, b))
}

/// `source` with `#include "common.cuh"` replaced by the header's text.
pub fn inline_source(source: &str) -> String {
    source.replace("#include \"common.cuh\"", COMMON_HEADER)
}

/// Compiler options for `arch` (`sm_90`). `RETROWAVE_KERNEL_DEFINES` (comma-separated `NAME` or
/// `NAME=VALUE`) adds preprocessor definitions, for kernels' debugging and profiling switches
/// (for example `SEL_PROFILE`, see kernels/wave.cu); they are part of the cache key.
pub fn options(arch: &str, include: &Path) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-lineinfo".into(),
        format!("-I{}", include.display()),
        format!("-DDEC_STAGES={}", decode_stages()),
    ];
    if let Ok(defs) = std::env::var("RETROWAVE_KERNEL_DEFINES") {
        o.extend(
            defs.split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| format!("-D{d}")),
        );
    }
    o
}

/// Depth of the flash-decoding kernel's cp.async ring of K/V tiles (`DEC_STAGES`): 3 unless
/// `RETROWAVE_DECODE_STAGES` (2 to 6) says otherwise, read once. Deeper rings keep more bytes in
/// flight per multiprocessor at the price of shared memory (32 KB a stage).
pub fn decode_stages() -> usize {
    static STAGES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *STAGES.get_or_init(|| {
        std::env::var("RETROWAVE_DECODE_STAGES")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(3, |n| n.clamp(2, 6))
    })
}

/// Compiles one source to a cubin (`as_ptx` false) or PTX.
pub fn compile_source(
    name: &str,
    source: &str,
    opts: &[String],
    as_ptx: bool,
) -> Result<Vec<u8>, CudaError> {
    let src = CString::new(inline_source(source))
        .map_err(|_| CudaError::Nvrtc(format!("{name}: source contains a NUL byte")))?;
    let cname = CString::new(name).map_err(|_| CudaError::Nvrtc("bad source name".into()))?;
    let prog = nvrtc::create_program(&src, Some(&cname))
        .map_err(|e| CudaError::Nvrtc(format!("{name}: nvrtcCreateProgram: {e:?}")))?;
    struct Guard(nvrtc_sys::nvrtcProgram);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: created above and destroyed once.
            let _ = unsafe { nvrtc::destroy_program(self.0) };
        }
    }
    let guard = Guard(prog);
    // SAFETY: `prog` is live until `guard` drops.
    let compiled = unsafe { nvrtc::compile_program(guard.0, opts) };
    if let Err(e) = compiled {
        // SAFETY: as above.
        let log = unsafe { nvrtc::get_program_log(guard.0) }
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_default();
        return Err(CudaError::Nvrtc(format!(
            "{name} failed to compile ({e:?}) with {}:\n{log}",
            opts.join(" ")
        )));
    }
    let mut size = 0usize;
    let out = if as_ptx {
        // SAFETY: as above.
        let ptx = unsafe { nvrtc::get_ptx(guard.0) }
            .map_err(|e| CudaError::Nvrtc(format!("{name}: nvrtcGetPTX: {e:?}")))?;
        ptx.iter().map(|&c| c as u8).collect()
    } else {
        // SAFETY: size out-pointer, then a buffer of that size.
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(guard.0, &mut size) }
            .result()
            .map_err(|e| CudaError::Nvrtc(format!("{name}: nvrtcGetCUBINSize: {e:?}")))?;
        let mut buf = vec![0u8; size];
        // SAFETY: `buf` holds `size` bytes.
        unsafe { nvrtc_sys::nvrtcGetCUBIN(guard.0, buf.as_mut_ptr() as *mut c_char) }
            .result()
            .map_err(|e| CudaError::Nvrtc(format!("{name}: nvrtcGetCUBIN: {e:?}")))?;
        buf
    };
    Ok(out)
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// How one module was obtained.
#[derive(Debug, Clone)]
pub struct ModuleReport {
    pub file: &'static str,
    pub from_cache: bool,
    pub seconds: f64,
    pub cache_path: PathBuf,
}

/// Compiles (or loads from the cache) every kernel source for the context's device and loads the
/// modules. Files compile in parallel.
pub fn load_modules(
    ctx: &Arc<CudaContext>,
) -> Result<(Vec<Arc<CudaModule>>, Vec<ModuleReport>), CudaError> {
    let (major, minor) = ctx
        .compute_capability()
        .map_err(CudaError::driver("cuDeviceGetAttribute"))?;
    // Hopper builds target sm_90a so that the prefill kernel can use wgmma (an sm_90a cubin runs
    // on sm_90 devices only, which is what it is built for).
    let arch = if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    };
    let include = cuda_include_dir()?;
    let opts = options(&arch, &include);
    let nvrtc_v = nvrtc_version()?;
    let mut driver_v: c_int = 0;
    // SAFETY: out-pointer to a live integer.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_v) }
        .result()
        .map_err(CudaError::driver("cuDriverGetVersion"))?;
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(|source| CudaError::Cache {
        path: dir.display().to_string(),
        source,
    })?;
    let results: Vec<Result<(Vec<u8>, ModuleReport), CudaError>> = std::thread::scope(|s| {
        let handles: Vec<_> = SOURCES
            .iter()
            .map(|&(file, src)| {
                let (opts, dir, arch) = (&opts, &dir, &arch);
                s.spawn(move || {
                    let mut h = Sha256::new();
                    for part in [
                        inline_source(src).as_bytes(),
                        opts.join("\n").as_bytes(),
                        format!("{arch} nvrtc {nvrtc_v:?} driver {driver_v}").as_bytes(),
                    ] {
                        h.update((part.len() as u64).to_le_bytes());
                        h.update(part);
                    }
                    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
                    let path = dir.join(format!(
                        "{}-{}.cubin",
                        file.trim_end_matches(".cu"),
                        &hex[..32]
                    ));
                    let t = Instant::now();
                    if let Ok(bytes) = std::fs::read(&path) {
                        return Ok((
                            bytes,
                            ModuleReport {
                                file,
                                from_cache: true,
                                seconds: t.elapsed().as_secs_f64(),
                                cache_path: path,
                            },
                        ));
                    }
                    let bytes = compile_source(file, src, opts, false)?;
                    write_atomic(&path, &bytes)?;
                    Ok((
                        bytes,
                        ModuleReport {
                            file,
                            from_cache: false,
                            seconds: t.elapsed().as_secs_f64(),
                            cache_path: path,
                        },
                    ))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CudaError::Nvrtc("compiler thread panicked".into())))
            })
            .collect()
    });
    let mut modules = Vec::new();
    let mut reports = Vec::new();
    for (r, &(file, src)) in results.into_iter().zip(SOURCES) {
        let (bytes, mut report) = r?;
        let module = match ctx.load_module(Ptx::from_binary(bytes)) {
            Ok(m) => m,
            Err(e) if report.from_cache => {
                // A damaged or foreign cache file: compile afresh and replace it.
                tracing::warn!(path = %report.cache_path.display(), error = %e, "cached kernel failed to load; recompiling");
                let t = Instant::now();
                let bytes = compile_source(file, src, &opts, false)?;
                write_atomic(&report.cache_path, &bytes)?;
                report.from_cache = false;
                report.seconds = t.elapsed().as_secs_f64();
                ctx.load_module(Ptx::from_binary(bytes))
                    .map_err(CudaError::driver(format!("cuModuleLoadData({file})")))?
            }
            Err(e) => {
                return Err(CudaError::Driver {
                    what: format!("cuModuleLoadData({file})"),
                    source: e,
                });
            }
        };
        modules.push(module);
        reports.push(report);
    }
    Ok((modules, reports))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CudaError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let err = |source| CudaError::Cache {
        path: path.display().to_string(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Extracts `#define NAME value` (an integer) from the common header.
pub fn header_define(name: &str) -> Option<i64> {
    COMMON_HEADER.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some("#define") && it.next() == Some(name))
            .then(|| it.next().and_then(|v| v.parse().ok()))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_constants_are_readable() {
        assert_eq!(header_define("PREFILL_BLOCK_M"), Some(64));
        assert_eq!(header_define("NO_SUCH_THING"), None);
    }

    #[test]
    fn sources_inline_the_header_and_declare_their_kernels() {
        for (file, src) in SOURCES {
            let s = inline_source(src);
            assert!(!s.contains("#include \"common.cuh\""), "{file}");
            assert!(
                s.contains("struct SeqDesc"),
                "{file} does not include common.cuh"
            );
            assert!(s.contains("extern \"C\""), "{file} has no kernels");
        }
    }

    /// Compiles every kernel file with NVRTC where the library and the CUDA headers are present
    /// (no GPU needed); elsewhere checks that their absence is reported as an error.
    #[test]
    fn kernels_compile_with_nvrtc_or_absence_is_an_error() {
        let include = match (nvrtc_present(), cuda_include_dir()) {
            (true, Ok(inc)) => inc,
            (present, inc) => {
                if !present {
                    assert!(nvrtc_version().is_err());
                } else {
                    assert!(inc.unwrap_err().to_string().contains("cuda_bf16.h"));
                }
                eprintln!("NVRTC or CUDA headers absent: compile check skipped");
                return;
            }
        };
        for arch in ["sm_90", "sm_90a"] {
            let opts = options(arch, &include);
            for (file, src) in SOURCES {
                let cubin =
                    compile_source(file, src, &opts, false).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(&cubin[..4], b"\x7fELF", "{file}: not an ELF cubin");
            }
        }
        let opts = options("sm_90", &include);
        let err = compile_source(
            "bad.cu",
            "extern \"C\" __global__ void k() { nope; }",
            &opts,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad.cu") && err.contains("nope"), "{err}");
    }
}

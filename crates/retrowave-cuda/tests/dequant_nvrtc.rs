//! The GPU dequantization kernels (`kernels/dequant.cu`): NVRTC compiles them for Hopper where
//! the library and the CUDA headers are present (no GPU needed), with every kernel the host
//! launches present and no fused multiply-add in their arithmetic (the host decoder rounds each
//! multiply and add separately); on a GPU, their output matches the host decoder bit for bit.

use retrowave_cuda::compile::{compile_source, cuda_include_dir, nvrtc_present, options};
use retrowave_cuda::dequant::{DEQUANT_KERNELS, check_dequant};
use retrowave_cuda::{CudaBackend, CudaError};

const SOURCE: &str = include_str!("../../../kernels/dequant.cu");

#[test]
fn dequant_kernels_compile_with_nvrtc_without_fma() {
    let include = match (nvrtc_present(), cuda_include_dir()) {
        (true, Ok(inc)) => inc,
        _ => {
            eprintln!("NVRTC or CUDA headers absent: dequant.cu compile check skipped");
            return;
        }
    };
    for arch in ["sm_90", "sm_90a"] {
        let opts = options(arch, &include);
        let cubin =
            compile_source("dequant.cu", SOURCE, &opts, false).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            &cubin[..4],
            b"\x7fELF",
            "dequant.cu ({arch}): not an ELF cubin"
        );
        let ptx =
            compile_source("dequant.cu", SOURCE, &opts, true).unwrap_or_else(|e| panic!("{e}"));
        let ptx = String::from_utf8_lossy(&ptx);
        for &(t, name) in DEQUANT_KERNELS {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch}: kernel {name} for {t} is missing from the PTX"
            );
        }
        // Every f32 multiply, add and subtract must be an explicitly rounded `.rn` instruction:
        // ptxas fuses a plain `mul.f32` followed by `add.f32`/`sub.f32` into an FMA.
        for op in ["fma.", "mul.f32", "add.f32", "sub.f32"] {
            assert!(
                !ptx.contains(op),
                "{arch}: `{op}` in the PTX: the dequantization arithmetic may be fused into an FMA"
            );
        }
        for op in ["mul.rn.f32", "add.rn.f32", "sub.rn.f32"] {
            assert!(ptx.contains(op), "{arch}: no `{op}` in the PTX");
        }
        assert!(
            !ptx.contains(".global .align"),
            "{arch}: dequant.cu defines device globals"
        );
    }
}

#[test]
fn dequant_kernels_match_the_host_decoder_bit_for_bit_or_no_gpu() {
    match CudaBackend::new(0) {
        Ok(b) => {
            let results = check_dequant(&b, 0x0dec_5eed).expect("dequant checks ran");
            for (name, passed, mismatches) in &results {
                eprintln!(
                    "{name:<60} mismatches {mismatches} {}",
                    if *passed { "ok" } else { "FAIL" }
                );
            }
            assert_eq!(results.len(), 3 * DEQUANT_KERNELS.len());
            assert!(results.iter().all(|r| r.1 && r.2 == 0));
        }
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice { .. })) => {
            eprintln!("no GPU ({e}): dequant bit-exactness check skipped");
        }
        Err(e) => panic!("a GPU is present but the backend failed to start: {e}"),
    }
}

//! Kernel checks on the GPU (poisoned outputs, CPU references on random inputs). Without a GPU
//! (CI), checks that asking for one is a clear error instead.

use retrowave_cuda::{CudaBackend, CudaError, checks};

#[test]
fn kernels_match_cpu_references_or_no_gpu_is_an_error() {
    match CudaBackend::new(0) {
        Ok(b) => {
            let results = checks::run_all(&b, 0x5eed).expect("checks ran");
            for r in &results {
                eprintln!(
                    "{:<60} rel {:.2e} max {:.2e} non-finite {} {}",
                    r.name,
                    r.rel_l2,
                    r.max_abs,
                    r.non_finite,
                    if r.passed { "ok" } else { "FAIL" }
                );
            }
            assert!(results.len() > 15);
            assert!(results.iter().all(|r| r.passed));
        }
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice { .. })) => {
            let msg = e.to_string();
            assert!(
                msg.contains("no GPU") && msg.contains("--device cpu"),
                "{msg}"
            );
        }
        Err(e) => panic!("a GPU is present but the backend failed to start: {e}"),
    }
}

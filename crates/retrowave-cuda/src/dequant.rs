//! Dequantization of GGUF weight rows to bf16 on the GPU (`kernels/dequant.cu`).
//!
//! The raw stored rows of a weight (whole GGML blocks) are uploaded as they are, and one kernel
//! per [`TensorType`] writes a column slice of every row as bf16, row-major. Each value is bit for
//! bit `bf16::from_f32` of what [`retrowave_core::quant::dequantize_row`] produces on the host;
//! [`check_dequant`] verifies that on random blocks.

use cudarc::driver::{DevicePtr, LaunchConfig, sys};
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use retrowave_core::TensorType;
use retrowave_core::quant::dequantize_row;

use crate::backend::ptr_of;
use crate::{CudaBackend, CudaError};

/// Every type with a GPU dequantization kernel, and the kernel's name.
pub const DEQUANT_KERNELS: &[(TensorType, &str)] = &[
    (TensorType::Q4_0, "dequant_q4_0_bf16"),
    (TensorType::Q4_1, "dequant_q4_1_bf16"),
    (TensorType::Q5_0, "dequant_q5_0_bf16"),
    (TensorType::Q8_0, "dequant_q8_0_bf16"),
    (TensorType::Q4K, "dequant_q4_k_bf16"),
    (TensorType::Q6K, "dequant_q6_k_bf16"),
    (TensorType::F16, "dequant_f16_bf16"),
    (TensorType::F32, "dequant_f32_bf16"),
];

/// The kernel that dequantizes `t` to bf16, or `None` where there is none (the caller then
/// dequantizes on the host).
pub fn dequant_kernel_name(t: TensorType) -> Option<&'static str> {
    DEQUANT_KERNELS
        .iter()
        .find(|(ty, _)| *ty == t)
        .map(|&(_, name)| name)
}

/// Threads per CTA of every dequantization kernel (their `__launch_bounds__`).
const THREADS: usize = 256;
/// Most CTAs of one launch; the kernels stride over the rest.
const MAX_CTAS: usize = 65535 * 16;
/// Elements one thread decodes and stores.
const PER_THREAD: usize = 8;

/// Dequantizes columns `col0 .. col0 + ncols` of `rows` stored rows of type `t` to bf16.
///
/// `src` is the device address of the first stored row (any alignment); row `r` starts at
/// `src + r * row_bytes` and holds whole blocks covering `cols` elements. `dst` receives
/// `rows * ncols` bf16 values, row-major (`dst[r * ncols + j]` is column `col0 + j`); it must be
/// 2-byte aligned (16-byte aligned for the fastest stores). The launch is asynchronous on the
/// backend's stream. Errors: `t` has no kernel, `cols` is not a whole number of blocks,
/// `row_bytes` is shorter than those blocks, the slice passes `cols`, a size overflows the
/// kernel's integer arguments, or the launch fails.
#[allow(clippy::too_many_arguments)]
pub fn launch_dequant(
    b: &CudaBackend,
    t: TensorType,
    src: sys::CUdeviceptr,
    dst: sys::CUdeviceptr,
    rows: usize,
    cols: usize,
    col0: usize,
    ncols: usize,
    row_bytes: usize,
) -> Result<(), CudaError> {
    launch_dequant_grid(b, t, src, dst, rows, cols, col0, ncols, row_bytes, MAX_CTAS)
}

/// A validated launch: the kernel, its grid and its integer arguments.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    name: &'static str,
    ctas: usize,
    rows: i64,
    cols: i32,
    col0: i32,
    ncols: i32,
    row_bytes: i64,
}

/// Checks the arguments of a launch and sizes its grid (at most `max_ctas` CTAs); `None` when
/// there is nothing to write.
fn plan(
    t: TensorType,
    rows: usize,
    cols: usize,
    col0: usize,
    ncols: usize,
    row_bytes: usize,
    max_ctas: usize,
) -> Result<Option<Plan>, CudaError> {
    let name = dequant_kernel_name(t).ok_or_else(|| {
        CudaError::Unsupported(format!("no GPU dequantization kernel for {t} weights"))
    })?;
    let bs = t.block_size();
    let need = t.row_bytes(cols as u64).ok_or_else(|| {
        CudaError::Unsupported(format!(
            "{name}: {cols} columns are not a whole number of {t} blocks of {bs}"
        ))
    })?;
    if (row_bytes as u64) < need {
        return Err(CudaError::Unsupported(format!(
            "{name}: a row of {cols} {t} elements takes {need} bytes, but the row stride is {row_bytes}"
        )));
    }
    if col0.checked_add(ncols).is_none_or(|end| end > cols) {
        return Err(CudaError::Unsupported(format!(
            "{name}: columns {col0}..{} are outside a row of {cols}",
            col0.saturating_add(ncols)
        )));
    }
    let too_big = |what: &str, v: usize| {
        CudaError::Unsupported(format!("{name}: {what} = {v} is too large for the kernel"))
    };
    let plan = Plan {
        name,
        ctas: 0,
        rows: i64::try_from(rows).map_err(|_| too_big("rows", rows))?,
        cols: i32::try_from(cols).map_err(|_| too_big("cols", cols))?,
        col0: i32::try_from(col0).map_err(|_| too_big("col0", col0))?,
        ncols: i32::try_from(ncols).map_err(|_| too_big("ncols", ncols))?,
        row_bytes: i64::try_from(row_bytes).map_err(|_| too_big("row_bytes", row_bytes))?,
    };
    if rows == 0 || ncols == 0 {
        return Ok(None);
    }
    // Work items of a row: groups of 8 slice columns (f16/f32), or 8-element parts of every
    // block the slice touches.
    let items = if bs == 1 {
        ncols.div_ceil(PER_THREAD)
    } else {
        ((col0 + ncols - 1) / bs - col0 / bs + 1) * (bs / PER_THREAD)
    };
    let total = rows
        .checked_mul(items)
        .ok_or_else(|| too_big("rows", rows))?;
    Ok(Some(Plan {
        ctas: total
            .div_ceil(THREADS)
            .clamp(1, max_ctas.clamp(1, MAX_CTAS)),
        ..plan
    }))
}

/// [`launch_dequant`] with at most `max_ctas` CTAs (a small grid exercises the grid-stride loop).
#[allow(clippy::too_many_arguments)]
fn launch_dequant_grid(
    b: &CudaBackend,
    t: TensorType,
    src: sys::CUdeviceptr,
    dst: sys::CUdeviceptr,
    rows: usize,
    cols: usize,
    col0: usize,
    ncols: usize,
    row_bytes: usize,
    max_ctas: usize,
) -> Result<(), CudaError> {
    let Some(p) = plan(t, rows, cols, col0, ncols, row_bytes, max_ctas)? else {
        return Ok(());
    };
    let cfg = LaunchConfig {
        grid_dim: (p.ctas as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (mut s, mut d, mut r, mut c, mut c0, mut nc, mut rb) =
        (src, dst, p.rows, p.cols, p.col0, p.ncols, p.row_bytes);
    b.context()
        .bind_to_thread()
        .map_err(CudaError::driver("cuCtxSetCurrent"))?;
    b.launch(
        p.name,
        cfg,
        &mut [
            ptr_of(&mut s),
            ptr_of(&mut d),
            ptr_of(&mut r),
            ptr_of(&mut c),
            ptr_of(&mut c0),
            ptr_of(&mut nc),
            ptr_of(&mut rb),
        ],
    )
}

/// Byte offsets of the f16 scale fields in one block of `t` (kept finite by the check).
fn scale_offsets(t: TensorType) -> &'static [usize] {
    match t {
        TensorType::Q4_0 | TensorType::Q5_0 | TensorType::Q8_0 => &[0],
        TensorType::Q4_1 | TensorType::Q4K => &[0, 2],
        TensorType::Q6K => &[208],
        _ => &[],
    }
}

/// Random stored rows of `t`: random bytes, with every f16 block scale finite (zeros and
/// subnormals included). f16 and f32 rows are random bit patterns (NaN and infinities included:
/// those kernels convert bits exactly like `half`), with f32 rounding ties for bf16 mixed in.
fn random_rows(rng: &mut StdRng, t: TensorType, rows: usize, row_bytes: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; rows * row_bytes];
    rng.fill(&mut bytes[..]);
    let offsets = scale_offsets(t);
    if !offsets.is_empty() {
        for block in bytes.chunks_exact_mut(t.type_size()) {
            for &o in offsets {
                let bits: u16 = match rng.random_range(0..8u32) {
                    0 => 0,
                    1 => rng.random::<u16>() & 0x83FF, // subnormal or signed zero
                    _ => loop {
                        let v = rng.random::<u16>();
                        if v & 0x7C00 != 0x7C00 {
                            break v;
                        }
                    },
                };
                if let Some(field) = block.get_mut(o..o + 2) {
                    field.copy_from_slice(&bits.to_le_bytes());
                }
            }
        }
    }
    if t == TensorType::F32 {
        for (i, c) in bytes.chunks_exact_mut(4).enumerate() {
            let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let y = match i % 4 {
                0 => (x & 0xFFFF_0000) | 0x8000, // exact tie: to even
                1 => x & 0x807F_FFFF,            // subnormal
                _ => x,
            };
            c.copy_from_slice(&y.to_le_bytes());
        }
    }
    bytes
}

/// One check case: a column slice, a source misalignment and a grid size.
struct Case {
    rows: usize,
    cols: usize,
    col0: usize,
    ncols: usize,
    src_offset: usize,
    max_ctas: usize,
}

/// Checks every dequantization kernel against `bf16::from_f32(dequantize_row(..))` on random
/// blocks, bit for bit: per type, 7 rows × 512 columns as a whole, as a misaligned column slice
/// from a misaligned source, and as a block-aligned slice through a two-CTA grid (so the
/// grid-stride loop runs). Elements are compared as bf16 bits; the output buffer is filled with
/// 0xFFFF first and padded, so unwritten elements and writes past the end count as mismatches.
/// Returns `(name, passed, mismatches)` per case; an `Err` means a case could not run.
pub fn check_dequant(b: &CudaBackend, seed: u64) -> Result<Vec<(String, bool, usize)>, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let cases = [
        Case {
            rows: 7,
            cols: 512,
            col0: 0,
            ncols: 512,
            src_offset: 0,
            max_ctas: MAX_CTAS,
        },
        Case {
            rows: 7,
            cols: 512,
            col0: 37,
            ncols: 300,
            src_offset: 3,
            max_ctas: MAX_CTAS,
        },
        Case {
            rows: 7,
            cols: 512,
            col0: 256,
            ncols: 256,
            src_offset: 1,
            max_ctas: 2,
        },
    ];
    let mut out = Vec::new();
    for &(t, name) in DEQUANT_KERNELS {
        for case in &cases {
            let label = format!(
                "{name} {}x{} cols {}..{} src+{} grid<={}",
                case.rows,
                case.cols,
                case.col0,
                case.col0 + case.ncols,
                case.src_offset,
                case.max_ctas
            );
            let mismatches = run_case(b, &mut rng, t, case).map_err(|e| format!("{label}: {e}"))?;
            out.push((label, mismatches == 0, mismatches));
        }
    }
    Ok(out)
}

/// Runs one case; returns the number of mismatching (or stray) bf16 elements.
fn run_case(
    b: &CudaBackend,
    rng: &mut StdRng,
    t: TensorType,
    case: &Case,
) -> Result<usize, String> {
    let rb = t
        .row_bytes(case.cols as u64)
        .ok_or_else(|| format!("{} columns are not whole {t} blocks", case.cols))?
        as usize;
    let src = random_rows(rng, t, case.rows, rb);
    // Host reference.
    let mut row = vec![0f32; case.cols];
    let mut expect = Vec::with_capacity(case.rows * case.ncols);
    for stored in src.chunks_exact(rb) {
        dequantize_row(t, stored, &mut row).map_err(|e| e.to_string())?;
        let slice = row
            .get(case.col0..case.col0 + case.ncols)
            .ok_or("slice outside the row")?;
        expect.extend(slice.iter().map(|&x| bf16::from_f32(x).to_bits()));
    }
    // Device: the source behind `src_offset` junk bytes; the output padded by 16 elements.
    let mut padded = vec![0xA5u8; case.src_offset];
    padded.extend_from_slice(&src);
    let n_out = case.rows * case.ncols;
    let pad = 16;
    let e = |e: CudaError| e.to_string();
    b.context()
        .bind_to_thread()
        .map_err(|e| format!("cuCtxSetCurrent: {e}"))?;
    let d_src = b.upload(&padded).map_err(e)?;
    let d_dst = b.alloc::<u16>(n_out + pad).map_err(e)?;
    {
        let stream = b.stream();
        let (src_ptr, _g1) = d_src.device_ptr(stream);
        let (dst_ptr, _g2) = d_dst.device_ptr(stream);
        // SAFETY: the whole `d_dst` allocation, on the backend's stream.
        unsafe {
            cudarc::driver::result::memset_d8_async(
                dst_ptr,
                0xFF,
                (n_out + pad) * 2,
                stream.cu_stream(),
            )
        }
        .map_err(|e| format!("cuMemsetD8Async: {e}"))?;
        launch_dequant_grid(
            b,
            t,
            src_ptr + case.src_offset as u64,
            dst_ptr,
            case.rows,
            case.cols,
            case.col0,
            case.ncols,
            rb,
            case.max_ctas,
        )
        .map_err(e)?;
    }
    b.synchronize().map_err(e)?;
    let got = b.download(&d_dst, n_out + pad).map_err(e)?;
    let (body, tail) = got.split_at(n_out.min(got.len()));
    let wrong = body.iter().zip(&expect).filter(|(g, x)| g != x).count();
    let stray = tail.iter().filter(|&&g| g != 0xFFFF).count();
    let missing = expect.len().saturating_sub(body.len());
    Ok(wrong + stray + missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_cover_the_gpu_types_only() {
        assert_eq!(
            dequant_kernel_name(TensorType::Q4K),
            Some("dequant_q4_k_bf16")
        );
        assert_eq!(
            dequant_kernel_name(TensorType::F32),
            Some("dequant_f32_bf16")
        );
        for t in [
            TensorType::BF16,
            TensorType::Q5_1,
            TensorType::Q3K,
            TensorType::Q8K,
        ] {
            assert_eq!(dequant_kernel_name(t), None, "{t}");
        }
        for &(t, name) in DEQUANT_KERNELS {
            assert!(
                name.starts_with("dequant_") && name.ends_with("_bf16"),
                "{name}"
            );
            assert!(
                t.block_size() == 1 || t.block_size() % PER_THREAD == 0,
                "{t}"
            );
        }
    }

    #[test]
    fn plans_size_the_grid_from_the_blocks_the_slice_touches() {
        // Q4_K, 7 rows of 512: columns 37..337 touch blocks 0 and 1, 32 threads each.
        let p = plan(TensorType::Q4K, 7, 512, 37, 300, 288, MAX_CTAS)
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.name, p.ctas),
            ("dequant_q4_k_bf16", (7 * 2 * 32usize).div_ceil(256))
        );
        assert_eq!(
            (p.rows, p.cols, p.col0, p.ncols, p.row_bytes),
            (7, 512, 37, 300, 288)
        );
        // Q8_0 embedding 151936 x 896: 28 blocks of 4 threads per row.
        let p = plan(TensorType::Q8_0, 151_936, 896, 0, 896, 952, MAX_CTAS)
            .unwrap()
            .unwrap();
        assert_eq!(p.ctas, (151_936usize * 112).div_ceil(256));
        // f32: groups of 8 slice columns; the grid cap holds.
        let p = plan(TensorType::F32, 3, 100, 1, 99, 400, 2)
            .unwrap()
            .unwrap();
        assert_eq!(p.ctas, 1);
        let p = plan(TensorType::F16, 10_000, 4096, 0, 4096, 8192, 2)
            .unwrap()
            .unwrap();
        assert_eq!(p.ctas, 2);
        // Nothing to write.
        assert_eq!(
            plan(TensorType::Q6K, 0, 256, 0, 256, 210, MAX_CTAS).unwrap(),
            None
        );
        assert_eq!(
            plan(TensorType::Q6K, 4, 256, 10, 0, 210, MAX_CTAS).unwrap(),
            None
        );
    }

    #[test]
    fn bad_launch_arguments_are_errors_that_say_why() {
        let msg = |r: Result<Option<Plan>, CudaError>| r.unwrap_err().to_string();
        let m = msg(plan(TensorType::Q5_1, 1, 32, 0, 32, 24, MAX_CTAS));
        assert!(m.contains("no GPU dequantization kernel for Q5_1"), "{m}");
        let m = msg(plan(TensorType::Q4_0, 1, 48, 0, 48, 36, MAX_CTAS));
        assert!(
            m.contains("48 columns are not a whole number of Q4_0 blocks of 32"),
            "{m}"
        );
        let m = msg(plan(TensorType::Q6K, 1, 256, 0, 256, 209, MAX_CTAS));
        assert!(
            m.contains("takes 210 bytes, but the row stride is 209"),
            "{m}"
        );
        let m = msg(plan(TensorType::Q8_0, 1, 64, 40, 25, 68, MAX_CTAS));
        assert!(m.contains("columns 40..65 are outside a row of 64"), "{m}");
        let m = msg(plan(TensorType::F32, 1, 64, usize::MAX, 2, 256, MAX_CTAS));
        assert!(m.contains("outside a row of 64"), "{m}");
        let big = 1usize << 31;
        let m = msg(plan(TensorType::F16, 1, big, 0, 8, big * 2, MAX_CTAS));
        assert!(m.contains("cols = 2147483648 is too large"), "{m}");
    }

    #[test]
    fn random_rows_keep_block_scales_finite() {
        let mut rng = StdRng::seed_from_u64(7);
        for &(t, _) in DEQUANT_KERNELS {
            let rb = t.row_bytes(512).unwrap() as usize;
            let bytes = random_rows(&mut rng, t, 3, rb);
            assert_eq!(bytes.len(), 3 * rb);
            let mut out = vec![0f32; 512];
            for row in bytes.chunks_exact(rb) {
                dequantize_row(t, row, &mut out).unwrap();
                if !scale_offsets(t).is_empty() {
                    assert!(out.iter().all(|x| x.is_finite()), "{t}");
                }
            }
        }
    }
}

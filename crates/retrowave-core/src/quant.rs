//! Dequantization of GGML block formats: one stored row of any [`TensorType`] to `f32`.
//!
//! The block formats are GGML's, decoded by candle-core's `k_quants`, whose block types are
//! `#[repr(C)]` images of GGML's. Shared by the model crate (exports, checks) and the backends
//! (embedding lookups, float fallbacks).

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K, GgmlType,
};

use crate::TensorType;

/// Why a row could not be dequantized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    /// The output length is not a whole number of blocks.
    #[error(
        "cannot dequantize {n} {dtype} elements: not a multiple of the block size {block_size}"
    )]
    PartialBlock {
        dtype: TensorType,
        n: usize,
        block_size: usize,
    },
    /// The input byte length does not match the output length.
    #[error("{n} {dtype} elements are stored in {expected} bytes, but {found} bytes were given")]
    WrongLength {
        dtype: TensorType,
        n: usize,
        expected: usize,
        found: usize,
    },
}

/// Dequantizes `bytes` (whole blocks of `dtype`, e.g. one stored row) into `out`, whose length is
/// the number of elements. Every [`TensorType`] is handled; the block formats are GGML's (decoded
/// by candle's `k_quants`, whose block types are `#[repr(C)]` images of GGML's).
pub fn dequantize_row(
    dtype: TensorType,
    bytes: &[u8],
    out: &mut [f32],
) -> Result<(), DequantError> {
    let n = out.len();
    let expected = dtype
        .row_bytes(n as u64)
        .ok_or(DequantError::PartialBlock {
            dtype,
            n,
            block_size: dtype.block_size(),
        })? as usize;
    if bytes.len() != expected {
        return Err(DequantError::WrongLength {
            dtype,
            n,
            expected,
            found: bytes.len(),
        });
    }
    match dtype {
        TensorType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        TensorType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        TensorType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        TensorType::Q4_0 => blocks_to_f32::<BlockQ4_0>(bytes, out),
        TensorType::Q4_1 => blocks_to_f32::<BlockQ4_1>(bytes, out),
        TensorType::Q5_0 => blocks_to_f32::<BlockQ5_0>(bytes, out),
        TensorType::Q5_1 => blocks_to_f32::<BlockQ5_1>(bytes, out),
        TensorType::Q8_0 => blocks_to_f32::<BlockQ8_0>(bytes, out),
        TensorType::Q8_1 => blocks_to_f32::<BlockQ8_1>(bytes, out),
        TensorType::Q2K => blocks_to_f32::<BlockQ2K>(bytes, out),
        TensorType::Q3K => blocks_to_f32::<BlockQ3K>(bytes, out),
        TensorType::Q4K => blocks_to_f32::<BlockQ4K>(bytes, out),
        TensorType::Q5K => blocks_to_f32::<BlockQ5K>(bytes, out),
        TensorType::Q6K => blocks_to_f32::<BlockQ6K>(bytes, out),
        TensorType::Q8K => blocks_to_f32::<BlockQ8K>(bytes, out),
    }
    Ok(())
}

// The block structs must be exactly GGML's block sizes for the casts below.
const _: () = {
    use std::mem::size_of;
    assert!(size_of::<BlockQ4_0>() == 18);
    assert!(size_of::<BlockQ4_1>() == 20);
    assert!(size_of::<BlockQ5_0>() == 22);
    assert!(size_of::<BlockQ5_1>() == 24);
    assert!(size_of::<BlockQ8_0>() == 34);
    assert!(size_of::<BlockQ8_1>() == 36);
    assert!(size_of::<BlockQ2K>() == 84);
    assert!(size_of::<BlockQ3K>() == 110);
    assert!(size_of::<BlockQ4K>() == 144);
    assert!(size_of::<BlockQ5K>() == 176);
    assert!(size_of::<BlockQ6K>() == 210);
    assert!(size_of::<BlockQ8K>() == 292);
};

/// Decodes whole blocks. The caller checked `bytes.len() == out.len() / B::BLCK_SIZE *
/// size_of::<B>()` (via `TensorType::row_bytes`, whose sizes the assertions above tie to `B`).
fn blocks_to_f32<B: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let size = std::mem::size_of::<B>();
    let n_blocks = bytes.len() / size;
    let n_out = n_blocks * B::BLCK_SIZE;
    let Some(out) = out.get_mut(..n_out) else {
        return;
    };
    let ptr = bytes.as_ptr();
    if ptr.align_offset(std::mem::align_of::<B>()) == 0 {
        // SAFETY: `ptr` is aligned for `B` and `bytes` holds `n_blocks * size_of::<B>()`
        // initialized bytes that live as long as the slice. The block types are #[repr(C)]
        // structs of f16/f32/u8/i8/i16 fields with no padding (sizes asserted above), for which
        // every bit pattern is a valid value.
        let blocks = unsafe { std::slice::from_raw_parts(ptr.cast::<B>(), n_blocks) };
        B::to_float(blocks, out);
    } else {
        let mut blocks: Vec<B> = (0..n_blocks).map(|_| B::zeros()).collect();
        // SAFETY: `blocks` owns `n_blocks * size_of::<B>()` bytes, the source holds at least as
        // many, the two do not overlap, and any bit pattern is a valid `B` (see above).
        unsafe {
            std::ptr::copy_nonoverlapping(ptr, blocks.as_mut_ptr().cast::<u8>(), n_blocks * size);
        }
        B::to_float(&blocks, out);
    }
}

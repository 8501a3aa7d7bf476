//! Weight matrices in their stored (possibly quantized) form, dequantization, and the parallel
//! quantized matrix multiply `y = x @ W^T`.
//!
//! Quantized weights stay quantized: activations are quantized per row to the matching 8-bit dot
//! type (Q8_0, Q8_1 or Q8_K, as GGML does) and each output is one block dot product. The block dot
//! products come from candle-core where it has SIMD kernels (Q4_0, Q8_0, Q4_K, Q6_K) and from
//! [`crate::simd`] where candle's are scalar (Q4_1, Q5_0).

use std::marker::PhantomData;

use candle_core::quantized::GgmlType;
use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ4K, BlockQ6K, BlockQ8_0, BlockQ8_1};
use rayon::prelude::*;
use retrowave_core::{BackendError, TensorType, WeightView};

use crate::simd::{self, RawQ4_1, RawQ5_0, RawQ8_0, RawQ8_1};

/// Bytes with 8-byte alignment, so that block structs can be viewed in place.
#[derive(Clone)]
pub struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    /// Copies `data` into an aligned buffer.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut words = vec![0u64; data.len().div_ceil(8)];
        // SAFETY: `words` has at least `data.len()` bytes; u8 has no alignment requirement.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, data.len()) };
        dst.copy_from_slice(data);
        AlignedBytes {
            words,
            len: data.len(),
        }
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: the buffer holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.len) }
    }
}

/// Views `bytes` as a slice of `T` blocks.
///
/// # Panics
/// If the length is not a whole number of blocks or the pointer is misaligned; callers only pass
/// [`AlignedBytes`] whose lengths were validated when the matrix was loaded.
fn cast_blocks<T>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert!(bytes.len().is_multiple_of(size), "block slice length");
    assert!(
        (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
        "block slice alignment"
    );
    // SAFETY: length and alignment checked above; the block types are plain-old-data repr(C)
    // structs (f16, u8, i8, i16, f32 fields) for which every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) }
}

/// Dequantizes one row (see [`retrowave_core::quant::dequantize_row`]).
pub fn dequantize_row(dtype: TensorType, row: &[u8], out: &mut [f32]) -> Result<(), BackendError> {
    retrowave_core::quant::dequantize_row(dtype, row, out)
        .map_err(|e| BackendError::Device(e.to_string()))
}

/// How a matrix is stored on the CPU.
#[derive(Clone)]
pub enum MatrixData {
    /// Quantized rows as in the model file.
    Quant {
        dtype: TensorType,
        bytes: AlignedBytes,
    },
    /// Plain f32 rows (float checkpoints, or slices that split quantization blocks).
    F32(Vec<f32>),
}

/// A weight matrix `[rows, cols]` on the CPU.
#[derive(Clone)]
pub struct CpuMatrix {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub data: MatrixData,
}

fn has_kernel(dtype: TensorType) -> bool {
    matches!(
        dtype,
        TensorType::Q4_0
            | TensorType::Q4_1
            | TensorType::Q5_0
            | TensorType::Q8_0
            | TensorType::Q4K
            | TensorType::Q6K
    )
}

impl CpuMatrix {
    /// Loads `rows x cols` of `w`, keeping quantized storage when the column range covers whole
    /// blocks, dequantizing otherwise.
    pub fn load(
        w: &WeightView<'_>,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
    ) -> Result<Self, BackendError> {
        let bad = || BackendError::BadSlice {
            name: w.name.to_string(),
            rows: rows.clone(),
            cols: cols.clone(),
            shape_rows: w.rows,
            shape_cols: w.cols,
        };
        if rows.start > rows.end || rows.end > w.rows || cols.start > cols.end || cols.end > w.cols
        {
            return Err(bad());
        }
        let row_bytes = w.dtype.row_bytes(w.cols as u64).ok_or_else(bad)? as usize;
        if w.data.len() < row_bytes * w.rows {
            return Err(bad());
        }
        let bs = w.dtype.block_size();
        let (n_rows, n_cols) = (rows.len(), cols.len());
        if has_kernel(w.dtype) && cols.start.is_multiple_of(bs) && cols.end.is_multiple_of(bs) {
            let b0 = cols.start / bs * w.dtype.type_size();
            let b1 = cols.end / bs * w.dtype.type_size();
            let mut bytes = Vec::with_capacity(n_rows * (b1 - b0));
            for r in rows.clone() {
                bytes.extend_from_slice(&w.data[r * row_bytes + b0..r * row_bytes + b1]);
            }
            return Ok(CpuMatrix {
                name: w.name.to_string(),
                rows: n_rows,
                cols: n_cols,
                data: MatrixData::Quant {
                    dtype: w.dtype,
                    bytes: AlignedBytes::copy_from(&bytes),
                },
            });
        }
        let mut out = Vec::with_capacity(n_rows * n_cols);
        let mut row = vec![0f32; w.cols];
        for r in rows.clone() {
            dequantize_row(
                w.dtype,
                &w.data[r * row_bytes..(r + 1) * row_bytes],
                &mut row,
            )?;
            out.extend_from_slice(&row[cols.clone()]);
        }
        Ok(CpuMatrix {
            name: w.name.to_string(),
            rows: n_rows,
            cols: n_cols,
            data: MatrixData::F32(out),
        })
    }

    /// Stacks the rows of matrices that share the input width and the storage type.
    pub fn stack(parts: &[&CpuMatrix]) -> Option<CpuMatrix> {
        let first = parts.first()?;
        let cols = first.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let name = parts
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join("+");
        let data = match &first.data {
            MatrixData::F32(_) => {
                let mut v = Vec::with_capacity(rows * cols);
                for p in parts {
                    let MatrixData::F32(d) = &p.data else {
                        return None;
                    };
                    v.extend_from_slice(d);
                }
                MatrixData::F32(v)
            }
            MatrixData::Quant { dtype, .. } => {
                let mut v = Vec::new();
                for p in parts {
                    match &p.data {
                        MatrixData::Quant { dtype: d, bytes } if d == dtype => {
                            v.extend_from_slice(bytes.as_bytes())
                        }
                        _ => return None,
                    }
                }
                MatrixData::Quant {
                    dtype: *dtype,
                    bytes: AlignedBytes::copy_from(&v),
                }
            }
        };
        Some(CpuMatrix {
            name,
            rows,
            cols,
            data,
        })
    }

    /// Bytes the matrix occupies.
    pub fn n_bytes(&self) -> usize {
        match &self.data {
            MatrixData::Quant { bytes, .. } => bytes.as_bytes().len(),
            MatrixData::F32(v) => v.len() * 4,
        }
    }

    /// Dequantizes row `r` into `out` (`cols` values).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<(), BackendError> {
        match &self.data {
            MatrixData::F32(v) => {
                out.copy_from_slice(&v[r * self.cols..(r + 1) * self.cols]);
                Ok(())
            }
            MatrixData::Quant { dtype, bytes } => {
                let rb = self.n_bytes() / self.rows.max(1);
                dequantize_row(*dtype, &bytes.as_bytes()[r * rb..(r + 1) * rb], out)
            }
        }
    }

    /// `y[n, rows] = x[n, cols] @ self^T`.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), n * self.cols);
        match &self.data {
            MatrixData::F32(w) => matmul_f32(w, self.rows, self.cols, x, n),
            MatrixData::Quant { dtype, bytes } => {
                let b = bytes.as_bytes();
                match dtype {
                    TensorType::Q4_0 => qmatmul::<Candle<BlockQ4_0>>(b, self.rows, self.cols, x, n),
                    TensorType::Q8_0 => qmatmul::<Candle<BlockQ8_0>>(b, self.rows, self.cols, x, n),
                    TensorType::Q4K => qmatmul::<Candle<BlockQ4K>>(b, self.rows, self.cols, x, n),
                    TensorType::Q6K => qmatmul::<Candle<BlockQ6K>>(b, self.rows, self.cols, x, n),
                    TensorType::Q4_1 => qmatmul::<KernelQ4_1>(b, self.rows, self.cols, x, n),
                    TensorType::Q5_0 => qmatmul::<KernelQ5_0>(b, self.rows, self.cols, x, n),
                    // `load` only keeps quantized storage for the types above.
                    other => unreachable!("no kernel for {other}"),
                }
            }
        }
    }
}

/// A block dot-product kernel: weight blocks `W` against activation blocks `A`.
trait Kernel {
    type W: Sync;
    type A: Clone + Send + Sync;
    const BLOCK: usize;
    fn zero() -> Self::A;
    fn quantize(x: &[f32], out: &mut [Self::A]);
    fn dot(cols: usize, w: &[Self::W], a: &[Self::A]) -> f32;
    /// One weight row against four activation rows.
    #[inline]
    fn dot_x4(cols: usize, w: &[Self::W], a: [&[Self::A]; 4]) -> [f32; 4] {
        a.map(|ai| Self::dot(cols, w, ai))
    }
}

struct Candle<T>(PhantomData<T>);

impl<T: GgmlType> Kernel for Candle<T> {
    type W = T;
    type A = T::VecDotType;
    const BLOCK: usize = T::BLCK_SIZE;
    fn zero() -> Self::A {
        T::VecDotType::zeros()
    }
    fn quantize(x: &[f32], out: &mut [Self::A]) {
        T::VecDotType::from_float(x, out)
    }
    #[inline]
    fn dot(cols: usize, w: &[T], a: &[Self::A]) -> f32 {
        T::vec_dot(cols, w, a)
    }
}

struct KernelQ4_1;

impl Kernel for KernelQ4_1 {
    type W = RawQ4_1;
    type A = BlockQ8_1;
    const BLOCK: usize = 32;
    fn zero() -> Self::A {
        BlockQ8_1::zeros()
    }
    fn quantize(x: &[f32], out: &mut [Self::A]) {
        BlockQ8_1::from_float(x, out)
    }
    #[inline]
    fn dot(_cols: usize, w: &[RawQ4_1], a: &[BlockQ8_1]) -> f32 {
        // SAFETY: BlockQ8_1 and RawQ8_1 are both repr(C) {f16, f16, [i8; 32]}.
        let a: &[RawQ8_1] =
            unsafe { std::slice::from_raw_parts(a.as_ptr() as *const RawQ8_1, a.len()) };
        simd::dot_q4_1_q8_1(w, a)
    }
    #[inline]
    fn dot_x4(_cols: usize, w: &[RawQ4_1], a: [&[BlockQ8_1]; 4]) -> [f32; 4] {
        // SAFETY: BlockQ8_1 and RawQ8_1 are both repr(C) {f16, f16, [i8; 32]}.
        let a =
            a.map(|x| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const RawQ8_1, x.len()) });
        simd::dot_q4_1_q8_1_x4(w, a)
    }
}

struct KernelQ5_0;

impl Kernel for KernelQ5_0 {
    type W = RawQ5_0;
    type A = BlockQ8_0;
    const BLOCK: usize = 32;
    fn zero() -> Self::A {
        BlockQ8_0::zeros()
    }
    fn quantize(x: &[f32], out: &mut [Self::A]) {
        BlockQ8_0::from_float(x, out)
    }
    #[inline]
    fn dot(_cols: usize, w: &[RawQ5_0], a: &[BlockQ8_0]) -> f32 {
        // SAFETY: BlockQ8_0 and RawQ8_0 are both repr(C) {f16, [i8; 32]}.
        let a: &[RawQ8_0] =
            unsafe { std::slice::from_raw_parts(a.as_ptr() as *const RawQ8_0, a.len()) };
        simd::dot_q5_0_q8_0(w, a)
    }
    #[inline]
    fn dot_x4(_cols: usize, w: &[RawQ5_0], a: [&[BlockQ8_0]; 4]) -> [f32; 4] {
        // SAFETY: BlockQ8_0 and RawQ8_0 are both repr(C) {f16, [i8; 32]}.
        let a =
            a.map(|x| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const RawQ8_0, x.len()) });
        simd::dot_q5_0_q8_0_x4(w, a)
    }
}

/// Raw output pointer shared by the workers of one matmul; every element is written by exactly
/// one work item.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the workers write disjoint elements and the owner waits for all of them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` must be in bounds and written by one worker only.
    #[inline]
    unsafe fn write(self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v };
    }
}

/// Rows per work item: enough items to balance the pool, few enough to keep overhead low.
fn row_tile(rows: usize, n: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    if n == 1 {
        (rows / (threads * 8)).clamp(4, 256)
    } else {
        16
    }
}

fn qmatmul<K: Kernel>(w_bytes: &[u8], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
    let kb = cols / K::BLOCK;
    let w: &[K::W] = cast_blocks(w_bytes);
    let mut xa = vec![K::zero(); n * kb];
    if n >= 16 {
        xa.par_chunks_mut(kb)
            .zip(x.par_chunks(cols))
            .for_each(|(a, xr)| K::quantize(xr, a));
    } else {
        for (a, xr) in xa.chunks_mut(kb).zip(x.chunks(cols)) {
            K::quantize(xr, a);
        }
    }
    let mut out = vec![0f32; n * rows];
    let ptr = OutPtr(out.as_mut_ptr());
    let tile = row_tile(rows, n);
    let n_tiles = rows.div_ceil(tile);
    let xa = &xa;
    (0..n_tiles).into_par_iter().for_each(move |t| {
        let r0 = t * tile;
        let r1 = rows.min(r0 + tile);
        let act = |i: usize| &xa[i * kb..(i + 1) * kb];
        let mut i = 0;
        while i + 4 <= n {
            for r in r0..r1 {
                let v = K::dot_x4(
                    cols,
                    &w[r * kb..(r + 1) * kb],
                    [act(i), act(i + 1), act(i + 2), act(i + 3)],
                );
                for (t, v) in v.into_iter().enumerate() {
                    // SAFETY: (i + t, r) is in bounds and belongs to this tile only.
                    unsafe { ptr.write((i + t) * rows + r, v) };
                }
            }
            i += 4;
        }
        for i in i..n {
            for r in r0..r1 {
                let v = K::dot(cols, &w[r * kb..(r + 1) * kb], act(i));
                // SAFETY: (i, r) is in bounds and belongs to this tile only.
                unsafe { ptr.write(i * rows + r, v) };
            }
        }
    });
    out
}

fn matmul_f32(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * rows];
    let ptr = OutPtr(out.as_mut_ptr());
    let tile = row_tile(rows, n);
    (0..rows.div_ceil(tile)).into_par_iter().for_each(move |t| {
        let r0 = t * tile;
        let r1 = rows.min(r0 + tile);
        for i in 0..n {
            let xr = &x[i * cols..(i + 1) * cols];
            for r in r0..r1 {
                let v = simd::dot_f32(&w[r * cols..(r + 1) * cols], xr);
                // SAFETY: (i, r) is in bounds and belongs to this tile only.
                unsafe { ptr.write(i * rows + r, v) };
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ5_0};

    /// Quantizes rows with candle's reference quantizer, then checks the quantized matmul against
    /// an f32 matmul over the dequantized weights.
    fn check<T: GgmlType>(dtype: TensorType, cols: usize) {
        let rows = 37;
        let n = 7;
        let wf: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut blocks = vec![T::zeros(); rows * cols / T::BLCK_SIZE];
        T::from_float(&wf, &mut blocks);
        // SAFETY: viewing plain-old-data blocks as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                blocks.as_ptr() as *const u8,
                blocks.len() * std::mem::size_of::<T>(),
            )
        };
        let view = WeightView {
            name: "w",
            dtype,
            rows,
            cols,
            data: bytes,
        };
        let m = CpuMatrix::load(&view, 0..rows, 0..cols).unwrap();
        assert!(matches!(m.data, MatrixData::Quant { .. }));
        let x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 104729) % 997) as f32 / 498.0 - 1.0)
            .collect();
        let y = m.matmul(&x, n);
        let mut deq = vec![0f32; cols];
        for r in 0..rows {
            m.row_f32(r, &mut deq).unwrap();
            for i in 0..n {
                let exact = simd::dot_f32(&deq, &x[i * cols..(i + 1) * cols]);
                let got = y[i * rows + r];
                // activations are quantized to 8 bits: allow ~1% of the L1 mass
                let scale: f32 = deq
                    .iter()
                    .zip(&x[i * cols..])
                    .map(|(a, b)| (a * b).abs())
                    .sum();
                assert!(
                    (exact - got).abs() <= 0.02 * scale + 1e-3,
                    "{dtype} r{r} i{i}: {got} vs {exact}"
                );
            }
        }
        // A slice of columns that covers whole blocks stays quantized and agrees with the full one.
        let half = cols / 2 / T::BLCK_SIZE * T::BLCK_SIZE;
        if half > 0 {
            let s = CpuMatrix::load(&view, 1..5, 0..half).unwrap();
            assert!(matches!(s.data, MatrixData::Quant { .. }));
            let mut full = vec![0f32; cols];
            let mut part = vec![0f32; half];
            m.row_f32(2, &mut full).unwrap();
            s.row_f32(1, &mut part).unwrap();
            assert_eq!(&full[..half], &part[..]);
        }
    }

    #[test]
    fn quantized_matmul_matches_dequantized_reference() {
        check::<BlockQ4_0>(TensorType::Q4_0, 512);
        check::<BlockQ4_1>(TensorType::Q4_1, 576);
        check::<BlockQ5_0>(TensorType::Q5_0, 896);
        check::<BlockQ8_0>(TensorType::Q8_0, 576);
        check::<BlockQ4K>(TensorType::Q4K, 1024);
        check::<BlockQ6K>(TensorType::Q6K, 512);
    }

    #[test]
    fn unaligned_column_slice_is_dequantized() {
        let cols = 64;
        let wf: Vec<f32> = (0..4 * cols).map(|i| i as f32 / 100.0).collect();
        let mut blocks = vec![BlockQ8_0::zeros(); 4 * cols / 32];
        BlockQ8_0::from_float(&wf, &mut blocks);
        // SAFETY: viewing plain-old-data blocks as bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, blocks.len() * 34) };
        let view = WeightView {
            name: "w",
            dtype: TensorType::Q8_0,
            rows: 4,
            cols,
            data: bytes,
        };
        let m = CpuMatrix::load(&view, 0..4, 8..40).unwrap();
        assert!(matches!(m.data, MatrixData::F32(_)));
        assert!(CpuMatrix::load(&view, 0..5, 0..64).is_err());
    }
}

//! Hand-written AVX2 dot products for the block types whose candle-core kernels are scalar
//! (Q4_1 x Q8_1 and Q5_0 x Q8_0), plus small f32 helpers the attention and norms use.
//!
//! Every function here has a portable fallback that computes the same value; the AVX2 paths are
//! chosen at run time with `is_x86_feature_detected!`, so a binary built for x86-64-v3 still
//! behaves on a CPU without AVX2.

use half::f16;

/// Q4_1 block (same layout as GGML's `block_q4_1`): scale, min, 32 4-bit values.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

/// Q5_0 block (GGML's `block_q5_0`): scale, 32 high bits, 32 low nibbles.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; 16],
}

/// Q8_0 block (GGML's `block_q8_0`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// Q8_1 block (GGML's `block_q8_1`): `s = d * sum(qs)`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RawQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; 32],
}

const _: () = assert!(std::mem::size_of::<RawQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<RawQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<RawQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<RawQ8_1>() == 36);

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `sum_b d_w d_x sum_i q4_i q8_i + m_w s_x` over the blocks.
pub fn dot_q4_1_q8_1(w: &[RawQ4_1], x: &[RawQ8_1]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::dot_q4_1_q8_1(w, x) };
    }
    dot_q4_1_q8_1_portable(w, x)
}

/// Portable Q4_1 x Q8_1 dot product (the reference for the AVX2 path).
pub fn dot_q4_1_q8_1_portable(w: &[RawQ4_1], x: &[RawQ8_1]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let mut isum = 0i32;
        for j in 0..16 {
            let lo = (wb.qs[j] & 0x0f) as i32;
            let hi = (wb.qs[j] >> 4) as i32;
            isum += lo * xb.qs[j] as i32 + hi * xb.qs[j + 16] as i32;
        }
        sum += wb.d.to_f32() * xb.d.to_f32() * isum as f32 + wb.m.to_f32() * xb.s.to_f32();
    }
    sum
}

/// `sum_b d_w d_x sum_i (q5_i - 16) q8_i` over the blocks.
pub fn dot_q5_0_q8_0(w: &[RawQ5_0], x: &[RawQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::dot_q5_0_q8_0(w, x) };
    }
    dot_q5_0_q8_0_portable(w, x)
}

/// Portable Q5_0 x Q8_0 dot product (the reference for the AVX2 path).
pub fn dot_q5_0_q8_0_portable(w: &[RawQ5_0], x: &[RawQ8_0]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        let qh = u32::from_le_bytes(wb.qh);
        let mut isum = 0i32;
        for j in 0..16 {
            let lo = ((wb.qs[j] & 0x0f) as u32 | ((qh >> j) & 1) << 4) as i32 - 16;
            let hi = ((wb.qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4) as i32 - 16;
            isum += lo * xb.qs[j] as i32 + hi * xb.qs[j + 16] as i32;
        }
        sum += wb.d.to_f32() * xb.d.to_f32() * isum as f32;
    }
    sum
}

/// Four dot products of one Q4_1 row against four activation rows (the weights are unpacked once).
pub fn dot_q4_1_q8_1_x4(w: &[RawQ4_1], x: [&[RawQ8_1]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::dot_q4_1_q8_1_x4(w, x) };
    }
    x.map(|xi| dot_q4_1_q8_1_portable(w, xi))
}

/// Four dot products of one Q5_0 row against four activation rows.
pub fn dot_q5_0_q8_0_x4(w: &[RawQ5_0], x: [&[RawQ8_0]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        return unsafe { avx2::dot_q5_0_q8_0_x4(w, x) };
    }
    x.map(|xi| dot_q5_0_q8_0_portable(w, xi))
}

/// `x = exp(x)` element-wise, to about `1e-7 * (1 + |x|)` relative error; inputs below -87 give 0.
///
/// A branch-free range reduction `exp(x) = 2^n * exp(f ln 2)`, `n = round(x log2 e)`,
/// `|f| <= 1/2`, with a degree-7 Taylor polynomial: written so that it vectorizes.
#[inline]
pub fn exp_inplace(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA are available.
        unsafe { avx2::exp_inplace(xs) };
        return;
    }
    for v in xs.iter_mut() {
        *v = exp_approx(*v);
    }
}

/// `dst[i] = exp(src[i] - shift)` (as [`exp_inplace`]), returning the sum of `dst`: one pass
/// for what a subtraction, an exponential and a sum would read three times.
#[inline]
pub fn exp_shift_sum(src: &[f32], shift: f32, dst: &mut [f32]) -> f32 {
    let n = src.len().min(dst.len());
    // SAFETY: both pointers are valid for `n` elements.
    unsafe { exp_shift_sum_raw(src.as_ptr(), dst.as_mut_ptr(), n, shift) }
}

/// [`exp_shift_sum`] in place: `xs[i] = exp(xs[i] - shift)`, returning their sum.
#[inline]
pub fn exp_shift_sum_inplace(xs: &mut [f32], shift: f32) -> f32 {
    let p = xs.as_mut_ptr();
    // SAFETY: `p` is valid for `xs.len()` elements; each element is read before it is written.
    unsafe { exp_shift_sum_raw(p, p, xs.len(), shift) }
}

/// The body of [`exp_shift_sum`] over `n` elements of `src` into `dst`, which may be the same
/// memory (element `i` is read before element `i` is written, and no other element between).
///
/// # Safety
/// `src` must be readable and `dst` writable for `n` f32s.
#[inline]
unsafe fn exp_shift_sum_raw(src: *const f32, dst: *mut f32, n: usize, shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA are available; the caller vouches for the pointers.
        return unsafe { avx2::exp_shift_sum(src, dst, n, shift) };
    }
    let mut sum = 0.0;
    for i in 0..n {
        // SAFETY: i < n, inside both buffers.
        unsafe {
            let y = exp_approx(*src.add(i) - shift);
            *dst.add(i) = y;
            sum += y;
        }
    }
    sum
}

/// The largest of `xs` (`-inf` for none; NaNs are ignored where the vector path runs).
#[inline]
pub fn max_f32(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 is available.
        return unsafe { avx2::max_f32(xs) };
    }
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// [`exp_inplace`] one value at a time with the scalar [`exp_approx`]: the prefill attention
/// keeps these numerics (the vector version differs by an ulp, which the model's 8-bit
/// activations amplify into logit changes past the golden tests' tolerance).
pub fn exp_inplace_scalar(xs: &mut [f32]) {
    for v in xs.iter_mut() {
        *v = exp_approx(*v);
    }
}

/// One value of [`exp_inplace`].
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E;
    // Round to nearest without a libm call on baseline x86-64 (|t| < 2^22 here).
    // Round to nearest without a libm call on baseline x86-64 (|t| < 2^22 here).
    let n = (t + 12_582_912.0) - 12_582_912.0;
    let r = (t - n) * std::f32::consts::LN_2;
    // exp(r) for |r| <= 0.347
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x <= -87.0 { 0.0 } else { p * scale }
}

/// Dot product of two f32 slices of equal length.
#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// `y = y * scale + alpha * x`.
#[inline]
pub fn scale_axpy(y: &mut [f32], scale: f32, alpha: f32, x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv = alpha.mul_add(*xv, *yv * scale);
    }
}

/// `y += alpha * x`.
#[inline]
pub fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
    debug_assert_eq!(x.len(), y.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA are available.
        unsafe { avx2::axpy(y, alpha, x) };
        return;
    }
    // Not `mul_add`: without FMA in the target it is a libm call per element.
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * *xv;
    }
}

/// Converts f16 to f32 (uses F16C through the `half` crate when available).
#[inline]
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// Converts f32 to f16 (round to nearest even).
#[inline]
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
    use half::slice::HalfFloatSliceExt;
    dst.convert_from_f32_slice(src);
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{RawQ4_1, RawQ5_0, RawQ8_0, RawQ8_1};
    use std::arch::x86_64::*;

    /// `y += alpha * x`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn axpy(y: &mut [f32], alpha: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        let a = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n <= both lengths.
            unsafe {
                let xv = _mm256_loadu_ps(x.as_ptr().add(i));
                let yv = _mm256_loadu_ps(y.as_ptr().add(i));
                _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_fmadd_ps(a, xv, yv));
            }
            i += 8;
        }
        for j in i..n {
            y[j] += alpha * x[j];
        }
    }

    /// `exp(x)` in place, as [`super::exp_approx`] for 8 lanes at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_inplace(xs: &mut [f32]) {
        let n = xs.len();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe {
                let v = _mm256_loadu_ps(xs.as_ptr().add(i));
                _mm256_storeu_ps(xs.as_mut_ptr().add(i), exp8(v));
            }
            i += 8;
        }
        for v in &mut xs[i..] {
            *v = super::exp_approx(*v);
        }
    }

    /// Vector [`super::exp_approx`]: `exp(x)` for 8 lanes, 0 below -87.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
            _mm256_set1_ps(88.0),
        );
        let t = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E));
        let n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        let r = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(std::f32::consts::LN_2));
        let mut p = _mm256_set1_ps(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let bits = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        let y = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
        _mm256_and_ps(y, _mm256_cmp_ps(x, _mm256_set1_ps(-87.0), _CMP_GT_OQ))
    }

    /// See [`super::exp_shift_sum_raw`] (whose safety contract the caller keeps).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shift_sum(
        src: *const f32,
        dst: *mut f32,
        n: usize,
        shift: f32,
    ) -> f32 {
        let sh = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, inside both buffers; the load precedes the store.
            let y = exp8(_mm256_sub_ps(unsafe { _mm256_loadu_ps(src.add(i)) }, sh));
            unsafe { _mm256_storeu_ps(dst.add(i), y) };
            acc = _mm256_add_ps(acc, y);
            i += 8;
        }
        let mut sum = hsum(acc);
        while i < n {
            // SAFETY: i < n.
            unsafe {
                let y = super::exp_approx(*src.add(i) - shift);
                *dst.add(i) = y;
                sum += y;
            }
            i += 1;
        }
        sum
    }

    /// See [`super::max_f32`].
    #[target_feature(enable = "avx2")]
    pub(super) fn max_f32(xs: &[f32]) -> f32 {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 8 <= xs.len() {
            // SAFETY: i + 8 <= xs.len().
            m = _mm256_max_ps(m, unsafe { _mm256_loadu_ps(xs.as_ptr().add(i)) });
            i += 8;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
        let mut best = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for &x in &xs[i..] {
            best = best.max(x);
        }
        best
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// 16 packed nibbles -> 32 bytes: low nibbles in bytes 0..16, high nibbles in 16..32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
        // SAFETY: qs is 16 readable bytes.
        let raw = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
        let hi = _mm_srli_epi16(raw, 4);
        let both = _mm256_set_m128i(hi, raw);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
    }

    /// Spreads 32 bits to 32 bytes: 0xff where the bit is set.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn bits_to_bytes(bits: u32) -> __m256i {
        let shuf = _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0x0000000000000000,
        );
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
        let mask = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe_u64 as i64);
        let bytes = _mm256_or_si256(bytes, mask);
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }

    /// Sum of u8 x i8 products as 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn madd_u8_i8(a: __m256i, b: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(a, b);
        let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
        _mm256_cvtepi32_ps(p32)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1_q8_1(w: &[RawQ4_1], x: &[RawQ8_1]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut summs = 0f32;
        for (wb, xb) in w.iter().zip(x) {
            let d = wb.d.to_f32() * xb.d.to_f32();
            summs += wb.m.to_f32() * xb.s.to_f32();
            // SAFETY: block fields are fixed-size arrays.
            let q4 = unsafe { nibbles(&wb.qs) };
            let q8 = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), madd_u8_i8(q4, q8), acc);
        }
        hsum(acc) + summs
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4_1_q8_1_x4(w: &[RawQ4_1], x: [&[RawQ8_1]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [0f32; 4];
        for (b, wb) in w.iter().enumerate() {
            let dw = wb.d.to_f32();
            let mw = wb.m.to_f32();
            // SAFETY: block fields are fixed-size arrays.
            let q4 = unsafe { nibbles(&wb.qs) };
            for t in 0..4 {
                let xb = &x[t][b];
                summs[t] += mw * xb.s.to_f32();
                let q8 = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                acc[t] = _mm256_fmadd_ps(
                    _mm256_set1_ps(dw * xb.d.to_f32()),
                    madd_u8_i8(q4, q8),
                    acc[t],
                );
            }
        }
        [
            hsum(acc[0]) + summs[0],
            hsum(acc[1]) + summs[1],
            hsum(acc[2]) + summs[2],
            hsum(acc[3]) + summs[3],
        ]
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q5_0_q8_0_x4(w: &[RawQ5_0], x: [&[RawQ8_0]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, wb) in w.iter().enumerate() {
            let dw = wb.d.to_f32();
            // SAFETY: block fields are fixed-size arrays.
            let mut q = unsafe { nibbles(&wb.qs) };
            let hi = _mm256_andnot_si256(
                bits_to_bytes(u32::from_le_bytes(wb.qh)),
                _mm256_set1_epi8(0xf0_u8 as i8),
            );
            q = _mm256_or_si256(q, hi);
            let aq = _mm256_sign_epi8(q, q);
            for t in 0..4 {
                let xb = &x[t][b];
                let y = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
                let sy = _mm256_sign_epi8(y, q);
                acc[t] = _mm256_fmadd_ps(
                    _mm256_set1_ps(dw * xb.d.to_f32()),
                    madd_u8_i8(aq, sy),
                    acc[t],
                );
            }
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q5_0_q8_0(w: &[RawQ5_0], x: &[RawQ8_0]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (wb, xb) in w.iter().zip(x) {
            let d = wb.d.to_f32() * xb.d.to_f32();
            // SAFETY: block fields are fixed-size arrays.
            let mut q = unsafe { nibbles(&wb.qs) };
            // Where the fifth bit is clear the value is q - 16 = q | 0xf0 as i8.
            let hi = _mm256_andnot_si256(
                bits_to_bytes(u32::from_le_bytes(wb.qh)),
                _mm256_set1_epi8(0xf0_u8 as i8),
            );
            q = _mm256_or_si256(q, hi);
            let y = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
            // signed x signed through |q| (unsigned) x sign(y, q)
            let aq = _mm256_sign_epi8(q, q);
            let sy = _mm256_sign_epi8(y, q);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), madd_u8_i8(aq, sy), acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q4_1(d: f32, m: f32, qs: [u8; 16]) -> RawQ4_1 {
        RawQ4_1 {
            d: f16::from_f32(d),
            m: f16::from_f32(m),
            qs,
        }
    }

    proptest! {
        #[test]
        fn q4_1_avx2_matches_portable(seed in proptest::collection::vec(any::<u8>(), 16 * 4), xs in proptest::collection::vec(-127i8..=127, 32 * 4), d in 0.001f32..1.0, m in -1.0f32..1.0) {
            let w: Vec<RawQ4_1> = seed.chunks(16).map(|c| q4_1(d, m, c.try_into().unwrap())).collect();
            let x: Vec<RawQ8_1> = xs.chunks(32).map(|c| {
                let qs: [i8; 32] = c.try_into().unwrap();
                let s: i32 = qs.iter().map(|&v| v as i32).sum();
                RawQ8_1 { d: f16::from_f32(0.01), s: f16::from_f32(0.01 * s as f32), qs }
            }).collect();
            let a = dot_q4_1_q8_1(&w, &x);
            let b = dot_q4_1_q8_1_portable(&w, &x);
            prop_assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
        }

        #[test]
        fn q5_0_avx2_matches_portable(qs in proptest::collection::vec(any::<u8>(), 16 * 4), qh in proptest::collection::vec(any::<u8>(), 4 * 4), xs in proptest::collection::vec(-127i8..=127, 32 * 4), d in 0.001f32..1.0) {
            let w: Vec<RawQ5_0> = (0..4).map(|i| RawQ5_0 { d: f16::from_f32(d), qh: qh[i*4..i*4+4].try_into().unwrap(), qs: qs[i*16..i*16+16].try_into().unwrap() }).collect();
            let x: Vec<RawQ8_0> = xs.chunks(32).map(|c| RawQ8_0 { d: f16::from_f32(0.02), qs: c.try_into().unwrap() }).collect();
            let a = dot_q5_0_q8_0(&w, &x);
            let b = dot_q5_0_q8_0_portable(&w, &x);
            prop_assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn x4_kernels_match_single_dots() {
        let w1: Vec<RawQ4_1> = (0..6)
            .map(|i| q4_1(0.01 * (i + 1) as f32, -0.3, [(i * 37) as u8; 16]))
            .collect();
        let w5: Vec<RawQ5_0> = (0..6)
            .map(|i| RawQ5_0 {
                d: f16::from_f32(0.02),
                qh: [i as u8, 0x55, 0xaa, 0x0f],
                qs: [(i * 53) as u8; 16],
            })
            .collect();
        let acts: Vec<Vec<RawQ8_1>> = (0..4)
            .map(|t| {
                (0..6)
                    .map(|b| RawQ8_1 {
                        d: f16::from_f32(0.01),
                        s: f16::from_f32(0.5),
                        qs: [((t * 7 + b * 3) as i8) - 9; 32],
                    })
                    .collect()
            })
            .collect();
        let acts0: Vec<Vec<RawQ8_0>> = acts
            .iter()
            .map(|a| a.iter().map(|b| RawQ8_0 { d: b.d, qs: b.qs }).collect())
            .collect();
        let r = dot_q4_1_q8_1_x4(&w1, [&acts[0], &acts[1], &acts[2], &acts[3]]);
        let r5 = dot_q5_0_q8_0_x4(&w5, [&acts0[0], &acts0[1], &acts0[2], &acts0[3]]);
        for t in 0..4 {
            assert!((r[t] - dot_q4_1_q8_1_portable(&w1, &acts[t])).abs() < 1e-3);
            assert!((r5[t] - dot_q5_0_q8_0_portable(&w5, &acts0[t])).abs() < 1e-3);
        }
    }

    #[test]
    fn exp_approx_is_accurate() {
        let mut x = -90.0f32;
        while x < 88.0 {
            let e = x.exp();
            let a = exp_approx(x);
            // f32 range reduction: the relative error grows with |x| (about 5e-8 per unit)
            assert!(
                (a - e).abs() <= 1e-7 * (1.0 + x.abs()) * e + 1e-37,
                "exp({x}) = {e}, approx {a}"
            );
            x += 0.0137;
        }
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
    }

    /// The vector exp agrees with the scalar one to a few ulps over the whole range.
    #[test]
    fn vector_exp_matches_the_scalar_one() {
        let xs: Vec<f32> = (0..12_990).map(|i| -90.0 + i as f32 * 0.0137).collect();
        let mut v = xs.clone();
        exp_inplace(&mut v);
        let mut worst = 0f64;
        for (&x, &got) in xs.iter().zip(&v) {
            let want = exp_approx(x);
            let e = f64::from(x).exp();
            assert!(
                (f64::from(got) - e).abs() <= 1e-7 * (1.0 + f64::from(x.abs())) * e + 1e-37,
                "exp({x}) = {e}, vector {got}"
            );
            if want > 0.0 {
                worst = worst.max((f64::from(got) / f64::from(want) - 1.0).abs());
            }
        }
        eprintln!("vector vs scalar exp: worst relative difference {worst:e}");
        assert!(worst < 1e-6, "{worst}");
    }

    #[test]
    fn dot_f32_matches_naive() {
        let a: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot_f32(&a, &b) as f64 - naive).abs() < 1e-4);
    }
}

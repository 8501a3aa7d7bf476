// Dequantization of GGUF weight rows to bf16 on the GPU (see kernels/README.md for the contract).
//
//   dequant_<type>_bf16(const unsigned char* src, bf16* dst, long long rows, int cols, int col0,
//                       int ncols, long long row_bytes)
//
// `src` points at the first stored row of the slice; stored row r starts at src + r * row_bytes
// and holds whole blocks covering `cols` elements. Columns col0 .. col0 + ncols of every row are
// written to dst[r * ncols + j] (j = column - col0), row-major bf16.
//
// Bit-exactness: every value equals `bf16::from_f32(x)` of the `x` that the host decoder
// (retrowave_core::quant::dequantize_row, i.e. candle-core 0.11's k_quants `to_float`, GGML's
// `dequantize_row_*`) computes:
// - f16 -> f32 and f32 -> bf16 are done on the bits, as the `half` crate does (its software
//   paths; its F16C path gives the same bits), so signed zeros, subnormals, infinities and NaN
//   payloads all match;
// - integers become floats exactly (|q| < 2^24);
// - every multiply, add and subtract is a separately rounded `__f*_rn` intrinsic in the order of
//   the Rust expression (Rust never contracts `a * b + c` into an FMA; the intrinsics stop NVRTC
//   from doing so). NVRTC compiles without --use_fast_math, so there is no flush to zero.
// The one case where bits can differ is a NaN *produced* by the arithmetic (a non-finite block
// scale times a zero quant, or inf - inf): x86 yields its default NaN 0xFFC00000, the GPU
// 0x7FFFFFFF; both are NaN. Real weight files have finite scales.
//
// Work split: one thread decodes 8 consecutive elements of a block (a "part"; a K-quant
// super-block of 256 elements is one warp, a 32-element block four threads) and writes them as
// one 16-byte store when they are inside the slice and the address is 16-byte aligned (else
// element by element). Consecutive threads take consecutive parts of a row, so a warp reads a
// contiguous run of blocks and writes a contiguous run of bf16. The 1-D grid strides over
// (row, part) pairs; any grid is correct. Blocks are 18/20/22/34/144/210 bytes, so `src` has no
// useful alignment: quantized blocks are read byte by byte (the bytes of a warp share a few
// cache lines, so DRAM traffic stays one pass). f16/f32 rows take 16-byte loads where aligned.
#include "common.cuh"

namespace {

typedef unsigned char u8;

// ---- bit-level conversions (the `half` crate's algorithms) ------------------------------------

// f16 bits -> f32 bits (half 2.7 `f16_to_f32_fallback`).
__device__ __forceinline__ unsigned f16_to_f32_bits(unsigned h) {
  h &= 0xFFFFu;
  if ((h & 0x7FFFu) == 0) return h << 16;  // signed zero
  const unsigned sign = (h & 0x8000u) << 16;
  const unsigned exp = h & 0x7C00u;
  const unsigned man = h & 0x03FFu;
  if (exp == 0x7C00u) {
    // infinity, or NaN with its payload kept and the quiet bit set
    return man == 0 ? (sign | 0x7F800000u) : (sign | 0x7FC00000u | (man << 13));
  }
  if (exp == 0) {
    // subnormal: normalise (man != 0 here)
    const int e = (__clz(man) - 16) - 6;  // leading zeros of the 16-bit value, minus 6
    return sign | ((unsigned)(127 - 15 - e) << 23) | ((man << (14 + e)) & 0x7FFFFFu);
  }
  return sign | (((exp >> 10) + 127 - 15) << 23) | (man << 13);
}

__device__ __forceinline__ float f16_to_f32(unsigned h) {
  return __uint_as_float(f16_to_f32_bits(h));
}

// f32 bits -> bf16 bits, round to nearest even; NaN keeps its high bits with the quiet bit set
// (half 2.7 `f32_to_bf16`).
__device__ __forceinline__ unsigned bf16_bits(float f) {
  const unsigned x = __float_as_uint(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return ((x >> 16) | 0x40u) & 0xFFFFu;
  unsigned r = x >> 16;
  if ((x & 0x8000u) != 0 && (x & 0x17FFFu) != 0) r += 1;  // 0x17FFF = 3 * 0x8000 - 1
  return r & 0xFFFFu;
}

// ---- unaligned little-endian loads ----------------------------------------------------------

__device__ __forceinline__ unsigned ld_u16(const u8* p) {
  return (unsigned)p[0] | ((unsigned)p[1] << 8);
}

__device__ __forceinline__ unsigned ld_u32(const u8* p) {
  return (unsigned)p[0] | ((unsigned)p[1] << 8) | ((unsigned)p[2] << 16) | ((unsigned)p[3] << 24);
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// ---- block decoders: part `part` (elements 8*part .. 8*part+7 of the block) into y[8] ----------

// block_q4_0 { f16 d; u8 qs[16]; }  y[j] = (lo(qs[j]) - 8) * d, y[j+16] = (hi(qs[j]) - 8) * d
struct BQ4_0 {
  enum { BS = 32, BB = 18 };
  static __device__ __forceinline__ void dec(const u8* b, int part, float* y) {
    const float d = f16_to_f32(ld_u16(b));
    const u8* qs = b + 2 + (part & 1) * 8;
    const int sh = (part >> 1) * 4;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int x = (int)((qs[e] >> sh) & 0xF) - 8;
      y[e] = __fmul_rn(__int2float_rn(x), d);
    }
  }
};

// block_q4_1 { f16 d; f16 m; u8 qs[16]; }  y = q * d + m (two roundings, as on the CPU)
struct BQ4_1 {
  enum { BS = 32, BB = 20 };
  static __device__ __forceinline__ void dec(const u8* b, int part, float* y) {
    const float d = f16_to_f32(ld_u16(b));
    const float m = f16_to_f32(ld_u16(b + 2));
    const u8* qs = b + 4 + (part & 1) * 8;
    const int sh = (part >> 1) * 4;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int x = (int)((qs[e] >> sh) & 0xF);
      y[e] = __fadd_rn(__fmul_rn(__int2float_rn(x), d), m);
    }
  }
};

// block_q5_0 { f16 d; u8 qh[4]; u8 qs[16]; }  element j < 16: lo(qs[j]) | bit j of qh << 4;
// element j + 16: hi(qs[j]) | bit (j + 16) of qh << 4; y = (x - 16) * d
struct BQ5_0 {
  enum { BS = 32, BB = 22 };
  static __device__ __forceinline__ void dec(const u8* b, int part, float* y) {
    const float d = f16_to_f32(ld_u16(b));
    const unsigned qh = ld_u32(b + 2);
    const int j0 = (part & 1) * 8;   // byte of qs
    const int hi = part >> 1;        // high nibbles (elements 16..31)
    const u8* qs = b + 6 + j0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int j = j0 + e;
      const unsigned nib = (qs[e] >> (hi * 4)) & 0xFu;
      const unsigned h = ((qh >> (j + hi * 16)) & 1u) << 4;
      const int x = (int)(nib | h) - 16;
      y[e] = __fmul_rn(__int2float_rn(x), d);
    }
  }
};

// block_q8_0 { f16 d; i8 qs[32]; }  y = q * d
struct BQ8_0 {
  enum { BS = 32, BB = 34 };
  static __device__ __forceinline__ void dec(const u8* b, int part, float* y) {
    const float d = f16_to_f32(ld_u16(b));
    const u8* qs = b + 2 + part * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int x = (int)(signed char)qs[e];
      y[e] = __fmul_rn(__int2float_rn(x), d);
    }
  }
};

// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }  256 elements in 4 groups of 64:
// group g, element l < 32: lo(qs[32g + l]) with sub-block 2g; element 32 + l: hi(qs[32g + l])
// with sub-block 2g + 1. d1 = d * sc, m1 = dmin * m, y = d1 * q - m1 (each rounded).
struct BQ4K {
  enum { BS = 256, BB = 144 };
  static __device__ __forceinline__ void dec(const u8* b, int part, float* y) {
    const float d = f16_to_f32(ld_u16(b));
    const float dmin = f16_to_f32(ld_u16(b + 2));
    const u8* sc = b + 4;
    const int g = part >> 3;          // 64-element group
    const int off = (part & 7) * 8;   // element within the group
    const int hi = off >> 5;          // second half of the group: high nibbles
    const int is = 2 * g + hi;        // sub-block (get_scale_min_k4's j)
    unsigned s, m;
    if (is < 4) {
      s = sc[is] & 63u;
      m = sc[is + 4] & 63u;
    } else {
      s = (sc[is + 4] & 0xFu) | ((unsigned)(sc[is - 4] >> 6) << 4);
      m = (unsigned)(sc[is + 4] >> 4) | ((unsigned)(sc[is] >> 6) << 4);
    }
    const float d1 = __fmul_rn(d, __uint2float_rn(s));
    const float m1 = __fmul_rn(dmin, __uint2float_rn(m));
    const u8* q = b + 16 + 32 * g + (off & 31);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const unsigned x = (q[e] >> (hi * 4)) & 0xFu;
      y[e] = __fsub_rn(__fmul_rn(d1, __uint2float_rn(x)), m1);
    }
  }
};

// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }  256 elements in 2 halves of 128;
// in half h, quarter k (32 elements), element l: low 4 bits from ql[64h + l + 32(k & 1)]
// (low nibble for k < 2, high for k >= 2), high 2 bits from qh[32h + l] >> 2k; q = that - 32.
// Element e's scale is scales[e / 16]; y = (d * scale) * q (each rounded).
struct BQ6K {
  enum { BS = 256, BB = 210 };
  static __device__ __forceinline__ void dec(const u8* b, int part, float* y) {
    const u8* ql = b;
    const u8* qh = b + 128;
    const int e0 = part * 8;
    const int h = e0 >> 7;
    const int k = (e0 >> 5) & 3;
    const int l0 = e0 & 31;
    const float d = f16_to_f32(ld_u16(b + 208));
    const int scale = (int)(signed char)b[192 + (e0 >> 4)];
    const float ds = __fmul_rn(d, __int2float_rn(scale));
    const u8* pl = ql + 64 * h + 32 * (k & 1) + l0;
    const u8* ph = qh + 32 * h + l0;
    const int lsh = (k >> 1) * 4;
    const int hsh = 2 * k;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const unsigned lo = (pl[e] >> lsh) & 0xFu;
      const unsigned hb = (ph[e] >> hsh) & 3u;
      const int x = (int)(lo | (hb << 4)) - 32;
      y[e] = __fmul_rn(ds, __int2float_rn(x));
    }
  }
};

// ---- stores ------------------------------------------------------------------------------------

// Writes y[0..8] to slice columns j0 .. j0 + 7 of `drow` (those in 0 .. ncols).
__device__ __forceinline__ void store8(bf16* drow, long long j0, int ncols, const unsigned* bits) {
  bf16* p = drow + j0;
  if (j0 >= 0 && j0 + 8 <= ncols && aligned16(p)) {
    // __stwb: one st.global.wb.v4 (a plain uint4 assignment is split into four 4-byte stores).
    __stwb(reinterpret_cast<uint4*>(p),
        make_uint4(bits[0] | (bits[1] << 16), bits[2] | (bits[3] << 16), bits[4] | (bits[5] << 16),
                   bits[6] | (bits[7] << 16)));
  } else {
    unsigned short* d = reinterpret_cast<unsigned short*>(drow);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const long long j = j0 + e;
      if (j >= 0 && j < ncols) d[j] = (unsigned short)bits[e];
    }
  }
}

// ---- drivers -------------------------------------------------------------------------------

// Grid-stride over (row, item) with item in 0 .. nitems: one 64-bit division per thread, then
// the stride is added as (rows, items) with a carry.
template <class F>
__device__ __forceinline__ void for_each_item(long long rows, long long nitems, F&& f) {
  if (rows <= 0 || nitems <= 0) return;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long row = tid / nitems;
  long long i = tid - row * nitems;
  const long long step_rows = stride / nitems;
  const long long step_i = stride - step_rows * nitems;
  while (row < rows) {
    f(row, i);
    i += step_i;
    row += step_rows;
    if (i >= nitems) {
      i -= nitems;
      row += 1;
    }
  }
}

template <class B>
__device__ __forceinline__ void dequant_blocks(const u8* __restrict__ src, bf16* __restrict__ dst,
                                               long long rows, int cols, int col0, int ncols,
                                               long long row_bytes) {
  constexpr int PARTS = B::BS / 8;
  if (ncols <= 0 || col0 < 0) return;
  const long long b0 = col0 / B::BS;
  long long b1 = ((long long)col0 + ncols - 1) / B::BS;
  const long long nb_row = cols / B::BS;  // blocks of a stored row
  if (b1 > nb_row - 1) b1 = nb_row - 1;   // never read past the row (the host checks the slice)
  const long long nitems = (b1 - b0 + 1) * PARTS;
  for_each_item(rows, nitems, [&](long long row, long long i) {
    const long long blk = b0 + i / PARTS;
    const int part = (int)(i % PARTS);
    float y[8];
    B::dec(src + row * row_bytes + blk * B::BB, part, y);
    unsigned bits[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) bits[e] = bf16_bits(y[e]);
    store8(dst + row * (long long)ncols, blk * B::BS + part * 8 - col0, ncols, bits);
  });
}

// f16 (ESIZE 2) or f32 (ESIZE 4) rows: items of 8 slice columns.
template <int ESIZE>
__device__ __forceinline__ void dequant_float(const u8* __restrict__ src, bf16* __restrict__ dst,
                                              long long rows, int cols, int col0, int ncols,
                                              long long row_bytes) {
  if (ncols <= 0 || col0 < 0 || (long long)col0 + ncols > cols) return;
  const long long nitems = ((long long)ncols + 7) / 8;
  for_each_item(rows, nitems, [&](long long row, long long i) {
    const long long j0 = i * 8;
    const long long left = (long long)ncols - j0;
    const int n = left < 8 ? (int)left : 8;
    const u8* p = src + row * row_bytes + ((long long)col0 + j0) * ESIZE;
    unsigned w[8];  // source elements' bits
    if (n == 8 && aligned16(p)) {
      if (ESIZE == 4) {
        const uint4 a = reinterpret_cast<const uint4*>(p)[0];
        const uint4 c = reinterpret_cast<const uint4*>(p)[1];
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
        w[4] = c.x; w[5] = c.y; w[6] = c.z; w[7] = c.w;
      } else {
        const uint4 a = reinterpret_cast<const uint4*>(p)[0];
        w[0] = a.x & 0xFFFFu; w[1] = a.x >> 16; w[2] = a.y & 0xFFFFu; w[3] = a.y >> 16;
        w[4] = a.z & 0xFFFFu; w[5] = a.z >> 16; w[6] = a.w & 0xFFFFu; w[7] = a.w >> 16;
      }
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        w[e] = 0;
        if (e < n) w[e] = ESIZE == 4 ? ld_u32(p + 4 * e) : ld_u16(p + 2 * e);
      }
    }
    unsigned bits[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const unsigned f = ESIZE == 4 ? w[e] : f16_to_f32_bits(w[e]);
      bits[e] = bf16_bits(__uint_as_float(f));
    }
    store8(dst + row * (long long)ncols, j0, ncols, bits);
  });
}

}  // namespace

#define DEQUANT_BLOCK_KERNEL(NAME, B)                                                          \
  extern "C" __global__ void __launch_bounds__(256)                                            \
      NAME(const unsigned char* __restrict__ src, bf16* __restrict__ dst, long long rows,      \
           int cols, int col0, int ncols, long long row_bytes) {                               \
    dequant_blocks<B>(src, dst, rows, cols, col0, ncols, row_bytes);                           \
  }

DEQUANT_BLOCK_KERNEL(dequant_q4_0_bf16, BQ4_0)
DEQUANT_BLOCK_KERNEL(dequant_q4_1_bf16, BQ4_1)
DEQUANT_BLOCK_KERNEL(dequant_q5_0_bf16, BQ5_0)
DEQUANT_BLOCK_KERNEL(dequant_q8_0_bf16, BQ8_0)
DEQUANT_BLOCK_KERNEL(dequant_q4_k_bf16, BQ4K)
DEQUANT_BLOCK_KERNEL(dequant_q6_k_bf16, BQ6K)

extern "C" __global__ void __launch_bounds__(256)
    dequant_f16_bf16(const unsigned char* __restrict__ src, bf16* __restrict__ dst, long long rows,
                     int cols, int col0, int ncols, long long row_bytes) {
  dequant_float<2>(src, dst, rows, cols, col0, ncols, row_bytes);
}

extern "C" __global__ void __launch_bounds__(256)
    dequant_f32_bf16(const unsigned char* __restrict__ src, bf16* __restrict__ dst, long long rows,
                     int cols, int col0, int ncols, long long row_bytes) {
  dequant_float<4>(src, dst, rows, cols, col0, ncols, row_bytes);
}

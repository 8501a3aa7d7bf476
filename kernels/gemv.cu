// Skinny GEMM for decode steps: y[m, n] = sum_k x[m, k] * w[n, k] for a few rows of activations
// (m < M <= GEMV_MAX_M) against a bf16 weight [N, K] (the linear layers' `x @ w^T`), f32 output,
// f32 sums. At a handful of rows a step is a stream of the weights, and cuBLAS's kernels for it
// (split-K with a separate reduction, tiles sized for larger batches) reached 2.2-4.1 TB/s on an
// H200; this one streams each weight row once and keeps the activations in shared memory.
//
// Each warp owns GEMV_ROWS consecutive weight rows; its lanes walk K in 16-byte words (8 bf16),
// each lane GEMV_UNROLL words of each row in flight, and reduce their partial sums by shuffles at
// the end. The block stages the activations' K tile (up to GEMV_KT columns of every row, bf16) in
// shared memory, so that each activation is read from global memory once per block.
// Requires K % 8 == 0 and 16-byte aligned x and w (checked by the host, which otherwise uses
// cuBLAS). On an H200 it beats cuBLAS at one row only (a Llama-3-8B step 4.92 -> 4.85 ms); from
// four rows on its CUDA-core FMAs and unpacking, not its loads, set the pace, so the host sends
// it single rows by default (RETROWAVE_GEMV=N for up to N). Tensor cores (mma.sync with the rows
// padded to 8) are the way to keep the weight stream at full rate for more rows.
// Launch: block 256 (8 warps), grid ceil(N / (8 * GEMV_ROWS)); static shared memory
// GEMV_MAX_M * GEMV_KT * 2 bytes (32 KB).
#include "common.cuh"

#define GEMV_MAX_M 8
#define GEMV_KT 2048
#define GEMV_ROWS 2
#define GEMV_UNROLL 4

namespace {

// 8 bf16 (one 16-byte word) as floats.
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 a = __bfloat1622float2(p[i]);
    f[2 * i] = a.x;
    f[2 * i + 1] = a.y;
  }
}

// Adds the products of one word of each weight row (unpacked) with one word of every activation
// row to the accumulators; each word is unpacked once.
template <int M>
__device__ __forceinline__ void fma_word(const uint4 (&wv)[GEMV_ROWS], const uint4* xs_col,
                                         float (&acc)[GEMV_ROWS][M]) {
  float wf[GEMV_ROWS][8];
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; r++) unpack8(wv[r], wf[r]);
#pragma unroll
  for (int m = 0; m < M; m++) {
    float xf[8];
    unpack8(xs_col[m * (GEMV_KT / 8)], xf);
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
      for (int i = 0; i < 8; i++) acc[r][m] = fmaf(wf[r][i], xf[i], acc[r][m]);
  }
}

// One 16-byte word of a weight row, streamed (read once: kept out of L1).
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <int M>
__device__ __forceinline__ void gemv_rows(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          float* __restrict__ y, int n_rows, int k_len, uint4* xs) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * (blockDim.x >> 5) + warp) * GEMV_ROWS;
  const int words = k_len >> 3;  // 16-byte words a row
  float acc[GEMV_ROWS][M];
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
    for (int m = 0; m < M; m++) acc[r][m] = 0.0f;
  const uint4* w4[GEMV_ROWS];
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; r++) {
    // Rows past the end read row 0 (valid memory) and are not written.
    const int n = n0 + r < n_rows ? n0 + r : 0;
    w4[r] = reinterpret_cast<const uint4*>(w + (long long)n * k_len);
  }
  const uint4* x4 = reinterpret_cast<const uint4*>(x);
  for (int t0 = 0; t0 < words; t0 += GEMV_KT / 8) {
    const int tw = min(GEMV_KT / 8, words - t0);
    __syncthreads();
    for (int i = threadIdx.x; i < M * tw; i += blockDim.x) {
      const int m = i / tw, c = i - m * tw;
      xs[m * (GEMV_KT / 8) + c] = __ldg(x4 + (long long)m * words + t0 + c);
    }
    __syncthreads();
    int c = lane;
    for (; c + 32 * (GEMV_UNROLL - 1) < tw; c += 32 * GEMV_UNROLL) {
      uint4 wv[GEMV_UNROLL][GEMV_ROWS];
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; u++)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) wv[u][r] = load_stream(w4[r] + t0 + c + 32 * u);
#pragma unroll
      for (int u = 0; u < GEMV_UNROLL; u++) fma_word<M>(wv[u], xs + c + 32 * u, acc);
    }
    for (; c < tw; c += 32) {
      uint4 wv[GEMV_ROWS];
#pragma unroll
      for (int r = 0; r < GEMV_ROWS; r++) wv[r] = load_stream(w4[r] + t0 + c);
      fma_word<M>(wv, xs + c, acc);
    }
  }
#pragma unroll
  for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
    for (int m = 0; m < M; m++) {
      float v = acc[r][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && n0 + r < n_rows) y[(long long)m * n_rows + n0 + r] = v;
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(256)
    gemv_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w, float* __restrict__ y, int m_rows,
              int n_rows, int k_len) {
  __shared__ uint4 xs[GEMV_MAX_M * GEMV_KT / 8];
  switch (m_rows) {
    case 1: gemv_rows<1>(x, w, y, n_rows, k_len, xs); break;
    case 2: gemv_rows<2>(x, w, y, n_rows, k_len, xs); break;
    case 3: gemv_rows<3>(x, w, y, n_rows, k_len, xs); break;
    case 4: gemv_rows<4>(x, w, y, n_rows, k_len, xs); break;
    case 5: gemv_rows<5>(x, w, y, n_rows, k_len, xs); break;
    case 6: gemv_rows<6>(x, w, y, n_rows, k_len, xs); break;
    case 7: gemv_rows<7>(x, w, y, n_rows, k_len, xs); break;
    case 8: gemv_rows<8>(x, w, y, n_rows, k_len, xs); break;
    default: break;
  }
}

// The same product on the tensor cores: y[m, n] for m < M <= 8 as one n8 tile of
// mma.sync.m16n8k16 (bf16 in, f32 accumulators), 16 weight rows a block. A sum over k does not
// depend on the order of k, so each thread loads whole 16-byte words (8 consecutive k) of its two
// weight rows (g and g + 8 of the tile) and of activation row g, and feeds them to the fragments'
// k slots in the same order for both operands: the weights stream with plain vector loads, no
// shared memory and no unpacking. The block's 8 warps take interleaved runs of K and add their
// accumulators in shared memory at the end.
// Requires K % 32 == 0 and 16-byte aligned x and w.
// Launch: block 256, grid ceil(N / 16).
namespace {

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 32-wide k chunk: words `lo` (row g), `hi` (row g + 8) and `xv` (activation row g) hold k
// 8t..8t+7 of it for thread t of the quad; two k16 steps.
__device__ __forceinline__ void mma_chunk(float (&c)[4], uint4 lo, uint4 hi, uint4 xv) {
  mma_bf16_16816(c, lo.x, hi.x, lo.y, hi.y, xv.x, xv.y);
  mma_bf16_16816(c, lo.z, hi.z, lo.w, hi.w, xv.z, xv.w);
}

}  // namespace

#define GEMV_TC_UNROLL 4

extern "C" __global__ void __launch_bounds__(256)
    gemv_tc_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w, float* __restrict__ y, int m_rows,
                 int n_rows, int k_len) {
  __shared__ float red[8][32][4];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16;
  // Rows past the end read the last row (valid memory) and are not written.
  const int ra = min(row0 + g, n_rows - 1), rb = min(row0 + g + 8, n_rows - 1);
  const uint4* wa = reinterpret_cast<const uint4*>(w + (long long)ra * k_len) + t;
  const uint4* wb = reinterpret_cast<const uint4*>(w + (long long)rb * k_len) + t;
  const bool has_x = g < m_rows;
  const uint4* xr = reinterpret_cast<const uint4*>(x + (long long)(has_x ? g : 0) * k_len) + t;
  const int chunks = k_len >> 5;
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  // The block's warps take neighbouring runs of GEMV_TC_UNROLL chunks, so that together they read
  // 8 * GEMV_TC_UNROLL * 64 bytes of each weight row at a time (long runs in each DRAM page).
  for (int base = warp * GEMV_TC_UNROLL; base < chunks; base += 8 * GEMV_TC_UNROLL) {
    if (base + GEMV_TC_UNROLL <= chunks) {
      uint4 lo[GEMV_TC_UNROLL], hi[GEMV_TC_UNROLL], xv[GEMV_TC_UNROLL];
#pragma unroll
      for (int u = 0; u < GEMV_TC_UNROLL; u++) {
        lo[u] = load_stream(wa + 4 * (base + u));
        hi[u] = load_stream(wb + 4 * (base + u));
        xv[u] = has_x ? __ldg(xr + 4 * (base + u)) : zero;
      }
#pragma unroll
      for (int u = 0; u < GEMV_TC_UNROLL; u++) mma_chunk(c, lo[u], hi[u], xv[u]);
    } else {
      for (int ch = base; ch < chunks; ch++) {
        const uint4 lo = load_stream(wa + 4 * ch), hi = load_stream(wb + 4 * ch);
        const uint4 xv = has_x ? __ldg(xr + 4 * ch) : zero;
        mma_chunk(c, lo, hi, xv);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; i++) red[warp][lane][i] = c[i];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      float s = 0.0f;
#pragma unroll
      for (int v = 0; v < 8; v++) s += red[v][lane][i];
      // c0, c1: (row g, columns 2t, 2t + 1); c2, c3: (row g + 8, the same columns).
      const int row = row0 + g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      if (row < n_rows && col < m_rows) y[(long long)col * n_rows + row] = s;
    }
  }
}

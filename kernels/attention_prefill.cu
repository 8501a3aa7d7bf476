#include "common.cuh"

// Causal prefill attention on tensor cores (FlashAttention-2/3 style), see kernels/README.md.
//
// attn_prefill_hd{64,128}: grid (n_tiles, n_heads), block PF_THREADS = 2 * PREFILL_BLOCK_M threads
// (one warp per 16 query rows), dynamic shared memory (PREFILL_BLOCK_M + 2 * PF_STAGES * 64) * hd * 2
// bytes: a Q tile and a ring of K/V tiles of PF_BLOCK_N (64) keys filled by cp.async. With
// PREFILL_BLOCK_M = 64 (common.cuh): 128 threads, 3 stages, 112 KB at hd 128 / 56 KB at hd 64.
// With PREFILL_BLOCK_M = 128: 256 threads, 4 stages, 160 KB / 80 KB. No static shared memory: the
// wgmma path needs the dynamic block at a 1024-byte aligned address (checked, traps otherwise).
//
// Two code paths, same launch configuration:
//  * sm_90a (compiled with --gpu-architecture=sm_90a / compute_90a): one warpgroup (4 warps) per
//    64 query rows issues wgmma.mma_async. S = Q K^T takes Q from registers (A fragments loaded
//    once with ldmatrix) and K from shared memory (K-major, 128-byte swizzle); O += P V takes P
//    straight from the S accumulators (bf16 A fragments) and V from shared memory (N-major,
//    transposed by the descriptor). The softmax of tile j+1 runs while O += P_j V_j is still in
//    flight on the tensor cores (S_{j+1} is issued first).
//  * otherwise: mma.sync m16n8k16 per warp (16 rows), ldmatrix(.trans) fragments.
//
// Tile order: CTAs are renumbered so that consecutive CTAs are the heads of one row tile (the
// heads of a GQA group read the same K/V, which stays in L2) and the heaviest tiles (last rows of
// a sequence) start first.
//
// Fragment layout shared by mma.sync m16n8k16 and the per-warp slice of wgmma m64nNk16
// (g = lane / 4, t = lane % 4):
//   A (16x16, row-major) a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8, 2t+8..)
//   C (16x8 per n8 block, f32) c0,c1:(g, 2t..2t+1) c2,c3:(g+8, 2t..2t+1)
// So each thread owns rows g and g+8 of its warp's 16 rows; a row's values are spread over the
// 4 lanes of a quad (reductions: shuffles xor 1, 2). Scores are kept in log2 units
// (scale * log2e folded in) and exponentiated with ex2.approx.

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#ifndef PF_BM
#define PF_BM PREFILL_BLOCK_M     // query rows per CTA
#endif
#ifndef PF_STAGES
#define PF_STAGES (PF_BM >= 128 ? 4 : 3)  // K/V ring depth
#endif
#define PF_BLOCK_N 64             // keys per tile
#define PF_WARPS (PF_BM / 16)     // one warp per 16 query rows
#define PF_THREADS (PF_WARPS * 32)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(PF_NO_WGMMA)
#define PF_WGMMA 1
#endif

namespace pf {

using namespace tc;

// Byte offset of 16-byte chunk `ch` of row `row` in a swizzled tile with HD-element rows.
template <int HD>
__device__ __forceinline__ unsigned swz(int row, int ch) {
  return (unsigned)(row * (HD * 2) + ((ch ^ (row & 7)) << 4));
}

// Copy `n_rows_tile` rows of HD bf16 (row r from src + r * stride elements) into a swizzled
// tile; rows >= valid are zero-filled (nothing is read for them).
template <int HD, int ROWS>
__device__ __forceinline__ void load_tile(unsigned dst, const bf16* src, size_t stride, int valid, int tid) {
  constexpr int CPR = HD / 8;
#pragma unroll
  for (int k = 0; k < ROWS * CPR / PF_THREADS; ++k) {
    const int c = tid + k * PF_THREADS;
    const int r = c / CPR, ch = c % CPR;
    const bool ok = r < valid;
    cp_async16(dst + swz<HD>(r, ch), ok ? (const void*)(src + r * stride + ch * 8) : (const void*)src, ok);
  }
}


// Tile order: consecutive CTAs take the heads of one row tile, heaviest tiles first.
__device__ __forceinline__ void tile_and_head(int n_heads, int& tile, int& h) {
  const int lin = blockIdx.x + blockIdx.y * gridDim.x;
  h = lin % n_heads;
  tile = gridDim.x - 1 - lin / n_heads;
}

#ifdef PF_WGMMA
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accesses to accumulator registers across wgmma issue / wait.
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void fence_reg(unsigned& r) { asm volatile("" : "+r"(r)::"memory"); }

// Shared-memory matrix descriptor, 128-byte swizzle; tiles start at 1024-byte aligned addresses.
__device__ __forceinline__ unsigned long long wg_desc(unsigned addr, unsigned lbo, unsigned sbo) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
         ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// D (64 x N per warpgroup, f32) (+)= A (64 x 16 bf16, registers) * B (16 x N, shared memory descriptor).
// TB = 0: B stored K-major (N rows of K contiguous elements); TB = 1: N-major (K rows of N).
template <int TB>
__device__ __forceinline__ void wgmma_n64(float* d, const unsigned* a, unsigned long long desc, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32,%33,%34,%35}, %36, p, 1, 1, %38;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d), "n"(TB));
}
template <int TB>
__device__ __forceinline__ void wgmma_n128(float* d, const unsigned* a, unsigned long long desc, int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64,%65,%66,%67}, %68, p, 1, 1, %70;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(scale_d), "n"(TB));
}


// Byte offset of 16-byte chunk `ch` (8 bf16) of row `r` in a wgmma tile of `rows` rows: the
// head dim is split into 64-element blocks of rows x 128 bytes, chunks swizzled by (r & 7).
__device__ __forceinline__ unsigned wswz(int rows, int r, int ch) {
  return (unsigned)((ch >> 3) * rows * 128 + r * 128 + (((ch & 7) ^ (r & 7)) << 4));
}

template <int HD, int ROWS>
__device__ __forceinline__ void load_tile_wg(unsigned dst, const bf16* src, size_t stride, int valid, int tid) {
  constexpr int CPR = HD / 8;
#pragma unroll
  for (int k = 0; k < ROWS * CPR / PF_THREADS; ++k) {
    const int c = tid + k * PF_THREADS;
    const int r = c / CPR, ch = c % CPR;
    const bool ok = r < valid;
    cp_async16(dst + wswz(ROWS, r, ch), ok ? (const void*)(src + r * stride + ch * 8) : (const void*)src, ok);
  }
}

template <int HD>
__device__ __forceinline__ void prefill_wg(const bf16* __restrict__ q, const SeqDesc* __restrict__ seqs,
                                           const int* __restrict__ tile_seq, const int* __restrict__ tile_row0,
                                           int layer, int n_heads, int n_kv, float scale, float* __restrict__ out,
                                           float* __restrict__ lse) {
  static_assert(PF_BM % 64 == 0, "wgmma path: 64 query rows per warpgroup");
  static_assert(PF_STAGES >= 3, "ring of at least 3 stages");
  constexpr int KT = HD / 16;              // k16 steps over the head dim (Q K^T)
  constexpr int NO = HD / 2;               // O accumulators per thread (64 x HD per warpgroup)
  constexpr int NS = PF_BLOCK_N / 2;       // S accumulators per thread (64 x 64)
  constexpr int PK = PF_BLOCK_N / 16;      // k16 steps over the keys (P V)
  constexpr float LOG2E = 1.4426950408889634f;
  constexpr float LN2 = 0.6931471805599453f;
  constexpr unsigned TILE_BYTES = PF_BLOCK_N * HD * 2;

  extern __shared__ __align__(1024) unsigned char smem[];
  const unsigned sQ = smem_u32(smem);
  const unsigned sKV = sQ + PF_BM * HD * 2;
  auto stage_k = [&](int j) { return sKV + (unsigned)(j % PF_STAGES) * 2 * TILE_BYTES; };
  if ((sQ & 1023u) != 0) __trap();  // 128-byte swizzle atoms must start 1024-byte aligned

  int tile, h;
  tile_and_head(n_heads, tile, h);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;

  const SeqDesc sd = seqs[tile_seq[tile]];
  const int row0 = tile_row0[tile];
  const int rows_valid = min(PF_BM, sd.row + sd.n_tokens - row0);
  if (rows_valid <= 0) return;
  const int p0 = sd.start_pos + (row0 - sd.row);
  const int n_keys = p0 + rows_valid;
  const int n_kt = (n_keys + PF_BLOCK_N - 1) / PF_BLOCK_N;
  const int kvh = h / (n_heads / n_kv);
  const bf16* kbase = seq_k(sd, layer, n_kv, kvh, HD);
  const bf16* vbase = seq_v(sd, layer, n_kv, kvh, HD);

  auto issue_tile = [&](int j) {
    if (j < n_kt) {
      const int kb = j * PF_BLOCK_N;
      load_tile_wg<HD, PF_BLOCK_N>(stage_k(j), kbase + (size_t)kb * HD, HD, n_keys - kb, tid);
      load_tile_wg<HD, PF_BLOCK_N>(stage_k(j) + TILE_BYTES, vbase + (size_t)kb * HD, HD, n_keys - kb, tid);
    }
    cp_async_commit();
  };
  load_tile_wg<HD, PF_BM>(sQ, q + ((size_t)row0 * n_heads + h) * HD, (size_t)n_heads * HD, rows_valid, tid);
#pragma unroll
  for (int j = 0; j < PF_STAGES - 1; ++j) issue_tile(j);

  const int wg0 = (warp >> 2) * 64;       // first tile row of this warpgroup
  const int wrow = warp * 16;             // first tile row of this warp
  const int pos_w = p0 + wrow;            // its position
  const float sl = scale * LOG2E;
  // Tiles whose last key passes this key need the mask (first row of the warpgroup, or the end).
  const int wg_mask_from = min(p0 + wg0, n_keys - 1);

  unsigned qf[KT][4];
  float o[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i] = 0.f;
  float s[NS];
  unsigned p[PK][4], pn[PK][4];
  float mrow[2] = {-INFINITY, -INFINITY};
  float lrow[2] = {0.f, 0.f};
  float corr[2] = {1.f, 1.f};

  auto issue_s = [&](int j) {
    const unsigned kt = stage_k(j);
#pragma unroll
    for (int kk = 0; kk < KT; ++kk)
      wgmma_n64<0>(s, qf[kk], wg_desc(kt + (kk >> 2) * (PF_BLOCK_N * 128) + (kk & 3) * 32, 16, 1024), kk > 0);
    wgmma_commit();
  };
  auto issue_pv = [&](int j) {
    const unsigned vt = stage_k(j) + TILE_BYTES;
    // N-major B: 64-wide head-dim blocks PF_BLOCK_N * 128 bytes apart (LBO), 8-key groups 1024 (SBO).
    constexpr unsigned LBO = PF_BLOCK_N * 128, SBO = 1024;
#pragma unroll
    for (int kk = 0; kk < PK; ++kk) {
      if constexpr (HD == 128)
        wgmma_n128<1>(o, p[kk], wg_desc(vt + kk * 16 * 128, LBO, SBO), 1);
      else
        wgmma_n64<1>(o, p[kk], wg_desc(vt + kk * 16 * 128, LBO, SBO), 1);
    }
    wgmma_commit();
  };
  // Softmax of tile j's scores (in s) into pn; corr = factor for O.
  auto softmax = [&](int j) {
#pragma unroll
    for (int i = 0; i < NS; ++i) fence_reg(s[i]);
    const int kb = j * PF_BLOCK_N;
    if (kb + PF_BLOCK_N - 1 > wg_mask_from) {
#pragma unroll
      for (int n = 0; n < NS / 4; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = kb + n * 8 + 2 * t4 + (e & 1);
          const int pos = pos_w + g + ((e >> 1) << 3);
          if (key > pos || key >= n_keys) s[4 * n + e] = -INFINITY;
        }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < NS / 4; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(mrow[r], mx * sl);
      const float ms = (mn == -INFINITY) ? 0.f : mn;
      corr[r] = ex2(mrow[r] - ms);
      mrow[r] = mn;
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < NS / 4; ++n) {
        const float e0 = ex2(fmaf(s[4 * n + 2 * r], sl, -ms));
        const float e1 = ex2(fmaf(s[4 * n + 2 * r + 1], sl, -ms));
        s[4 * n + 2 * r] = e0;
        s[4 * n + 2 * r + 1] = e1;
        sum += e0 + e1;
      }
      lrow[r] = lrow[r] * corr[r] + sum;
    }
#pragma unroll
    for (int kk = 0; kk < PK; ++kk) {
      pn[kk][0] = pack_bf16(s[8 * kk + 0], s[8 * kk + 1]);
      pn[kk][1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
      pn[kk][2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
      pn[kk][3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  auto rescale_o = [&]() {  // unconditional: a branch here makes ptxas serialize the wgmma
#pragma unroll
    for (int d = 0; d < NO / 4; ++d) {
      o[4 * d + 0] *= corr[0];
      o[4 * d + 1] *= corr[0];
      o[4 * d + 2] *= corr[1];
      o[4 * d + 3] *= corr[1];
    }
  };


  cp_async_wait<PF_STAGES - 2>();  // Q and tile 0
  fence_proxy_async();
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    const int r = wrow + (lane & 15);
    ldsm_x4(sQ + wswz(PF_BM, r, kk * 2 + (lane >> 4)), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
  }
  // Every warpgroup runs the same wgmma sequence (no divergent wgmma: the compiler would serialize
  // them); a warpgroup whose rows see none of a tile's keys just gets P = 0 there.
  wgmma_fence();
  issue_s(0);
  wgmma_wait<0>();
  softmax(0);
#pragma unroll
  for (int kk = 0; kk < PK; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) p[kk][i] = pn[kk][i];

  for (int j = 0; j < n_kt - 1; ++j) {
    cp_async_wait<PF_STAGES - 3>();  // tile j+1 landed (this thread's copies)
    fence_proxy_async();
    __syncthreads();                 // ... all copies; everyone is done with tile j-1's stage
    issue_tile(j + PF_STAGES - 1);
#pragma unroll
    for (int i = 0; i < NO; ++i) fence_reg(o[i]);
    wgmma_fence();
    issue_s(j + 1);
    issue_pv(j);
    wgmma_wait<1>();
    softmax(j + 1);
    wgmma_wait<0>();
#pragma unroll
    for (int kk = 0; kk < PK; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) fence_reg(p[kk][i]);
#pragma unroll
    for (int i = 0; i < NO; ++i) fence_reg(o[i]);
    rescale_o();
#pragma unroll
    for (int kk = 0; kk < PK; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) p[kk][i] = pn[kk][i];
  }
#pragma unroll
  for (int i = 0; i < NO; ++i) fence_reg(o[i]);
  wgmma_fence();
  issue_pv(n_kt - 1);
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < NO; ++i) fence_reg(o[i]);
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = lrow[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = (l > 0.f) ? 1.f / l : 0.f;
    const int tr = wrow + g + 8 * r;
    if (tr < rows_valid) {
      float* dst = out + ((size_t)(row0 + tr) * n_heads + h) * HD + 2 * t4;
#pragma unroll
      for (int d = 0; d < NO / 4; ++d)
        *reinterpret_cast<float2*>(dst + d * 8) = make_float2(o[4 * d + 2 * r] * inv, o[4 * d + 2 * r + 1] * inv);
      if (lse != nullptr && t4 == 0)
        lse[(size_t)(row0 + tr) * n_heads + h] = (l > 0.f) ? (mrow[r] + __log2f(l)) * LN2 : -INFINITY;
    }
  }
}
#endif  // PF_WGMMA

template <int HD>
__device__ __forceinline__ void prefill(const bf16* __restrict__ q, const SeqDesc* __restrict__ seqs,
                                        const int* __restrict__ tile_seq, const int* __restrict__ tile_row0,
                                        int layer, int n_heads, int n_kv, float scale, float* __restrict__ out,
                                        float* __restrict__ lse) {
  constexpr int KT = HD / 16;       // k16 steps over the head dim (Q K^T)
  constexpr int DT = HD / 8;        // n8 tiles over the head dim (O)
  constexpr int NT = PF_BLOCK_N / 8;  // n8 tiles over the keys (S)
  constexpr float LOG2E = 1.4426950408889634f;
  constexpr float LN2 = 0.6931471805599453f;
  constexpr unsigned TILE_BYTES = PF_BLOCK_N * HD * 2;

  extern __shared__ __align__(128) unsigned char smem[];
  // [Q: BM x HD][K stage 0][V stage 0][K stage 1][V stage 1]..., all swizzled bf16 rows.
  const unsigned sQ = smem_u32(smem);
  const unsigned sKV = sQ + PF_BM * HD * 2;
  auto stage_k = [&](int j) { return sKV + (unsigned)(j % PF_STAGES) * 2 * TILE_BYTES; };

  int tile, h;
  tile_and_head(n_heads, tile, h);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;

  const SeqDesc sd = seqs[tile_seq[tile]];
  const int row0 = tile_row0[tile];
  const int rows_valid = min(PF_BM, sd.row + sd.n_tokens - row0);
  if (rows_valid <= 0) return;
  const int p0 = sd.start_pos + (row0 - sd.row);  // position of the tile's first row
  const int n_keys = p0 + rows_valid;             // keys 0 .. n_keys-1 are visible to some row
  const int n_kt = (n_keys + PF_BLOCK_N - 1) / PF_BLOCK_N;
  const int kvh = h / (n_heads / n_kv);
  const bf16* kbase = seq_k(sd, layer, n_kv, kvh, HD);
  const bf16* vbase = seq_v(sd, layer, n_kv, kvh, HD);

  // One cp.async group per tile (tile 0's also holds Q); tiles past the end commit empty groups.
  auto issue_tile = [&](int j) {
    if (j < n_kt) {
      const int kb = j * PF_BLOCK_N;
      load_tile<HD, PF_BLOCK_N>(stage_k(j), kbase + (size_t)kb * HD, HD, n_keys - kb, tid);
      load_tile<HD, PF_BLOCK_N>(stage_k(j) + TILE_BYTES, vbase + (size_t)kb * HD, HD, n_keys - kb, tid);
    }
    cp_async_commit();
  };
  load_tile<HD, PF_BM>(sQ, q + ((size_t)row0 * n_heads + h) * HD, (size_t)n_heads * HD, rows_valid, tid);
#pragma unroll
  for (int j = 0; j < PF_STAGES - 1; ++j) issue_tile(j);

  const int wrow = warp * 16;         // first tile row of this warp
  const int pos_w = p0 + wrow;        // its position
  const float sl = scale * LOG2E;

  unsigned qf[KT][4];                 // Q fragments (A operands), loaded after the first wait
  float o[DT][4];
#pragma unroll
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows g, g+8
  float lrow[2] = {0.f, 0.f};              // this thread's partial row sums

  for (int j = 0; j < n_kt; ++j) {
    const int kb = j * PF_BLOCK_N;  // first key of the tile
    cp_async_wait<PF_STAGES - 2>();  // tile j (and Q) landed for this thread's copies
    __syncthreads();                 // ... for all threads; and everyone is done with tile j-1
    issue_tile(j + PF_STAGES - 1);   // into tile j-1's stage

    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < KT; ++kk)
        ldsm_x4(sQ + swz<HD>(wrow + (lane & 15), kk * 2 + (lane >> 4)), qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3]);
    }

    // Does this warp see any key of the tile? (warp-uniform; the barriers below are outside.)
    const bool warp_active = kb <= pos_w + 15;
    float s[NT][4];
    if (warp_active) {
      // ---- S = Q K^T (16 x 64 per warp) ----
#pragma unroll
      for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
      const unsigned kt = stage_k(j);
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          // matrices: (keys np*16+0..7, dims kk*16+0..7), (same keys, dims +8), (keys +8, dims),
          // (keys +8, dims +8) = b0,b1 of n-tile 2np and b0,b1 of n-tile 2np+1.
          unsigned b0, b1, b2, b3;
          ldsm_x4(kt + swz<HD>(np * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)), b0, b1, b2,
                  b3);
          mma16816(s[2 * np], qf[kk], b0, b1);
          mma16816(s[2 * np + 1], qf[kk], b2, b3);
        }
      }
      // ---- causal mask (only tiles that reach past the first row's position) ----
      if (kb + PF_BLOCK_N - 1 > p0) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = kb + n * 8 + 2 * t4 + (e & 1);
            const int pos = pos_w + g + ((e >> 1) << 3);
            if (key > pos || key >= n_keys) s[n][e] = -INFINITY;
          }
      }
      // ---- online softmax (rows g: e = 0,1; g+8: e = 2,3) ----
      float corr[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(mrow[r], mx * sl);
        const float ms = (mn == -INFINITY) ? 0.f : mn;
        corr[r] = ex2(mrow[r] - ms);
        mrow[r] = mn;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const float e0 = ex2(fmaf(s[n][2 * r], sl, -ms));
          const float e1 = ex2(fmaf(s[n][2 * r + 1], sl, -ms));
          s[n][2 * r] = e0;
          s[n][2 * r + 1] = e1;
          sum += e0 + e1;
        }
        lrow[r] = lrow[r] * corr[r] + sum;
      }
      // Rescale O only when some row's max moved (rare after the first tiles).
      if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
        for (int d = 0; d < DT; ++d) {
          o[d][0] *= corr[0];
          o[d][1] *= corr[0];
          o[d][2] *= corr[1];
          o[d][3] *= corr[1];
        }
      }
      // ---- O += P V: P (16 x 64) as A operands straight from the S accumulators ----
      const unsigned vt = stage_k(j) + TILE_BYTES;
#pragma unroll
      for (int kk = 0; kk < PF_BLOCK_N / 16; ++kk) {
        unsigned a[4];
        a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
        a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
        a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < DT / 2; ++dp) {
          // transposed matrices: (keys kk*16+0..7, dims dp*16+0..7), (keys +8, dims), (keys, dims +8),
          // (keys +8, dims +8) = b0,b1 of dim tile 2dp and b0,b1 of dim tile 2dp+1.
          unsigned b0, b1, b2, b3;
          ldsm_x4_t(vt + swz<HD>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dp * 2 + (lane >> 4)), b0, b1, b2,
                    b3);
          mma16816(o[2 * dp], a, b0, b1);
          mma16816(o[2 * dp + 1], a, b2, b3);
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: normalise and store the valid rows ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = lrow[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = (l > 0.f) ? 1.f / l : 0.f;
    const int tr = wrow + g + 8 * r;  // tile row
    if (tr < rows_valid) {
      float* dst = out + ((size_t)(row0 + tr) * n_heads + h) * HD + 2 * t4;
#pragma unroll
      for (int d = 0; d < DT; ++d)
        *reinterpret_cast<float2*>(dst + d * 8) = make_float2(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
      if (lse != nullptr && t4 == 0)
        lse[(size_t)(row0 + tr) * n_heads + h] = (l > 0.f) ? (mrow[r] + __log2f(l)) * LN2 : -INFINITY;
    }
  }
}

}  // namespace pf

#ifdef PF_WGMMA
#define PF_IMPL pf::prefill_wg
#else
#define PF_IMPL pf::prefill
#endif

extern "C" __global__ void __launch_bounds__(PF_THREADS, 2)
    attn_prefill_hd64(const bf16* q, const SeqDesc* seqs, const int* tile_seq, const int* tile_row0, int layer,
                      int n_heads, int n_kv, float scale, float* out, float* lse) {
  PF_IMPL<64>(q, seqs, tile_seq, tile_row0, layer, n_heads, n_kv, scale, out, lse);
}

extern "C" __global__ void __launch_bounds__(PF_THREADS, (PF_THREADS >= 256 ? 1 : 2))
    attn_prefill_hd128(const bf16* q, const SeqDesc* seqs, const int* tile_seq, const int* tile_row0, int layer,
                       int n_heads, int n_kv, float scale, float* out, float* lse) {
  PF_IMPL<128>(q, seqs, tile_seq, tile_row0, layer, n_heads, n_kv, scale, out, lse);
}

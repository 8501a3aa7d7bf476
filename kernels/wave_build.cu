#include "common.cuh"

// The wave index build on the GPU (see kernels/README.md and crates/retrowave-cuda/src/wave_build.rs):
// segmented spherical k-means with mean-centring, batched over units (one unit = one (layer, KV
// head) of one sequence, all units sharing the token range and the segments), bit-exact with the
// CPU reference retrowave_index::kmeans::kmeans_segments given the same bf16 keys and values:
//
// - every inner product is one f32 accumulator, k = 0 .. hd-1 in order, with fmaf (the CPU's
//   fused multiply-add), of the centred key f32(key) - mean (computed on the fly, never stored)
//   and the f32 centroid direction;
// - ties of the argmax go to the lowest cluster id; a score that is never larger than -inf
//   (NaN, -inf) leaves cluster 0 (the CPU's rule);
// - every f64 sum runs in ascending token order, one thread per (cluster or unit, dimension);
// - members come from a stable counting sort (ascending tokens within each cluster);
// - no float atomics: the results are deterministic.
//
// Kernels (u = unit, the grid's y; K = clusters of all segments, n = clustered tokens):
// wave_build_mean: grid (n_units), block hd. mean[u][d] = f32(sum_t f64(key[t][d]) / n).
// wave_build_init: grid (ceil(K / WB_INIT_THREADS), n_units). Direction of cluster j of a
//   segment = the normalised centred key of its token start + j * len / k.
// wave_build_assign_hd{64,128}: grid (n_tiles, n_units), block WB_THREADS, dynamic shared memory
//   wb_assign_smem(hd). Tile i covers tokens tok .. tok + rows (<= WB_BM) against the centroids
//   c_start .. c_start + c_count, WB_BN at a time: a register-blocked f32 GEMM (8 x 8 a thread)
//   with the running argmax fused; writes assign[u][flat + r] = c_start + best.
// wave_build_count: grid (ceil(n / 256), n_units). counts[u][assign] += 1 (integer atomics,
//   warp-aggregated); counts must be zero on entry.
// wave_build_scan: grid (n_units), block WB_SCAN_THREADS. offsets[u] = exclusive prefix sums of
//   counts[u] (K + 1 entries); leaves counts at zero for the next round.
// wave_build_scatter: grid (n_units), block 32 (one warp walks the unit's tokens in order, 32 at a
//   time: peers by __match_any_sync, the lowest lane of each group bumps the cursor), dynamic
//   shared memory K * 4 bytes when cursor_in_smem, else cursor [u][K] in global memory: the
//   stable counting sort, members[u][offsets[u][c] ..] = tokens of cluster c ascending.
// wave_build_update: grid (ceil(K / WB_UPD_CLUSTERS), n_units), block WB_UPD_THREADS. New
//   directions: per cluster, the f64 sum of its members' centred keys, to f32, normalised in f64
//   (empty clusters keep theirs).
// wave_build_summary: grid (ceil(K / (WB_SUM_THREADS / hd)), n_units), block WB_SUM_THREADS.
//   Sizes, ln sizes, mean keys (f32 and bf16), value sums and mean values of the final clusters.
// wave_build_gather: grid (ceil(n / WB_GATHER_WARPS), n_units), block 32 * WB_GATHER_WARPS. K and
//   V rows in member order to dst + u * stride + p * hd (device or host-mapped memory).

// Shapes; the host reads these values from this file (a test holds them equal).
#define WB_BM 128           // tokens per assign CTA
#define WB_BN 128           // centroids per tile of the assign kernel
#define WB_BK 16            // dimensions per step of a centroid tile (double-buffered)
#define WB_THREADS 256      // threads of an assign CTA (16 x 16, 8 x 8 scores each)
#define WB_INIT_THREADS 128 // threads of an init CTA (one cluster each)
#define WB_COUNT_THREADS 256
#define WB_SCAN_THREADS 1024
#define WB_UPD_CLUSTERS 32  // clusters per update CTA
#define WB_UPD_THREADS 256
#define WB_SUM_THREADS 256  // threads of a summary CTA (one per (cluster, dimension))
#define WB_GATHER_WARPS 8   // rows per gather CTA (a warp each)
#define WB_MAX_HD 128

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// One unit: its K and V rows (bf16, token t at base + t * hd).
struct BuildUnit {
  unsigned long long keys;
  unsigned long long values;
};

// One segment: tokens start .. end, its clusters c_start .. c_start + clusters (ids over all
// segments), its first token's index among the clustered tokens (flat).
struct WbSeg {
  int start, end, c_start, clusters, flat;
};

// One row tile of the assign kernel.
struct WbTile {
  int tok;      // first token
  int rows;     // tokens (<= WB_BM)
  int flat;     // index of the first among the clustered tokens
  int c_start;  // first centroid
  int c_count;  // centroids
};

namespace wb {

__device__ __forceinline__ const bf16* keys_of(const BuildUnit* units, int u) {
  return reinterpret_cast<const bf16*>(units[u].keys);
}

// Eight bf16 (one 16-byte word) to floats (exact).
__device__ __forceinline__ void unpack8(uint4 w, float* f) {
  const unsigned x[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(x[i] << 16);
    f[2 * i + 1] = __uint_as_float(x[i] & 0xffff0000u);
  }
}

// (v, id) beats (bv, bid): larger score, then lower id.
__device__ __forceinline__ bool beats(float v, int id, float bv, int bid) {
  return v > bv || (v == bv && id < bid);
}

// The CPU's normalise: the f64 norm of the f32 values (squares summed in order), then each
// element f32(f64(x) / norm); a zero or non-finite norm leaves the values unchanged.
__device__ __forceinline__ double norm_of(const float* v, int n, int stride) {
  double ss = 0.0;
  for (int d = 0; d < n; ++d) {
    const double x = (double)v[d * stride];
    ss += x * x;  // exact in f64 (a product of two f32), so contraction cannot change it
  }
  return sqrt(ss);
}
// 4-byte async copy global -> shared; when !pred nothing is read and the 4 bytes are zeroed.
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src, bool pred) {
  const int n = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}

__device__ __forceinline__ bool norm_ok(double norm) { return norm > 0.0 && isfinite(norm); }

// Segment of global cluster c (segments ascending in c_start).
__device__ __forceinline__ int seg_of_cluster(const WbSeg* segs, int n_segs, int c) {
  int lo = 0, hi = n_segs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (segs[mid].c_start <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <int HD>
__device__ __forceinline__ void assign(const BuildUnit* __restrict__ units, const WbTile* __restrict__ tiles,
                                       const float* __restrict__ mean, const float* __restrict__ dirs_t,
                                       int K, int n_tokens, int* __restrict__ out) {
  extern __shared__ __align__(16) float smem[];
  float* As = smem;                 // [HD][WB_BM]: centred keys, transposed
  float* Bs = smem + HD * WB_BM;    // [2][WB_BK][WB_BN]: directions
  const int u = blockIdx.y, tid = threadIdx.x;
  const int tx = tid & 15, ty = tid >> 4;
  const WbTile tile = tiles[blockIdx.x];
  const bf16* keys = keys_of(units, u);
  const float* mu = mean + (size_t)u * HD;

  // The row tile: lanes take consecutive rows so that the transposed stores hit distinct banks.
  constexpr int CH = HD / 8;
  for (int i = tid; i < WB_BM * CH; i += WB_THREADS) {
    const int r = i % WB_BM, ch = i / WB_BM;
    float f[8];
    if (r < tile.rows) {
      const uint4 w = *reinterpret_cast<const uint4*>(keys + ((size_t)tile.tok + r) * HD + ch * 8);
      unpack8(w, f);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] = f[j] - mu[ch * 8 + j];
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) As[(ch * 8 + j) * WB_BM + r] = f[j];
  }

  const float* B = dirs_t + (size_t)u * HD * K + tile.c_start;  // [HD][K], column c_start
  const int cn = tile.c_count;
  const int n_ct = (cn + WB_BN - 1) / WB_BN;
  constexpr int NKC = HD / WB_BK;
  constexpr int PER = WB_BK * WB_BN / WB_THREADS;
  const int total = n_ct * NKC;
  // Chunk q (tile q / NKC, dimensions (q % NKC) * WB_BK ..) into buffer buf, 4-byte async copies
  // (a segment's first centroid need not be 16-byte aligned); columns past the tile are zeros.
  auto issue = [&](int q, int buf) {
    const int ct = q / NKC, kc = q - (q / NKC) * NKC;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int e = tid + j * WB_THREADS;
      const int kk = e / WB_BN, col = ct * WB_BN + (e % WB_BN);
      const bool live = col < cn;
      const float* src = live ? B + (size_t)(kc * WB_BK + kk) * K + col : B;
      cp_async4(tc::smem_u32(Bs + buf * WB_BK * WB_BN + e), src, live);
    }
    tc::cp_async_commit();
  };
  issue(0, 0);
  tc::cp_async_wait<0>();
  __syncthreads();

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  float bv[8];
  int bi[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    bv[i] = -INFINITY;
    bi[i] = 0;
  }
  for (int q = 0; q < total; ++q) {
    // The buffer of chunk q + 1 was last read in step q - 1, which ended with a barrier.
    if (q + 1 < total) issue(q + 1, (q + 1) & 1);
    const float* b = Bs + (q & 1) * WB_BK * WB_BN;
    const int kc = q % NKC;
    const float* a = As + kc * WB_BK * WB_BM;
#pragma unroll
    for (int kk = 0; kk < WB_BK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(a + kk * WB_BM + ty * 4);
      const float4 a1 = *reinterpret_cast<const float4*>(a + kk * WB_BM + 64 + ty * 4);
      const float4 b0 = *reinterpret_cast<const float4*>(b + kk * WB_BN + tx * 4);
      const float4 b1 = *reinterpret_cast<const float4*>(b + kk * WB_BN + 64 + tx * 4);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bw[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bw[j], acc[i][j]);
    }
    if (kc == NKC - 1) {
      // The tile's scores are complete: fold them into the running best (this thread's columns
      // ascend, so only a strictly larger score replaces) and start the next tile from zero.
      const int ct = q / NKC;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = ct * WB_BN + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
        const bool live = col < cn;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (live && acc[i][j] > bv[i]) {
            bv[i] = acc[i][j];
            bi[i] = col;
          }
          acc[i][j] = 0.f;
        }
      }
    }
    tc::cp_async_wait<0>();
    __syncthreads();
  }
  // The 16 threads of a row group meet (larger score, then lower id).
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv[i], o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi[i], o);
      if (beats(ov, oi, bv[i], bi[i])) {
        bv[i] = ov;
        bi[i] = oi;
      }
    }
  }
  if (tx == 0) {
    int* o = out + (size_t)u * n_tokens + tile.flat;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int r = i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4);
      if (r < tile.rows) o[r] = tile.c_start + bi[i];
    }
  }
}

}  // namespace wb

extern "C" __global__ void wave_build_mean(const BuildUnit* units, const WbSeg* segs, int n_segs,
                                           int hd, int n_tokens, float* mean) {
  const int u = blockIdx.x, d = threadIdx.x;
  const bf16* keys = wb::keys_of(units, u);
  double s = 0.0;
  for (int si = 0; si < n_segs; ++si) {
    const WbSeg sg = segs[si];
    const bf16* p = keys + (size_t)sg.start * hd + d;
#pragma unroll 8
    for (int t = sg.start; t < sg.end; ++t, p += hd) s += (double)__bfloat162float(*p);
  }
  mean[(size_t)u * hd + d] = (float)(s / (double)max(n_tokens, 1));
}

extern "C" __global__ void __launch_bounds__(WB_INIT_THREADS)
    wave_build_init(const BuildUnit* units, const WbSeg* segs, int n_segs, int hd, int K,
                    const float* mean, float* dirs_t) {
  const int u = blockIdx.y, c = blockIdx.x * WB_INIT_THREADS + threadIdx.x;
  if (c >= K) return;
  const WbSeg sg = segs[wb::seg_of_cluster(segs, n_segs, c)];
  const long long len = sg.end - sg.start, j = c - sg.c_start;
  const long long t = sg.start + j * len / sg.clusters;
  const bf16* row = wb::keys_of(units, u) + (size_t)t * hd;
  const float* mu = mean + (size_t)u * hd;
  float v[WB_MAX_HD];
  for (int d = 0; d < hd; ++d) v[d] = __bfloat162float(row[d]) - mu[d];
  const double norm = wb::norm_of(v, hd, 1);
  const bool ok = wb::norm_ok(norm);
  float* o = dirs_t + (size_t)u * hd * K + c;
  for (int d = 0; d < hd; ++d) o[(size_t)d * K] = ok ? (float)((double)v[d] / norm) : v[d];
}

extern "C" __global__ void __launch_bounds__(WB_THREADS, 2)
    wave_build_assign_hd64(const BuildUnit* units, const WbTile* tiles, const float* mean,
                           const float* dirs_t, int K, int n_tokens, int* assign) {
  wb::assign<64>(units, tiles, mean, dirs_t, K, n_tokens, assign);
}
extern "C" __global__ void __launch_bounds__(WB_THREADS, 2)
    wave_build_assign_hd128(const BuildUnit* units, const WbTile* tiles, const float* mean,
                            const float* dirs_t, int K, int n_tokens, int* assign) {
  wb::assign<128>(units, tiles, mean, dirs_t, K, n_tokens, assign);
}

extern "C" __global__ void __launch_bounds__(WB_COUNT_THREADS)
    wave_build_count(const int* assign, int n_tokens, int K, int* counts) {
  const int u = blockIdx.y, i = blockIdx.x * WB_COUNT_THREADS + threadIdx.x;
  const int lane = threadIdx.x & 31;
  const int a = i < n_tokens ? assign[(size_t)u * n_tokens + i] : -1;
  const unsigned peers = __match_any_sync(0xffffffffu, a);
  if (a >= 0 && lane == __ffs(peers) - 1) atomicAdd(&counts[(size_t)u * K + a], __popc(peers));
}

extern "C" __global__ void __launch_bounds__(WB_SCAN_THREADS)
    wave_build_scan(int* counts, int K, int* offsets) {
  __shared__ int warp_tot[WB_SCAN_THREADS / 32];
  const int u = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int* cnt = counts + (size_t)u * K;
  int* off = offsets + (size_t)u * (K + 1);
  if (tid == 0) off[0] = 0;
  int carry = 0;
  for (int base = 0; base < K; base += WB_SCAN_THREADS) {
    const int c = base + tid;
    int v = 0;
    if (c < K) {
      v = cnt[c];
      cnt[c] = 0;
    }
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, o);
      if (lane >= o) x += y;
    }
    if (lane == 31) warp_tot[warp] = x;
    __syncthreads();
    if (warp == 0) {
      int w = warp_tot[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      warp_tot[lane] = w;  // inclusive totals of warps 0 .. lane
    }
    __syncthreads();
    const int before = warp > 0 ? warp_tot[warp - 1] : 0;
    if (c < K) off[c + 1] = carry + before + x;
    carry += warp_tot[WB_SCAN_THREADS / 32 - 1];
    __syncthreads();  // warp_tot is reused
  }
}

extern "C" __global__ void __launch_bounds__(32)
    wave_build_scatter(const WbSeg* segs, int n_segs, const int* assign, const int* offsets, int K,
                       int n_tokens, int* cursor_global, int cursor_in_smem, int* members) {
  extern __shared__ int cursor_smem[];
  const int u = blockIdx.x, lane = threadIdx.x;
  int* cur = cursor_in_smem ? cursor_smem : cursor_global + (size_t)u * K;
  const int* off = offsets + (size_t)u * (K + 1);
  for (int c = lane; c < K; c += 32) cur[c] = off[c];
  __syncwarp();
  const int* as = assign + (size_t)u * n_tokens;
  int* mem = members + (size_t)u * n_tokens;
  const unsigned lt = (1u << lane) - 1u;
  constexpr int AHEAD = 8;
  for (int si = 0; si < n_segs; ++si) {
    const WbSeg sg = segs[si];
    for (int base = sg.start; base < sg.end; base += 32 * AHEAD) {
      int a[AHEAD];
#pragma unroll
      for (int s = 0; s < AHEAD; ++s) {
        const int t = base + s * 32 + lane;
        a[s] = t < sg.end ? as[sg.flat + (t - sg.start)] : -1;
      }
#pragma unroll
      for (int s = 0; s < AHEAD; ++s) {
        const int t = base + s * 32 + lane;
        const unsigned peers = __match_any_sync(0xffffffffu, a[s]);
        const int leader = __ffs(peers) - 1;
        int pos = 0;
        if (a[s] >= 0 && lane == leader) {
          pos = cur[a[s]];
          cur[a[s]] = pos + __popc(peers);
        }
        pos = __shfl_sync(0xffffffffu, pos, leader);
        if (a[s] >= 0) mem[pos + __popc(peers & lt)] = t;
        __syncwarp();
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(WB_UPD_THREADS)
    wave_build_update(const BuildUnit* units, const int* offsets, const int* members,
                      const float* mean, int hd, int K, int n_tokens, float* dirs_t) {
  __shared__ float vals[WB_UPD_CLUSTERS][WB_MAX_HD + 1];
  __shared__ double norms[WB_UPD_CLUSTERS];
  __shared__ int sizes[WB_UPD_CLUSTERS];
  const int u = blockIdx.y, c0 = blockIdx.x * WB_UPD_CLUSTERS, tid = threadIdx.x;
  const bf16* keys = wb::keys_of(units, u);
  const int* off = offsets + (size_t)u * (K + 1);
  const int* mem = members + (size_t)u * n_tokens;
  const float* mu = mean + (size_t)u * hd;
  if (tid < WB_UPD_CLUSTERS) sizes[tid] = c0 + tid < K ? off[c0 + tid + 1] - off[c0 + tid] : 0;
  // One thread per (cluster, dimension), lanes along the dimension: members in token order.
  for (int i = tid; i < WB_UPD_CLUSTERS * hd; i += WB_UPD_THREADS) {
    const int cl = i / hd, d = i - (i / hd) * hd, c = c0 + cl;
    double s = 0.0;
    if (c < K) {
      const int lo = off[c], hi = off[c + 1];
      for (int m = lo; m < hi; ++m) {
        const int t = mem[m];
        s += (double)(__bfloat162float(keys[(size_t)t * hd + d]) - mu[d]);
      }
    }
    vals[cl][d] = (float)s;
  }
  __syncthreads();
  if (tid < WB_UPD_CLUSTERS) norms[tid] = wb::norm_of(&vals[tid][0], hd, 1);
  __syncthreads();
  // Written with lanes along the clusters (coalesced in the transposed layout).
  for (int i = tid; i < WB_UPD_CLUSTERS * hd; i += WB_UPD_THREADS) {
    const int d = i / WB_UPD_CLUSTERS, cl = i % WB_UPD_CLUSTERS, c = c0 + cl;
    if (c < K && sizes[cl] > 0) {
      const float x = vals[cl][d];
      const double norm = norms[cl];
      dirs_t[((size_t)u * hd + d) * K + c] = wb::norm_ok(norm) ? (float)((double)x / norm) : x;
    }
  }
}

extern "C" __global__ void __launch_bounds__(WB_SUM_THREADS)
    wave_build_summary(const BuildUnit* units, const int* offsets, const int* members, int hd, int K,
                       int n_tokens, float* centroids_f32, bf16* centroids, float* ln_sizes,
                       int* sizes, bf16* means, float* value_sums) {
  const int u = blockIdx.y, per = WB_SUM_THREADS / hd;
  const int cl = threadIdx.x / hd, d = threadIdx.x % hd;
  const int c = blockIdx.x * per + cl;
  if (cl >= per || c >= K) return;
  const bf16* keys = wb::keys_of(units, u);
  const bf16* vals = reinterpret_cast<const bf16*>(units[u].values);
  const int* off = offsets + (size_t)u * (K + 1);
  const int* mem = members + (size_t)u * n_tokens;
  const int lo = off[c], hi = off[c + 1], n = hi - lo;
  double ks = 0.0, vs = 0.0;
  for (int m = lo; m < hi; ++m) {
    const size_t at = (size_t)mem[m] * hd + d;
    ks += (double)__bfloat162float(keys[at]);
    vs += (double)__bfloat162float(vals[at]);
  }
  const size_t o = ((size_t)u * K + c) * hd + d;
  const float cent = n > 0 ? (float)(ks / (double)n) : 0.f;
  const float vsum = (float)vs;
  centroids_f32[o] = cent;
  centroids[o] = __float2bfloat16_rn(cent);
  value_sums[o] = vsum;
  means[o] = __float2bfloat16_rn(n > 0 ? vsum / (float)n : 0.f);
  if (d == 0) {
    sizes[(size_t)u * K + c] = n;
    ln_sizes[(size_t)u * K + c] = n > 0 ? logf((float)n) : -INFINITY;
  }
}

extern "C" __global__ void __launch_bounds__(32 * WB_GATHER_WARPS)
    wave_build_gather(const BuildUnit* units, const int* members, int n_tokens, int hd,
                      unsigned long long dst_k, unsigned long long dst_v, long long stride) {
  const int u = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int p = blockIdx.x * WB_GATHER_WARPS + warp;
  if (p >= n_tokens) return;
  const int t = members[(size_t)u * n_tokens + p];
  const int words = hd / 8;  // 16-byte words a row
  const bool is_v = lane >= words;
  const int w = is_v ? lane - words : lane;
  if (w >= words) return;
  const uint4* src = reinterpret_cast<const uint4*>(is_v ? units[u].values : units[u].keys) +
                     (size_t)t * words + w;
  uint4* dst = reinterpret_cast<uint4*>(is_v ? dst_v : dst_k) +
               ((size_t)u * stride + (size_t)p * hd) / 8 + w;
  *dst = *src;
}

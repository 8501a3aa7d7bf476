#include "common.cuh"

// Wave attention on the GPU, step 1 (see kernels/README.md): cluster scoring for GQA groups and
// the split of the clusters into the retrieval and estimation zones, for a batch of units. A unit
// is one (decode row, KV head): its index (centroids, sizes) lives in device memory and its query
// heads are kvh * G .. kvh * G + G - 1 of row q_row of the f32 activation q.
//
// wave_logits_hd{64,128}: grid (ceil(max_clusters / 256), n_units), block 256, one thread per
// cluster: logits[u][g][c] = scale * q_g . c_c (f32; -inf for empty clusters, whose ln size is
// -inf) and, per 256-cluster chunk, the max and the sum of exp(logit - max) of each head g into
// part_max / part_sum [u][g][chunk].
//
// wave_select: grid (n_units), block 1024. Combines the chunks into each head's softmax, scores
// every cluster as the sum over the group of its softmax probabilities (empty clusters -inf, never
// chosen), and writes the top `retrieval` clusters (score descending, ties by ascending id) to
// ids[u][0 ..) and the next `estimation` to ids[u][n_r ..), each list in ascending id order (the
// order of the cluster-ordered store, so the attention kernels walk memory forwards), with
// counts[u] = {n_r, n_e} (fewer when fewer clusters are non-empty). The scores are also left in
// scores[u][c] (f32) for checks and for the adaptive budget. Radix selection on the scores' order
// keys (8 bits a pass), no sort.

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define WAVE_CHUNK 256      // clusters per wave_logits CTA
#define WAVE_MAX_G 16       // largest GQA group
#define SEL_THREADS 1024

struct WaveUnit {
  unsigned long long centroids;  // const bf16* [n_clusters][hd]
  unsigned long long ln_sizes;   // const float* [n_clusters]: ln |C_i|, -inf for empty clusters
  int n_clusters;
  int q_row;                     // activation row of the unit's query
  int retrieval;                 // clusters wanted in the retrieval zone
  int estimation;                // clusters wanted in the estimation zone
};

namespace wave {

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
// The order of f32 total ordering as unsigned keys (larger score, larger key).
__device__ __forceinline__ unsigned order_key(float x) {
  unsigned b = __float_as_uint(x);
  return (b >> 31) ? ~b : (b | 0x80000000u);
}

template <int HD>
__device__ void logits(const WaveUnit* __restrict__ units, const float* __restrict__ q, int n_heads,
                       int n_kv, float scale, int max_clusters, float* __restrict__ out,
                       float* __restrict__ part_max, float* __restrict__ part_sum) {
  __shared__ __align__(16) float qs[WAVE_MAX_G * HD];
  __shared__ float red[WAVE_MAX_G][WAVE_CHUNK / 32];
  const int u = blockIdx.y, chunk = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const WaveUnit wu = units[u];
  const int G = n_heads / n_kv, kvh = u % n_kv;
  const int n_chunks = gridDim.x;
  for (int i = tid; i < G * HD; i += blockDim.x)
    qs[i] = q[(size_t)wu.q_row * n_heads * HD + (size_t)kvh * G * HD + i] * scale;
  __syncthreads();
  const int c = chunk * WAVE_CHUNK + tid;
  float acc[WAVE_MAX_G];
#pragma unroll
  for (int g = 0; g < WAVE_MAX_G; ++g) acc[g] = 0.f;
  const bool live = c < wu.n_clusters &&
                    reinterpret_cast<const float*>(wu.ln_sizes)[c] != -INFINITY;
  if (live) {
    const uint4* row = reinterpret_cast<const uint4*>(reinterpret_cast<const bf16*>(wu.centroids) +
                                                      (size_t)c * HD);
#pragma unroll 4
    for (int d8 = 0; d8 < HD / 8; ++d8) {
      const uint4 raw = row[d8];
      const unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
      float x[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        x[2 * j] = __uint_as_float(w[j] << 16);
        x[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
      }
#pragma unroll
      for (int g = 0; g < WAVE_MAX_G; ++g) {
        if (g < G) {
          const float4 a = *reinterpret_cast<const float4*>(&qs[g * HD + d8 * 8]);
          const float4 b = *reinterpret_cast<const float4*>(&qs[g * HD + d8 * 8 + 4]);
          acc[g] += a.x * x[0] + a.y * x[1] + a.z * x[2] + a.w * x[3] + b.x * x[4] + b.y * x[5] +
                    b.z * x[6] + b.w * x[7];
        }
      }
    }
  }
  // Per head: store the logit, then the chunk's max and sum of exp(logit - max).
  for (int g = 0; g < G; ++g) {
    const float l = live ? acc[g] : -INFINITY;
    if (c < max_clusters) out[((size_t)u * G + g) * max_clusters + c] = l;
    float m = warp_max(l);
    if (lane == 0) red[g][warp] = m;
  }
  __syncthreads();
  for (int g = 0; g < G; ++g) {
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < WAVE_CHUNK / 32; ++w) m = fmaxf(m, red[g][w]);
    const float l = live ? acc[g] : -INFINITY;
    float e = (m == -INFINITY) ? 0.f : __expf(l - m);
    e = warp_sum(e);
    __syncthreads();
    if (lane == 0) red[g][warp] = e;
    __syncthreads();
    if (tid == 0) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < WAVE_CHUNK / 32; ++w) s += red[g][w];
      part_max[((size_t)u * G + g) * n_chunks + chunk] = m;
      part_sum[((size_t)u * G + g) * n_chunks + chunk] = s;
    }
    __syncthreads();
  }
}

// Block-wide exclusive prefix sum of one value per thread (SEL_THREADS threads); returns the
// thread's offset and writes the block's total to *total.
__device__ __forceinline__ int block_scan(int v_in, int* warp_tot, int* total) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int incl_w = v_in;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl_w, o);
    if (lane >= o) incl_w += y;
  }
  const int in_warp = incl_w - v_in;
  __syncthreads();
  if (lane == 31) warp_tot[warp] = incl_w;
  __syncthreads();
  if (warp == 0) {
    int v = warp_tot[lane];  // SEL_THREADS / 32 == 32 warps
    int incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    warp_tot[lane] = incl - v;
    if (lane == 31) *total = incl;
  }
  __syncthreads();
  return warp_tot[warp] + in_warp;
}

// The k-th largest key (k >= 1) among keys[0 .. n) and how many keys are strictly larger.
__device__ void kth_largest(const unsigned* keys, int n, int k, unsigned* hist, unsigned* shared3,
                            unsigned& key_out, int& above_out) {
  const int tid = threadIdx.x, lane = tid & 31;
  unsigned prefix = 0, mask = 0;
  int above = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    // Scores crowd into a few buckets (they share sign and exponent bits), so the lanes of a
    // warp that hit the same bucket add their count once, through one leader.
    for (int i0 = tid - lane; i0 < n; i0 += blockDim.x) {
      const int i = i0 + lane;
      const unsigned x = i < n ? keys[i] : 0u;
      const bool in = i < n && (x & mask) == prefix;
      const unsigned bin = in ? (x >> shift) & 255u : 256u;
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (in && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned)__popc(peers));
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l owns bins 255 - 8l .. 248 - 8l (from the top); suffix sums from the top.
      unsigned own = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) own += hist[255 - 8 * lane - j];
      unsigned incl = own;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      const unsigned before = incl - own;  // keys in the bins above this lane's
      const bool here = before < (unsigned)(k - above) && incl >= (unsigned)(k - above);
      const unsigned hit = __ballot_sync(0xffffffffu, here);
      if (lane == __ffs(hit) - 1) {
        unsigned cum = before;
        int b = 255 - 8 * lane;
        for (int j = 0; j < 8; ++j, --b) {
          if (cum + hist[b] >= (unsigned)(k - above)) break;
          cum += hist[b];
        }
        shared3[0] = (unsigned)b;
        shared3[1] = cum;
      }
    }
    __syncthreads();
    prefix |= shared3[0] << shift;
    mask |= 255u << shift;
    above += (int)shared3[1];
    __syncthreads();
  }
  key_out = prefix;
  above_out = above;
}

}  // namespace wave

extern "C" __global__ void __launch_bounds__(WAVE_CHUNK)
    wave_logits_hd64(const WaveUnit* units, const float* q, int n_heads, int n_kv, float scale,
                     int max_clusters, float* out, float* part_max, float* part_sum) {
  wave::logits<64>(units, q, n_heads, n_kv, scale, max_clusters, out, part_max, part_sum);
}
extern "C" __global__ void __launch_bounds__(WAVE_CHUNK)
    wave_logits_hd128(const WaveUnit* units, const float* q, int n_heads, int n_kv, float scale,
                      int max_clusters, float* out, float* part_max, float* part_sum) {
  wave::logits<128>(units, q, n_heads, n_kv, scale, max_clusters, out, part_max, part_sum);
}

// keys: scratch [n_units][max_clusters] for the scores' order keys, used when keys_in_smem is 0;
// otherwise the keys live in max_clusters * 4 bytes of dynamic shared memory (the selection
// passes read them eight times: from L2 each pass would wait on its latency).
// scores: [n_units][max_clusters].
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    wave_select(const WaveUnit* units, const float* logits, const float* part_max,
                const float* part_sum, int n_chunks, int group, int max_clusters, float* scores,
                unsigned* keys, int keys_in_smem, int* ids, int max_ids, int* counts) {
  extern __shared__ unsigned skeys[];
  __shared__ float m_s[WAVE_MAX_G], iz_s[WAVE_MAX_G];
  __shared__ unsigned hist[256];
  __shared__ unsigned sh3[3];
  __shared__ int warp_tot[32];
  __shared__ int total_s;
  const int u = blockIdx.x, tid = threadIdx.x;
  const WaveUnit wu = units[u];
  const int n = wu.n_clusters, G = group;
  if (tid < G) {
    const float* pm = part_max + ((size_t)u * G + tid) * n_chunks;
    const float* ps = part_sum + ((size_t)u * G + tid) * n_chunks;
    float m = -INFINITY;
    for (int j = 0; j < n_chunks; ++j) m = fmaxf(m, pm[j]);
    float z = 0.f;
    if (m != -INFINITY)
      for (int j = 0; j < n_chunks; ++j)
        if (pm[j] != -INFINITY) z += ps[j] * __expf(pm[j] - m);
    m_s[tid] = m;
    iz_s[tid] = z > 0.f ? 1.f / z : 0.f;
  }
  __syncthreads();
  unsigned* kk = keys_in_smem ? skeys : keys + (size_t)u * max_clusters;
  float* sc = scores + (size_t)u * max_clusters;
  int live = 0;
  for (int c = tid; c < n; c += SEL_THREADS) {
    float s = -INFINITY;
    if (reinterpret_cast<const float*>(wu.ln_sizes)[c] != -INFINITY) {
      s = 0.f;
      for (int g = 0; g < G; ++g) {
        const float l = logits[((size_t)u * G + g) * max_clusters + c];
        if (m_s[g] != -INFINITY) s += __expf(l - m_s[g]) * iz_s[g];
      }
      live += 1;
    }
    sc[c] = s;
    kk[c] = wave::order_key(s);
  }
  // Live clusters over the block.
  live = __reduce_add_sync(0xffffffffu, live);
  if ((tid & 31) == 0) warp_tot[tid >> 5] = live;
  __syncthreads();
  if (tid == 0) {
    int t = 0;
    for (int w = 0; w < SEL_THREADS / 32; ++w) t += warp_tot[w];
    total_s = t;
  }
  __syncthreads();
  const int n_live = total_s;
  const int m_want = min(min(wu.retrieval + wu.estimation, n_live), max_ids);
  const int r_want = min(wu.retrieval, m_want);
  __syncthreads();
  if (m_want == 0) {
    if (tid == 0) counts[2 * u] = counts[2 * u + 1] = 0;
    return;
  }
  unsigned tm, tr = 0xffffffffu;
  int above_m, above_r = 0;
  wave::kth_largest(kk, n, m_want, hist, sh3, tm, above_m);
  if (r_want > 0) wave::kth_largest(kk, n, r_want, hist, sh3, tr, above_r);
  // Ties at a threshold go to the lowest ids: walk the ids in blocks of SEL_THREADS, counting the
  // ties taken so far, and place each zone's members at their rank in id order.
  int ties_m = m_want - above_m, ties_r = r_want - above_r;
  int base_r = 0, base_e = 0;
  int* out = ids + (size_t)u * max_ids;
  for (int c0 = 0; c0 < n; c0 += SEL_THREADS) {
    const int c = c0 + tid;
    const unsigned x = c < n ? kk[c] : 0u;
    // Ties of each threshold among this block, ranked by id.
    const int tie_m = c < n && x == tm;
    const int tie_r = c < n && r_want > 0 && x == tr;
    // Two counts per scan, in the low and high 16 bits (a block holds at most 1024 of each).
    const int ranks = wave::block_scan(tie_m | (tie_r << 16), warp_tot, &total_s);
    const int rank_m = ranks & 0xffff, rank_r = ranks >> 16;
    const int n_tie_m = total_s & 0xffff, n_tie_r = total_s >> 16;
    const bool in_m = c < n && (x > tm || (tie_m && rank_m < ties_m));
    const bool in_r = in_m && r_want > 0 && (x > tr || (tie_r && rank_r < ties_r));
    const bool in_e = in_m && !in_r;
    const int pos = wave::block_scan((int)in_r | ((int)in_e << 16), warp_tot, &total_s);
    const int pos_r = pos & 0xffff, pos_e = pos >> 16;
    const int cnt_r = total_s & 0xffff, cnt_e = total_s >> 16;
    if (in_r) out[base_r + pos_r] = c;
    if (in_e) out[r_want + base_e + pos_e] = c;
    base_r += cnt_r;
    base_e += cnt_e;
    ties_m = max(0, ties_m - n_tie_m);
    ties_r = max(0, ties_r - n_tie_r);
  }
  if (tid == 0) {
    counts[2 * u] = base_r;
    counts[2 * u + 1] = base_e;
  }
}

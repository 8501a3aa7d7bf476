#include "common.cuh"

// Wave attention on the GPU, step 1 (see kernels/README.md): cluster scoring for GQA groups and
// the split of the clusters into the retrieval and estimation zones, for a batch of units. A unit
// is one (decode row, KV head): its index (centroids, sizes) lives in device memory and its query
// heads are kvh * G .. kvh * G + G - 1 of row q_row of the f32 activation q.
//
// wave_logits_hd{64,128}: grid (ceil(max_clusters / 256), n_units), block 256 (the chunk's rows
// copied into shared memory with cp.async, see there): logits[u][g][c] = scale * q_g . c_c (f32; -inf for empty clusters, whose ln size is
// -inf) and, per 32 clusters (a warp's rows), the max and the sum of exp(logit - max) of each
// head g into part_max / part_sum [u][g][part] (8 partials a chunk).
//
// wave_select: grid (n_units), block 1024. Combines the partials into each head's softmax, scores
// every cluster as the sum over the group of its softmax probabilities (empty clusters -inf, never
// chosen), and writes the top `retrieval` clusters (score descending, ties by ascending id) to
// ids[u][0 ..) and the next `estimation` to ids[u][n_r ..), each list in ascending id order (the
// order of the cluster-ordered store, so the attention kernels walk memory forwards), with
// counts[u] = {n_r, n_e} (fewer when fewer clusters are non-empty). The scores are also left in
// scores[u][c] (f32) for checks and for the adaptive budget. Radix selection on the scores' order
// keys (SEL_BITS bits a pass), finished by ranking the few keys of the thresholds' bins; no sort.
// With the union ranking (WaveUnit::union_ranking) the retrieval zone is instead the union of
// each query head's best clusters by its own logit (union_select ranks each head's best clusters
// in the same CTA and takes the union's best), and the estimation zone the next clusters
// by summed score; `ranks` is then 2 * max_clusters words of scratch a unit.

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif


// struct WaveUnit and struct WaveTier: common.cuh.

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
// The float whose order_key is k.
__device__ __forceinline__ float key_float(unsigned k) {
  return __uint_as_float((k >> 31) ? (k & 0x7fffffffu) : ~k);
}

template <int HD>
__device__ void logits(const WaveUnit* __restrict__ units, const float* __restrict__ q, int n_heads,
                       int n_kv, float scale, int max_clusters, float* __restrict__ out,
                       float* __restrict__ part_max, float* __restrict__ part_sum) {
  // Dynamic shared memory (wave_logits_smem on the host): the chunk's centroids [WAVE_CHUNK][HD]
  // (bf16), the logits [G][WAVE_CHUNK] and the scaled queries [G][HD] (f32).
  extern __shared__ __align__(16) unsigned char wl_smem[];
  const int u = blockIdx.y, chunk = blockIdx.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const WaveUnit wu = units[u];
  const int G = n_heads / n_kv, kvh = u % n_kv;
  const int n_chunks = gridDim.x, n = wu.n_clusters;
  bf16* tile = reinterpret_cast<bf16*>(wl_smem);
  float* lg = reinterpret_cast<float*>(wl_smem + (size_t)WAVE_CHUNK * HD * sizeof(bf16));
  float* qs = lg + G * WAVE_CHUNK;
  // Each warp copies its own 32 rows into the tile with cp.async (zeros past the last cluster),
  // so every row of the chunk is in flight at once, then works on them alone (no block-wide
  // wait for the rows).
  {
    constexpr int PER_ROW = HD * (int)sizeof(bf16) / 16;
    const int row0 = chunk * WAVE_CHUNK + warp * 32;
    const int rows = max(0, min(32, n - row0));
    const char* src =
        reinterpret_cast<const char*>(wu.centroids) + (size_t)max(row0, 0) * HD * sizeof(bf16);
    const unsigned dst = tc::smem_u32(tile + (size_t)warp * 32 * HD);
#pragma unroll 4
    for (int i = lane; i < 32 * PER_ROW; i += 32)
      tc::cp_async16(dst + i * 16, src + (size_t)(i < rows * PER_ROW ? i : 0) * 16,
                     i < rows * PER_ROW);
    tc::cp_async_commit();
  }
  for (int i = tid; i < G * HD; i += blockDim.x)
    qs[i] = q[(size_t)wu.q_row * n_heads * HD + (size_t)kvh * G * HD + i] * scale;
  __syncthreads();
  tc::cp_async_wait<0>();
  __syncwarp();
  // The rows are read from the tile: LPR lanes per row (16 bytes each), RPI rows per warp
  // instruction, each warp its 32 rows; every lane keeps its 8 dimensions of 4 query heads in
  // registers, and the row's partial dot products meet across its LPR lanes by shuffles (the
  // shuffles, one warp instruction a cycle per multiprocessor, bound this kernel). Groups
  // of more than 4 heads take further rounds over the rows.
  constexpr int LPR = HD / 8, RPI = 32 / LPR;
  const int sub = lane % LPR;
  for (int gb = 0; gb < G; gb += 4) {
    float qr[4][8];
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int j = 0; j < 8; ++j) qr[k][j] = gb + k < G ? qs[(gb + k) * HD + sub * 8 + j] : 0.f;
#pragma unroll 4
    for (int it = 0; it < 32 / RPI; ++it) {
      const int r = warp * 32 + it * RPI + lane / LPR;
      const uint4 raw = *reinterpret_cast<const uint4*>(tile + (size_t)r * HD + sub * 8);
      const unsigned wv[4] = {raw.x, raw.y, raw.z, raw.w};
      float x[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        x[2 * j] = __uint_as_float(wv[j] << 16);
        x[2 * j + 1] = __uint_as_float(wv[j] & 0xffff0000u);
      }
      float pk[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float a = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) a += qr[k][j] * x[j];
        pk[k] = a;
      }
      // The four sums over the row's LPR lanes by reduce-scatter: at the first step the two
      // halves of the lanes swap two heads' partials and keep the other two, at the second one
      // head each, then plain butterflies (5 shuffles at LPR 16 instead of 16): lane sub ends
      // with head ((sub & LPR/2) ? 2 : 0) + ((sub & LPR/4) ? 1 : 0).
      const bool hi = sub & (LPR / 2), hi2 = sub & (LPR / 4);
      const float s0 = __shfl_xor_sync(0xffffffffu, hi ? pk[0] : pk[2], LPR / 2);
      const float s1 = __shfl_xor_sync(0xffffffffu, hi ? pk[1] : pk[3], LPR / 2);
      const float k0 = (hi ? pk[2] : pk[0]) + s0, k1 = (hi ? pk[3] : pk[1]) + s1;
      float v = (hi2 ? k1 : k0) + __shfl_xor_sync(0xffffffffu, hi2 ? k0 : k1, LPR / 4);
#pragma unroll
      for (int off = LPR / 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (sub % (LPR / 4) == 0) {
        const int k = (hi ? 2 : 0) + (hi2 ? 1 : 0);
        if (gb + k < G) lg[(gb + k) * WAVE_CHUNK + r] = v;
      }
    }
  }
  // Each warp's 32 rows: the logits out, and per head the rows' max and sum of exp(logit - max)
  // as one partial of the head's softmax (no block-wide step: a warp wrote its own rows of lg).
  __syncwarp();
  const int r = warp * 32 + lane, c = chunk * WAVE_CHUNK + r;
  const float ln = c < n ? reinterpret_cast<const float*>(wu.ln_sizes)[c] : -INFINITY;
  const bool live = ln != -INFINITY;
  const int part = chunk * (WAVE_CHUNK / 32) + warp, n_parts = n_chunks * (WAVE_CHUNK / 32);
  // Ranking by size: each head's softmax is over the logits plus ln |C_i| (the logits written
  // stay without it, for the estimation).
  const float bias = live && wu.rank_by_size ? ln : 0.f;
  for (int g = 0; g < G; ++g) {
    const float l = live ? lg[g * WAVE_CHUNK + r] : -INFINITY;
    if (c < max_clusters) out[((size_t)u * G + g) * max_clusters + c] = l;
    const float lb = l + bias;
    const float m = warp_max(lb);
    const float e = warp_sum(m == -INFINITY ? 0.f : __expf(lb - m));
    if (lane == 0) {
      part_max[((size_t)u * G + g) * n_parts + part] = m;
      part_sum[((size_t)u * G + g) * n_parts + part] = e;
    }
  }
}

// Block-wide exclusive prefix sum of one value per thread (SEL_THREADS threads; 64-bit so that
// two 32-bit counts travel packed, or f64); returns the thread's offset and, when total is not
// null, writes the block's total to *total.
template <typename T>
__device__ __forceinline__ T block_scan(T v_in, T* warp_tot, T* total) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  T incl = v_in;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  __syncthreads();
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const T v = warp_tot[lane];  // SEL_THREADS / 32 == 32 warps
    T w = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    warp_tot[lane] = w - v;
    if (lane == 31 && total) *total = w;
  }
  __syncthreads();
  return warp_tot[warp] + incl - v_in;
}

// One radix step of the selection of the k-th largest key. Every thread holds SEL_BINS / 1024
// bins of a histogram counted from the top, and `before` keys lie in the bins above its own;
// the thread whose bins hold the need-th key from the top writes out[0] = its bin and out[1] =
// the keys in the bins above that bin.
#define SEL_BITS 11
#define SEL_BINS (1 << SEL_BITS)
// Most keys of a threshold's bin that the selection ranks directly (see find_thresholds).
#define SEL_CAND 1024
// SEL_PROFILE (RETROWAVE_KERNEL_DEFINES=SEL_PROFILE): the first wave_select CTA prints the
// cycles of its phases (thread 0's clock at the block-wide steps between them) and of each
// threshold search's steps; the caller's phases around a search include that search's printf
// (tens of thousands of cycles).
#ifdef SEL_PROFILE
#define SEL_T(i) \
  if (threadIdx.x == 0) prof_t[i] = clock64();
#else
#define SEL_T(i)
#endif
__device__ __forceinline__ void locate_bin(const unsigned* hist, unsigned before, unsigned own,
                                           unsigned need, unsigned* out) {
  constexpr int PER = SEL_BINS / SEL_THREADS;
  if (before < need && before + own >= need) {
    unsigned cum = before;
    int b = SEL_BINS - 1 - PER * (int)threadIdx.x;
    for (int j = 0; j < PER; ++j, --b) {
      if (cum + hist[b] >= need) break;
      cum += hist[b];
    }
    out[0] = (unsigned)b;
    out[1] = cum;
  }
}

// Both thresholds' radix step at once: one block scan over the two histograms' counts.
__device__ __forceinline__ void find_bins(const unsigned* hist_m, const unsigned* hist_r,
                                          unsigned need_m, unsigned need_r,
                                          unsigned long long* warp_tot, unsigned long long* total,
                                          unsigned* out_m, unsigned* out_r) {
  const int tid = threadIdx.x;
  constexpr int PER = SEL_BINS / SEL_THREADS;
  unsigned own_m = 0, own_r = 0;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    own_m += hist_m[SEL_BINS - 1 - PER * tid - j];
    own_r += hist_r[SEL_BINS - 1 - PER * tid - j];
  }
  const unsigned long long before =
      block_scan((unsigned long long)own_m | ((unsigned long long)own_r << 32), warp_tot, total);
  locate_bin(hist_m, (unsigned)before, own_m, need_m, out_m);
  locate_bin(hist_r, (unsigned)(before >> 32), own_r, need_r, out_r);
  __syncthreads();
}

// Shared memory of a wave_select CTA's threshold searches.
struct SelSmem {
  unsigned hist[2][SEL_BINS];  // radix histograms; then the adaptive budget's sorted scores
  unsigned cand[2][SEL_CAND];  // keys of a threshold's last bin, ranked directly
  unsigned res[2][2];
  unsigned n_cand[2];
  unsigned long long warp_tot[32];
  unsigned long long total;
};

// The need[t]-th largest of the keys kk[0 .. n) for up to two thresholds at once (need[t] == 0:
// none; kmin, kmax: the smallest and largest key, which share the bits above the highest bit
// in which they differ). Returns key[t], that key, and above[t], how many keys are larger.
// Radix passes of SEL_BITS bits from the common prefix down; as soon as every threshold's bin
// holds at most SEL_CAND keys, those keys are gathered and ranked against each other instead of
// further passes (one pass for the selection's usual 8K clusters a unit).
__device__ void find_thresholds(const unsigned* kk, int n, unsigned kmin, unsigned kmax,
                                const unsigned* need, SelSmem& s, unsigned* key,
                                unsigned* above) {
  const int tid = threadIdx.x;
  const int top = 32 - __clz(kmin ^ kmax);  // bits in which the keys differ (0: all equal)
  unsigned msk = (top >= 32) ? 0u : ~((1u << top) - 1u);
  unsigned pre[2] = {kmax & msk, kmax & msk};
  above[0] = above[1] = 0;
#ifdef SEL_PROFILE
  long long ft[6] = {0};
#define FT(i) \
  if (tid == 0) ft[i] = clock64();
#else
#define FT(i)
#endif
  for (int hi = top; hi > 0; hi -= SEL_BITS) {
    const int shift = max(hi - SEL_BITS, 0), bits = hi - shift;
    const unsigned bmask = (1u << bits) - 1u;
    FT(0);
    for (int i = tid; i < 2 * SEL_BINS; i += SEL_THREADS) (&s.hist[0][0])[i] = 0;
    __syncthreads();
    FT(1);
    for (int c = tid; c < n; c += SEL_THREADS) {
      const unsigned x = kk[c], b = (x >> shift) & bmask;
      if (need[0] && (x & msk) == pre[0]) atomicAdd(&s.hist[0][b], 1u);
      if (need[1] && (x & msk) == pre[1]) atomicAdd(&s.hist[1][b], 1u);
    }
    __syncthreads();
    FT(2);
    find_bins(s.hist[0], s.hist[1], need[0] - above[0], need[1] - above[1], s.warp_tot, &s.total,
              s.res[0], s.res[1]);
    msk |= bmask << shift;
    bool few = shift > 0;
    for (int t = 0; t < 2; ++t) {
      if (!need[t]) continue;
      pre[t] |= s.res[t][0] << shift;
      above[t] += s.res[t][1];
      few = few && s.hist[t][s.res[t][0]] <= SEL_CAND;
    }
    FT(3);
#ifdef SEL_PROFILE
    const unsigned bin_n0 = need[0] ? s.hist[0][s.res[0][0]] : 0u;
    const unsigned bin_n1 = need[1] ? s.hist[1][s.res[1][0]] : 0u;
#endif
    if (few) {
      // want = need - above lies in 1 ..= the bin's count.
      if (tid < 2) s.n_cand[tid] = 0;
      __syncthreads();
      for (int c = tid; c < n; c += SEL_THREADS) {
        const unsigned x = kk[c];
        for (int t = 0; t < 2; ++t)
          if (need[t] && (x & msk) == pre[t]) s.cand[t][atomicAdd(&s.n_cand[t], 1u)] = x;
      }
      __syncthreads();
      FT(4);
      for (int t = 0; t < 2; ++t) {
        if (!need[t]) continue;
        const unsigned nc = s.n_cand[t], want = need[t] - above[t];
        for (unsigned i = tid; i < nc; i += SEL_THREADS) {
          const unsigned x = s.cand[t][i];
          unsigned gt = 0, ge = 0;
          for (unsigned j = 0; j < nc; ++j) {
            const unsigned y = s.cand[t][j];
            gt += y > x;
            ge += y >= x;
          }
          if (gt < want && ge >= want) {  // every such thread writes the same two values
            s.res[t][0] = x;
            s.res[t][1] = gt;
          }
        }
      }
      __syncthreads();
      for (int t = 0; t < 2; ++t) {
        if (!need[t]) continue;
        pre[t] = s.res[t][0];
        above[t] += s.res[t][1];
      }
      __syncthreads();
      FT(5);
#ifdef SEL_PROFILE
      if (blockIdx.x == 0 && tid == 0)
        printf("sel thr shift %d, bins of %u %u keys (need %u %u), cycles: clear %lld hist %lld "
               "bins %lld gather %lld rank %lld\n",
               shift, bin_n0, bin_n1, need[0], need[1], ft[1] - ft[0], ft[2] - ft[1],
               ft[3] - ft[2], ft[4] - ft[3], ft[5] - ft[4]);
#endif
      break;
    }
    __syncthreads();
  }
#undef FT
  key[0] = pre[0];
  key[1] = pre[1];
}

// Sorts a[0 .. np) (np a power of two) descending in place: a block-wide bitonic sort (every
// thread of the block calls it; it ends synchronised).
template <typename T>
__device__ void bitonic_desc(T* a, int np) {
  const int tid = threadIdx.x;
  for (int k = 2; k <= np; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < np; i += SEL_THREADS) {
        const int l = i ^ j;
        if (l > i) {
          const T x = a[i], y = a[l];
          const bool desc = (i & k) == 0;
          if (desc ? x < y : x > y) {
            a[i] = y;
            a[l] = x;
          }
        }
      }
      __syncthreads();
    }
  }
}

// The smallest and largest of every thread's lo and hi, in every thread (red_*: 32 words of
// shared memory each).
__device__ __forceinline__ void block_minmax(unsigned& lo, unsigned& hi, unsigned* red_min,
                                             unsigned* red_max) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  __syncthreads();  // earlier readers of red_* are done
  if (lane == 0) {
    red_min[warp] = lo;
    red_max[warp] = hi;
  }
  __syncthreads();
  lo = __reduce_min_sync(0xffffffffu, red_min[lane]);  // SEL_THREADS / 32 == 32 warps
  hi = __reduce_max_sync(0xffffffffu, red_max[lane]);
}

// The union ranking (WaveUnit::union_ranking; retrowave_index::select::union_retrieval on the
// CPU), in the unit's wave_select CTA once its retrieval budget r is known: each query head g
// ranks the live clusters by its own logit (competition ranks: how many live clusters have a
// larger logit key), a cluster's union key is the smallest rank * G + g over the heads, and the
// r clusters of smallest union key (ties to the lowest id) are the retrieval zone.
//
// union_select marks the chosen clusters' summed-score keys kk[c] = top. Each head's logits
// are binned by their distance below the head's max (union_bin: log-spaced, monotone in the
// logit; the histograms are counted by wave_select's score pass), and the first bin at which the
// count from the top reaches r bounds the head's candidates: every cluster of a larger logit is
// among them. The candidates are placed by bin (a counting sort), so a candidate's rank is the
// count of its head's clusters in the bins before its own plus the larger keys in its own bin (a
// few); uk[c] keeps the cluster's union key over the ranks below r (ranks of r and more never
// reach the pick: head 0 alone has r clusters of smaller keys), and the r-th smallest union key
// comes from a count of the clusters at each key (fewer than r * G of them). Without room for the
// candidates (UNION_POOL) or for the counts, each head is ranked in turn by a radix selection of
// its r-th largest key (union_rank_head) and the pick is a radix selection over all clusters
// (union_pick).
#define UNION_POOL (SEL_TOP / 2)
#define UNION_W0 4.0f  // the binning's scale, in nats: the first octave spans W0 below the max
#define UNION_RUN 8    // clusters a thread loads at once in the ranking's passes
#define UNION_DEAD 0xffffu  // an empty cluster's bin (above every bin: nb <= SEL_TOP)

// The bin of logit l below the head's max m: the float bits of t = max(m - l, 0) + W0 above
// those of W0, shifted right by `shift` (log-spaced bins: 2^(23 - shift) an octave of t, finer
// near the max), at most nb - 1 (NaN too). Each step rounds monotonically and is never
// contracted, so a larger logit never gets a larger bin and every pass bins a logit alike.
__device__ __forceinline__ unsigned union_bin(float m, float l, int shift, unsigned nb) {
  const float t = __fadd_rn(fmaxf(__fsub_rn(m, l), 0.f), UNION_W0);
  return min((__float_as_uint(t) - __float_as_uint(UNION_W0)) >> shift, nb - 1u);
}
// Bins a head: the largest power of two with G of them in SEL_TOP words (log2), and the shift
// that spreads them over four octaves of t (union_bin).
__device__ __forceinline__ int union_lnb(int G) { return 12 - (32 - __clz(max(G, 1) - 1)); }
__device__ __forceinline__ int union_shift(int lnb) { return 25 - lnb; }

// kk[c] = key(c) for c in [0, n) (0: no key, below every other), and the want-th largest of
// them by find_thresholds from the bounds of the nonzero keys (so that the radix passes start at
// the bits in which those differ): *thr, and in *above how many keys are larger. want must be
// at most the nonzero keys' count. Every thread calls it; each writes only its own c.
template <typename F>
__device__ void kth_of_keys(unsigned* kk, int n, F key, unsigned want, SelSmem& ss,
                            unsigned* red_min, unsigned* red_max, unsigned* thr,
                            unsigned* above) {
  unsigned lo = 0xffffffffu, hi = 0u;
  for (int c = threadIdx.x; c < n; c += SEL_THREADS) {
    const unsigned x = key(c);
    kk[c] = x;
    if (x) {
      lo = min(lo, x);
      hi = max(hi, x);
    }
  }
  block_minmax(lo, hi, red_min, red_max);
  const unsigned need[2] = {want, 0u};
  unsigned t[2], a[2];
  find_thresholds(kk, n, lo, hi, need, ss, t, a);
  *thr = t[0];
  *above = a[0];
}

// Head g's ranks below r by radix selection (union_select's fallback): the keys into kg (global
// scratch of n), the r-th largest found by find_thresholds, the keys above it sorted, and each
// cluster at or above it ranked by binary search; uk[c] lowered to rank * G + g. Thread t owns
// the clusters t, t + SEL_THREADS, ... of uk here as in wave_select's score pass.
__device__ void union_rank_head(unsigned* uk, unsigned* kg, const float* lg, int n, int r, int G,
                                int g, SelSmem& ss, unsigned* red_min, unsigned* red_max) {
  const int tid = threadIdx.x;
  __shared__ unsigned n_above;
  unsigned thr[1], above[1];
  kth_of_keys(  // live keys are above 0
      kg, n, [&](int c) { return lg[c] != -INFINITY ? order_key(lg[c]) : 0u; }, (unsigned)r, ss,
      red_min, red_max, thr, above);
  unsigned* sorted = &ss.hist[0][0];  // 2 * SEL_BINS == SEL_TOP keys; above < r <= SEL_TOP
  if (tid == 0) n_above = 0;
  __syncthreads();
  for (int c = tid; c < n; c += SEL_THREADS) {
    const unsigned x = kg[c];
    if (x > thr[0]) sorted[atomicAdd(&n_above, 1u)] = x;
  }
  __syncthreads();
  const int na = (int)n_above;
  int np = 1;
  while (np < na) np <<= 1;
  for (int i = na + tid; i < np; i += SEL_THREADS) sorted[i] = 0u;
  __syncthreads();
  bitonic_desc(sorted, np);
  for (int c = tid; c < n; c += SEL_THREADS) {
    const unsigned x = kg[c];
    if (x >= thr[0]) {  // thr[0] is a live key, above 0
      int a = 0, b = na;  // the first of sorted[0 .. na) not above x
      while (a < b) {
        const int mid = (a + b) >> 1;
        if (sorted[mid] > x) a = mid + 1;
        else b = mid;
      }
      if (a < r) uk[c] = min(uk[c], (unsigned)(a * G + g));
    }
  }
  __syncthreads();
}

// The union's pick: the `want` clusters of smallest union key uk[c] (ties to the lowest id; uk
// is inverted in place) get their summed-score key kk[c] set to `top` (above every other key).
// At least `want` clusters have a key (head 0 alone ranks `want`).
__device__ void union_pick(unsigned* kk, unsigned* uk, int n, int want, unsigned top, SelSmem& ss,
                           unsigned* red_min, unsigned* red_max) {
  const int tid = threadIdx.x;
  // The want largest inverted keys (the unranked clusters invert to 0).
  unsigned thr[1], above[1];
  kth_of_keys(uk, n, [&](int c) { return ~uk[c]; }, (unsigned)want, ss, red_min, red_max, thr,
              above);
  // Ties at the threshold to the lowest ids: thread t takes ids [t * per, (t + 1) * per).
  const int per = (n + SEL_THREADS - 1) / SEL_THREADS;
  const int c0 = min(n, tid * per), c1 = min(n, c0 + per);
  unsigned tie = 0;
  for (int c = c0; c < c1; ++c) tie += uk[c] == thr[0];
  unsigned rank =
      (unsigned)block_scan((unsigned long long)tie, ss.warp_tot, (unsigned long long*)nullptr);
  const unsigned ties = (unsigned)want - above[0];
  for (int c = c0; c < c1; ++c) {
    const unsigned x = uk[c];
    if (x > thr[0] || (x == thr[0] && rank++ < ties)) kk[c] = top;
  }
  __syncthreads();
}

// lg: the unit's logits [G][max_clusters] (-inf for empty clusters); m: each head's max logit
// (or an upper bound of it: with the ranking by size, the max of logit + ln |C_i|); uhist: each
// head's histogram of union_bin over its live clusters (G << union_lnb(G) words, filled by
// wave_select's score pass, which also set uk[c] = ~0); ubins: each head's bin of every cluster
// ([G][max_clusters], UNION_DEAD for empty clusters) when the score pass kept them, or null (the
// gather then bins the logits again); uk: n words (shared or global), kg: n words of global
// scratch for the fallback; pool: SEL_TOP words.
__device__ void union_select(unsigned* kk, unsigned top, unsigned* uk, unsigned* kg,
                             const float* lg, int n, int r, int G, int max_clusters,
                             const float* m, unsigned* uhist, const unsigned short* ubins,
                             unsigned* pool, SelSmem& ss,
                             unsigned* red_min, unsigned* red_max) {
  const int tid = threadIdx.x;
  const int lnb = union_lnb(G), shift = union_shift(lnb);
  const unsigned nb = 1u << lnb;
#ifdef SEL_PROFILE
  long long ut[6] = {0};
#define UT(i) \
  if (tid == 0) ut[i] = clock64();
#else
#define UT(i)
#endif
  UT(1);
  __shared__ int bin_s[WAVE_MAX_G];
  __shared__ unsigned off_s[WAVE_MAX_G + 1], fill_s[WAVE_MAX_G], base_s[WAVE_MAX_G];
  // Each head's threshold bin: the bin at which the count from bin 0 (the max) reaches r (every
  // head counts all live clusters, at least r), and the count through it. Thread t holds bins
  // 4t .. 4t + 3 of the heads' histograms laid end to end; one block scan over them all.
  const int b0 = 4 * tid, nbins = G << lnb;
  uint4 h4 = make_uint4(0u, 0u, 0u, 0u);
  if (b0 < nbins) h4 = *reinterpret_cast<const uint4*>(uhist + b0);
  const unsigned own = h4.x + h4.y + h4.z + h4.w;
  const unsigned ex =
      (unsigned)block_scan((unsigned long long)own, ss.warp_tot, (unsigned long long*)nullptr);
  if (b0 < nbins && (b0 & (nb - 1)) == 0) base_s[b0 >> lnb] = ex;
  if (tid < G) fill_s[tid] = 0u;
  __syncthreads();
  if (b0 < nbins) {
    const int g = b0 >> lnb;
    const unsigned before = ex - base_s[g];
    // The histograms become each bin's count of the head's clusters in the bins before it.
    uhist[b0] = before;
    uhist[b0 + 1] = before + h4.x;
    uhist[b0 + 2] = before + h4.x + h4.y;
    uhist[b0 + 3] = before + h4.x + h4.y + h4.z;
    if (before < (unsigned)r && before + own >= (unsigned)r) {
      const unsigned h[4] = {h4.x, h4.y, h4.z, h4.w};
      unsigned cum = before;
      int j = 0;
      for (; j < 3; ++j) {
        cum += h[j];
        if (cum >= (unsigned)r) break;
      }
      if (j == 3) cum += h[3];
      bin_s[g] = (b0 & (nb - 1)) + j;
      off_s[g + 1] = cum;
    }
  }
  __syncthreads();
  if (tid == 0) {
    off_s[0] = 0u;
    for (int g = 0; g < G; ++g) off_s[g + 1] += off_s[g];
  }
  __syncthreads();
  const unsigned total = off_s[G];
  // The head of candidate slot i, and the slots [first, end) of the bin of key x in head g
  // (its count of the head's clusters in the earlier bins, then its own).
  const auto head_of = [&](unsigned i) {
    int g = 0;
    while (off_s[g + 1] <= i) ++g;
    return g;
  };
  const auto bin_slots = [&](int g, unsigned x, unsigned& first, unsigned& end) {
    const unsigned bin = union_bin(m[g], key_float(x), shift, nb), hb = (g << lnb) + bin;
    first = off_s[g] + uhist[hb];
    end = off_s[g] + (bin < (unsigned)bin_s[g] ? uhist[hb + 1] : off_s[g + 1] - off_s[g]);
  };
  UT(2);
  // Without room for the candidates, or with more union keys than the histograms' memory
  // counts, each head is ranked by radix selection instead.
  if (total > UNION_POOL || r * G > 2 * SEL_BINS) {
#ifdef SEL_PROFILE
    if (blockIdx.x == 0 && tid == 0) printf("union rank fallback: %u candidates\n", total);
#endif
    for (int g = 0; g < G; ++g)
      union_rank_head(uk, kg, lg + (size_t)g * max_clusters, n, r, G, g, ss, red_min, red_max);
    union_pick(kk, uk, n, r, top, ss, red_min, red_max);
    return;
  }
  // The candidates (key, cluster) placed by bin (a counting sort: head g's from off_s[g], bin b's
  // from the count of the head's clusters in the bins before it), so that a candidate's rank is
  // that count plus the larger keys of its own bin.
  unsigned* pk = pool;
  unsigned* pc = pool + UNION_POOL;
  unsigned* bf = &ss.hist[0][0];  // each bin's candidates placed so far
  for (int i = tid; i < nbins; i += SEL_THREADS) bf[i] = 0u;
  __syncthreads();
  if (ubins) {
    // The bins from the score pass: the candidates placed first, then their logits loaded, one
    // a thread, all in flight together.
    for (int c = tid; c < n; c += SEL_THREADS)
      for (int g = 0; g < G; ++g) {
        const unsigned bin = ubins[(size_t)g * max_clusters + c];
        if (bin <= (unsigned)bin_s[g]) {
          const unsigned hb = (g << lnb) + bin;
          pc[off_s[g] + uhist[hb] + atomicAdd(&bf[hb], 1u)] = (unsigned)c;
        }
      }
    __syncthreads();
    for (unsigned i = tid; i < total; i += SEL_THREADS)
      pk[i] = order_key(lg[(size_t)head_of(i) * max_clusters + pc[i]]);
  } else {
    for (int c0 = tid; c0 < n; c0 += UNION_RUN * SEL_THREADS)
      for (int g = 0; g < G; ++g) {
        float l[UNION_RUN];
#pragma unroll
        for (int i = 0; i < UNION_RUN; ++i) {
          const int c = c0 + i * SEL_THREADS;
          l[i] = c < n ? lg[(size_t)g * max_clusters + c] : -INFINITY;
        }
#pragma unroll
        for (int i = 0; i < UNION_RUN; ++i) {
          const unsigned bin = union_bin(m[g], l[i], shift, nb);
          if (l[i] != -INFINITY && bin <= (unsigned)bin_s[g]) {
            const unsigned hb = (g << lnb) + bin;
            const unsigned slot = off_s[g] + uhist[hb] + atomicAdd(&bf[hb], 1u);
            pk[slot] = order_key(l[i]);
            pc[slot] = (unsigned)(c0 + i * SEL_THREADS);
          }
        }
      }
  }
  __syncthreads();
  UT(3);
  // Ranks (the candidate's bin recomputed from its key, whose float it is); the cluster's union
  // key the smallest over the heads. The pick's counts of union keys are cleared meanwhile.
  unsigned* kh = &ss.hist[0][0];
  for (int i = tid; i < r * G; i += SEL_THREADS) kh[i] = 0u;
  for (unsigned i = tid; i < total; i += SEL_THREADS) {
    const int g = head_of(i);
    const unsigned x = pk[i];
    unsigned first, end;
    bin_slots(g, x, first, end);
    unsigned rank = first - off_s[g];
    for (unsigned j = first; j < end; ++j) rank += pk[j] > x;
    if (rank < (unsigned)r) atomicMin(&uk[pc[i]], rank * (unsigned)G + (unsigned)g);
  }
  __syncthreads();
  UT(4);
  // The pick: each cluster counted once, at its union key (its entry whose key is the
  // cluster's smallest); the r-th smallest union key K by a scan of the counts; every cluster
  // below K chosen, and of those at K (a run of tied logits in one head) the lowest ids.
  for (unsigned i = tid; i < total; i += SEL_THREADS) {
    const int g = head_of(i);
    // This head's entry gave the cluster's key when the key names this head (a cluster has at
    // most one entry a head).
    const unsigned k = uk[pc[i]];
    if (k % (unsigned)G == (unsigned)g && k < (unsigned)(r * G)) atomicAdd(&kh[k], 1u);
  }
  __syncthreads();
  __shared__ unsigned kstar_s, kabove_s;
  {
    const int k0 = 4 * tid, nk = r * G;
    unsigned h[4], own = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      h[j] = k0 + j < nk ? kh[k0 + j] : 0u;
      own += h[j];
    }
    const unsigned before =
        (unsigned)block_scan((unsigned long long)own, ss.warp_tot, (unsigned long long*)nullptr);
    if (before < (unsigned)r && before + own >= (unsigned)r) {
      unsigned cum = before;
      int j = 0;
      while (cum + h[j] < (unsigned)r) cum += h[j++];
      kstar_s = (unsigned)(k0 + j);
      kabove_s = cum;
    }
  }
  __syncthreads();
  const unsigned kstar = kstar_s, ties = (unsigned)r - kabove_s;
  for (unsigned i = tid; i < total; i += SEL_THREADS) {
    const int g = head_of(i);
    const unsigned c = pc[i], k = uk[c];
    if (k % (unsigned)G != (unsigned)g || k > kstar) continue;
    bool take = k < kstar;
    if (!take) {
      // Tied at K (equal logits of one head, all in one bin): the lower ids among those of the
      // bin with this key and K.
      const unsigned x = pk[i];
      unsigned first, end, lower = 0;
      bin_slots(g, x, first, end);
      for (unsigned j = first; j < end; ++j)
        lower += pk[j] == x && pc[j] < c && uk[pc[j]] == kstar;
      take = lower < ties;
    }
    if (take) kk[c] = top;
  }
  __syncthreads();
  UT(5);
#ifdef SEL_PROFILE
  if (blockIdx.x == 0 && tid == 0)
    printf("union rank n %d r %d candidates %u (bin %d of %u), cycles: bins %lld gather %lld "
           "rank %lld pick %lld\n", n, r, total, bin_s[0], nb, ut[2] - ut[1], ut[3] - ut[2],
           ut[4] - ut[3], ut[5] - ut[4]);
#endif
#undef UT
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
// passes read them several times: from L2 each pass would wait on its latency).
// scores: [n_units][max_clusters].
//
// wave_estimate_partial_hd{64,128}: grid (ceil(max_ids / EST_CHUNK), n_units), block 128. The
// estimation zone attends, per query head g, to |C_i| copies of each estimation cluster's
// centroid with its mean value: weights w = exp(logit_g,i + ln |C_i| - m) over the chunk's
// EST_CHUNK clusters (m their max); writes the chunk's m, sum of w and sum of w * mean_i (not
// normalised) to est_m / est_l [u][chunk][g] and est_acc [u][chunk][g][hd]. The chunk's mean rows
// are gathered into shared memory with cp.async while the weights are computed.
// wave_estimate_merge: grid (n_units, group), block 256: merges a unit's chunks by their
// maxima into out [u][g][hd] (the normalised estimate) and lse [u][g] (-inf: nothing estimated),
// ready to merge with the exact part by log-sum-exp.
//
// Selection: the keys of the live clusters share their bits above the highest bit in which their
// min and max differ; radix passes of SEL_BITS bits from there find both thresholds (the m-th and
// the r-th largest key) at once, until each threshold's bin holds at most SEL_CAND keys, which are
// then ranked directly (find_thresholds: one pass at 8K clusters). Then each thread takes a run of
// ids and two block scans place the members of each zone at their rank in id order (ties at a
// threshold go to the lowest ids).
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    wave_select(const WaveUnit* units, const float* logits, const float* part_max,
                const float* part_sum, int n_parts, int group, int max_clusters, float* scores,
                unsigned* keys, int keys_in_smem, unsigned* ranks, int* ids, int max_ids,
                int* counts) {
  // Dynamic shared memory: with the union ranking its histograms of each head's logits
  // (union_bin, SEL_TOP words), then the keys when keys_in_smem (and after them the union keys).
  extern __shared__ __align__(16) unsigned sel_dyn[];
  __shared__ float m_s[WAVE_MAX_G], iz_s[WAVE_MAX_G];
  __shared__ wave::SelSmem ss;
  // The adaptive budget's top scores, then the union ranking's candidates.
  __shared__ unsigned pool[SEL_TOP];
  __shared__ unsigned red_min[32], red_max[32];
  __shared__ int red_live[32];
  const int u = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const WaveUnit wu = units[u];
  const int n = wu.n_clusters, G = group;
#ifdef SEL_PROFILE
  long long prof_t[10] = {0};
#endif
  SEL_T(0);
  // Each head's softmax over the chunks of wave_logits: a warp a head.
  if (warp < G) {
    const float* pm = part_max + ((size_t)u * G + warp) * n_parts;
    const float* ps = part_sum + ((size_t)u * G + warp) * n_parts;
    float m = -INFINITY;
#pragma unroll 8
    for (int j = lane; j < n_parts; j += 32) m = fmaxf(m, pm[j]);
    m = wave::warp_max(m);
    float z = 0.f;
    if (m != -INFINITY)
#pragma unroll 8
      for (int j = lane; j < n_parts; j += 32)
        if (pm[j] != -INFINITY) z += ps[j] * __expf(pm[j] - m);
    z = wave::warp_sum(z);
    if (lane == 0) {
      m_s[warp] = m;
      iz_s[warp] = z > 0.f ? 1.f / z : 0.f;
    }
  }
  // The union ranking: its scratch (the union keys beside the summed-score keys in shared
  // memory, else in the unit's first row of `ranks`; the second row for the ranking's
  // fallback) and its histograms, filled by the score pass.
  const bool uni = wu.union_ranking != 0;
  unsigned* uhist = sel_dyn;
  unsigned* skeys = sel_dyn + (uni ? SEL_TOP : 0);
  // With the union ranking and room for them (keys_in_smem 2), each head's bin of every
  // cluster (u16, UNION_DEAD for empty clusters) after the union keys, for the ranking's gather.
  unsigned short* ubins =
      uni && keys_in_smem == 2 ? reinterpret_cast<unsigned short*>(skeys + 2 * max_clusters)
                               : nullptr;
  if (uni && !ranks) __trap();  // the host passes the scratch with union units
  unsigned* ru = uni ? ranks + (size_t)u * 2 * max_clusters : nullptr;
  unsigned* uk = uni ? (keys_in_smem ? skeys + max_clusters : ru) : nullptr;
  const int lnb = wave::union_lnb(G), ushift = wave::union_shift(lnb);
  if (uni)
    for (int i = tid; i < (G << lnb); i += SEL_THREADS) uhist[i] = 0u;
  __syncthreads();
  SEL_T(1);
  unsigned* kk = keys_in_smem ? skeys : keys + (size_t)u * max_clusters;
  float* sc = scores + (size_t)u * max_clusters;
  const float* lns = reinterpret_cast<const float*>(wu.ln_sizes);
  int live = 0, pos = 0;
  double part = 0.0;  // the positive scores' sum (the adaptive budget's total)
  unsigned kmin = 0xffffffffu, kmax = 0u;
  // SCORE_RUN clusters a thread at a time (c = c0 + i * SEL_THREADS): their sizes, then head by
  // head their logits, each time all SCORE_RUN loads in flight together (a round trip a head
  // instead of one a cluster).
  constexpr int SCORE_RUN = 8;
  for (int c0 = tid; c0 < n; c0 += SCORE_RUN * SEL_THREADS) {
    float s[SCORE_RUN], bias[SCORE_RUN];
    bool ok[SCORE_RUN];
#pragma unroll
    for (int i = 0; i < SCORE_RUN; ++i) {
      const int c = c0 + i * SEL_THREADS;
      const float ln = c < n ? lns[c] : -INFINITY;
      ok[i] = ln != -INFINITY;
      s[i] = ok[i] ? 0.f : -INFINITY;
      bias[i] = ok[i] && wu.rank_by_size ? ln : 0.f;
    }
    for (int g = 0; g < G; ++g) {
      const float mg = m_s[g], izg = iz_s[g];
      const float* lg = logits + ((size_t)u * G + g) * max_clusters;
      float l[SCORE_RUN];
#pragma unroll
      for (int i = 0; i < SCORE_RUN; ++i) l[i] = ok[i] ? lg[c0 + i * SEL_THREADS] : 0.f;
      if (uni)
#pragma unroll
        for (int i = 0; i < SCORE_RUN; ++i) {
          const unsigned b = wave::union_bin(mg, l[i], ushift, 1u << lnb);
          if (ok[i]) atomicAdd(&uhist[(g << lnb) + b], 1u);
          if (ubins && c0 + i * SEL_THREADS < n)
            ubins[(size_t)g * max_clusters + c0 + i * SEL_THREADS] =
                ok[i] ? (unsigned short)b : UNION_DEAD;
        }
      if (mg != -INFINITY)
#pragma unroll
        for (int i = 0; i < SCORE_RUN; ++i)
          if (ok[i]) s[i] += __expf(l[i] + bias[i] - mg) * izg;
    }
#pragma unroll
    for (int i = 0; i < SCORE_RUN; ++i) {
      const int c = c0 + i * SEL_THREADS;
      if (c >= n) break;
      live += ok[i];
      sc[c] = s[i];
      if (uni) uk[c] = 0xffffffffu;
      const unsigned x = wave::order_key(s[i]);
      kk[c] = x;
      if (s[i] != -INFINITY) {
        kmin = min(kmin, x);
        kmax = max(kmax, x);
      }
      if (s[i] > 0.f && s[i] != INFINITY) {
        part += (double)s[i];
        pos += 1;
      }
    }
  }
  live = __reduce_add_sync(0xffffffffu, live);
  kmin = __reduce_min_sync(0xffffffffu, kmin);
  kmax = __reduce_max_sync(0xffffffffu, kmax);
  if (lane == 0) {
    red_live[warp] = live;
    red_min[warp] = kmin;
    red_max[warp] = kmax;
  }
  __syncthreads();
  if (warp == 0) {
    live = __reduce_add_sync(0xffffffffu, red_live[lane]);
    kmin = __reduce_min_sync(0xffffffffu, red_min[lane]);
    kmax = __reduce_max_sync(0xffffffffu, red_max[lane]);
    if (lane == 0) {
      red_live[0] = live;
      red_min[0] = kmin;
      red_max[0] = kmax;
    }
  }
  __syncthreads();
  const int n_live = red_live[0];
  kmin = red_min[0];
  kmax = red_max[0];
  SEL_T(2);
  // Adaptive retrieval budget (as WaveConfig::step_budgets on the CPU): at least `retrieval`
  // clusters, and as many of the best as it takes to cover `retrieval_mass` of the live
  // (positive) scores' total, up to `retrieval_cap`. The top `cap` scores are found with the
  // threshold search below (the cap-th largest key), gathered, sorted (descending) and summed
  // in f64 from the top.
  int r_base = wu.retrieval;
  if (wu.retrieval_mass > 0.f && wu.retrieval_cap > r_base) {
    float* top_s = reinterpret_cast<float*>(pool);
    __shared__ double red_d[32];
    __shared__ int top_n, top_ties, top_k;
    __syncthreads();  // every thread has read red_live[0] (n_live) before it is reused
    pos = __reduce_add_sync(0xffffffffu, pos);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if (lane == 0) {
      red_d[warp] = part;
      red_live[warp] = pos;
    }
    __syncthreads();
    if (warp == 0) {
      double t = red_d[lane];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
      const int p = __reduce_add_sync(0xffffffffu, red_live[lane]);
      if (lane == 0) {
        red_d[0] = t;
        red_live[1] = p;
      }
    }
    __syncthreads();
    const double total = red_d[0];
    const int cap = min(min(wu.retrieval_cap, red_live[1]), SEL_TOP);
    const double goal = (double)wu.retrieval_mass * total;
    if (cap > r_base && total > 0.0) {
      // The cap-th largest key (positive: cap is at most the positive scores' count).
      const unsigned need[2] = {(unsigned)cap, 0u};
      unsigned pre[2], above[2];
      wave::find_thresholds(kk, n, kmin, kmax, need, ss, pre, above);
      SEL_T(3);
      // Gather the top cap scores (keys above the threshold, then ties up to cap; tied keys
      // have equal scores, so which ones does not matter).
      if (tid == 0) {
        top_n = 0;
        top_ties = 0;
        top_k = cap;
      }
      __syncthreads();
      const unsigned ties = (unsigned)cap - above[0];
      for (int c = tid; c < n; c += SEL_THREADS) {
        const unsigned x = kk[c];
        bool take = x > pre[0];
        if (!take && x == pre[0]) take = (unsigned)atomicAdd(&top_ties, 1) < ties;
        if (take) top_s[atomicAdd(&top_n, 1)] = sc[c];
      }
      __syncthreads();
      SEL_T(4);
      // Sorted descending into the histograms' memory: by rank (each score against all the
      // others, ties by gather slot) when there are few, else a bitonic sort in place.
      float* sorted = reinterpret_cast<float*>(&ss.hist[0][0]);
      if (cap <= SEL_THREADS / 2) {
        // T consecutive lanes rank one score, each against a T-th of the others.
        const int T = cap <= SEL_THREADS / 4 ? 4 : 2;
        const int i = tid / T, q = tid % T;
        const bool act = i < cap;
        const float x = act ? top_s[i] : 0.f;
        int r = 0;
        if (act) {
          const int j1 = (q + 1) * cap / T;
#pragma unroll 4
          for (int j = q * cap / T; j < j1; ++j) {
            const float y = top_s[j];
            r += (y > x) || (y == x && j < i);
          }
        }
        for (int o = 1; o < T; o <<= 1) r += __shfl_xor_sync(0xffffffffu, r, o);
        if (act && q == 0) sorted[r] = x;
      } else {
        int np = 1;
        while (np < cap) np <<= 1;
        for (int i = tid; i < np; i += SEL_THREADS) sorted[i] = i < cap ? top_s[i] : -INFINITY;
        __syncthreads();
        wave::bitonic_desc(sorted, np);
      }
      __syncthreads();
      SEL_T(5);
      // Running sums from the top (a block scan in f64): the first count whose sum reaches the
      // goal (cap when none does).
      constexpr int PT = SEL_TOP / SEL_THREADS;
      double v[PT], loc = 0.0;
#pragma unroll
      for (int k = 0; k < PT; ++k) {
        const int i = tid * PT + k;
        v[k] = i < cap ? (double)sorted[i] : 0.0;
        loc += v[k];
      }
      double acc = wave::block_scan<double>(loc, red_d, nullptr);
#pragma unroll
      for (int k = 0; k < PT; ++k) {
        const int i = tid * PT + k;
        acc += v[k];
        if (i < cap && acc >= goal) {
          atomicMin(&top_k, i + 1);
          break;
        }
      }
      __syncthreads();
      SEL_T(6);
      r_base = max(r_base, top_k);
    }
  }
  const int m_want = min(min(r_base + wu.estimation, n_live), max_ids);
  const int r_want = min(r_base, m_want);
  if (m_want == 0) {
    if (tid == 0) counts[2 * u] = counts[2 * u + 1] = 0;
    return;
  }
  // The union ranking: the retrieval clusters' keys raised above every other key (just above
  // the largest, so the radix passes below start where they would have).
  if (uni && r_want > 0) {
    const unsigned top = kmax == 0xffffffffu ? kmax : kmax + 1u;
    wave::union_select(kk, top, uk, ru + max_clusters, logits + (size_t)u * G * max_clusters, n,
                       r_want, G, max_clusters, m_s, uhist, ubins, pool, ss, red_min, red_max);
    kmax = top;
  }
  // Both thresholds: the m-th and the r-th largest key.
  const unsigned need[2] = {(unsigned)m_want, (unsigned)max(r_want, 1)};
  unsigned thr[2], above[2];
  wave::find_thresholds(kk, n, kmin, kmax, need, ss, thr, above);
  SEL_T(7);
  const unsigned tm = thr[0], tr = r_want > 0 ? thr[1] : 0xffffffffu;
  const unsigned above_m = above[0], above_r = r_want > 0 ? above[1] : 0u;
  // Emission: thread t takes ids [t * per, (t + 1) * per).
  const int per = (n + SEL_THREADS - 1) / SEL_THREADS;
  const int c0 = min(n, tid * per), c1 = min(n, c0 + per);
  unsigned tie_m = 0, tie_r = 0;
  for (int c = c0; c < c1; ++c) {
    const unsigned x = kk[c];
    tie_m += x == tm;
    tie_r += r_want > 0 && x == tr;
  }
  const unsigned long long tb =
      wave::block_scan((unsigned long long)tie_m | ((unsigned long long)tie_r << 32), ss.warp_tot,
                       &ss.total);
  SEL_T(8);
  unsigned rank_m = (unsigned)tb, rank_r = (unsigned)(tb >> 32);
  const unsigned ties_m = (unsigned)m_want - above_m, ties_r = (unsigned)r_want - above_r;
  unsigned cnt_r = 0, cnt_e = 0;
  for (int c = c0; c < c1; ++c) {
    const unsigned x = kk[c];
    const bool in_m = x > tm || (x == tm && rank_m++ < ties_m);
    const bool in_r = r_want > 0 && (x > tr || (x == tr && rank_r++ < ties_r));
    cnt_r += in_r;
    cnt_e += in_m && !in_r;
  }
  const unsigned long long ob =
      wave::block_scan((unsigned long long)cnt_r | ((unsigned long long)cnt_e << 32), ss.warp_tot,
                       &ss.total);
  unsigned pos_r = (unsigned)ob, pos_e = (unsigned)(ob >> 32);
  rank_m = (unsigned)tb;
  rank_r = (unsigned)(tb >> 32);
  int* out = ids + (size_t)u * max_ids;
  for (int c = c0; c < c1; ++c) {
    const unsigned x = kk[c];
    const bool in_m = x > tm || (x == tm && rank_m++ < ties_m);
    const bool in_r = r_want > 0 && (x > tr || (x == tr && rank_r++ < ties_r));
    if (in_r) out[pos_r++] = c;
    else if (in_m) out[r_want + pos_e++] = c;
  }
  if (tid == 0) {
    counts[2 * u] = (int)(unsigned)ss.total;
    counts[2 * u + 1] = (int)(unsigned)(ss.total >> 32);
  }
#ifdef SEL_PROFILE
  SEL_T(9);
  if (blockIdx.x == 0 && tid == 0)
    printf("sel cycles n %d r %d m %d: combine %lld score %lld adapt-thr %lld gather %lld sort %lld "
           "scan %lld thr %lld tie-scan %lld emit %lld total %lld\n",
           n, r_want, m_want, prof_t[1] - prof_t[0], prof_t[2] - prof_t[1],
           prof_t[3] ? prof_t[3] - prof_t[2] : 0ll, prof_t[4] ? prof_t[4] - prof_t[3] : 0ll,
           prof_t[5] ? prof_t[5] - prof_t[4] : 0ll, prof_t[6] ? prof_t[6] - prof_t[5] : 0ll,
           prof_t[7] - (prof_t[6] ? prof_t[6] : prof_t[2]), prof_t[8] - prof_t[7],
           prof_t[9] - prof_t[8], prof_t[9] - prof_t[0]);
#endif
}


namespace wave {

template <int HD>
__device__ void estimate_partial(const WaveUnit* __restrict__ units, const float* __restrict__ logits,
                                 const int* __restrict__ ids, const int* __restrict__ counts,
                                 int max_ids, int max_clusters, int group, float* __restrict__ est_m,
                                 float* __restrict__ est_l, float* __restrict__ est_acc) {
  constexpr int DPL = HD / 32;  // dims per lane: 4 at hd 128, 2 at hd 64
  constexpr int PER_ROW = HD * (int)sizeof(bf16) / 16;  // 16-byte pieces of a mean row
  __shared__ __align__(16) bf16 rows_s[EST_CHUNK * HD];
  __shared__ float w[WAVE_MAX_G][EST_CHUNK];
  __shared__ int cid[EST_CHUNK];
  __shared__ float m_s[WAVE_MAX_G];
  const int u = blockIdx.y, chunk = blockIdx.x, n_chunks = gridDim.x, tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5, G = group;
  const WaveUnit wu = units[u];
  const int n_r = counts[2 * u], n_e = counts[2 * u + 1];
  const int j0 = chunk * EST_CHUNK, nj = max(0, min(EST_CHUNK, n_e - j0));
  const size_t part = (size_t)u * n_chunks + chunk;
  if (nj == 0) {  // past this unit's estimation zone: an empty partial
    for (int i = tid; i < G; i += blockDim.x) {
      est_m[part * G + i] = -INFINITY;
      est_l[part * G + i] = 0.f;
    }
    for (int i = tid; i < G * HD; i += blockDim.x) est_acc[part * G * HD + i] = 0.f;
    return;
  }
  const float* lns = reinterpret_cast<const float*>(wu.ln_sizes);
  for (int j = tid; j < EST_CHUNK; j += blockDim.x)
    cid[j] = j < nj ? ids[(size_t)u * max_ids + n_r + j0 + j] : -1;
  __syncthreads();
  // The chunk's mean rows are copied into shared memory (cp.async, all in flight at once) while
  // the weights are computed.
  {
    const char* base = reinterpret_cast<const char*>(wu.means);
    const unsigned dst = tc::smem_u32(rows_s);
    for (int i = tid; i < nj * PER_ROW; i += blockDim.x) {
      const int j = i / PER_ROW, p = i % PER_ROW;
      tc::cp_async16(dst + i * 16, base + (size_t)cid[j] * HD * sizeof(bf16) + p * 16, true);
    }
    tc::cp_async_commit();
  }
  for (int j = tid; j < EST_CHUNK; j += blockDim.x) {
    const int c = cid[j];
    const float ln = c >= 0 ? lns[c] : -INFINITY;
    for (int g = 0; g < G; ++g)
      w[g][j] = c >= 0 ? logits[((size_t)u * G + g) * max_clusters + c] + ln : -INFINITY;
  }
  __syncthreads();
  // One warp per head: the chunk's max (EST_CHUNK <= 64: two entries a lane).
  for (int g = warp; g < G; g += EST_WARPS) {
    float m = -INFINITY;
    for (int j = lane; j < nj; j += 32) m = fmaxf(m, w[g][j]);
    m = warp_max(m);
    if (lane == 0) m_s[g] = m;
  }
  __syncthreads();
  for (int i = tid; i < G * EST_CHUNK; i += blockDim.x) {
    const int g = i / EST_CHUNK, j = i % EST_CHUNK;
    const float x = w[g][j];
    w[g][j] = (x == -INFINITY || m_s[g] == -INFINITY) ? 0.f : __expf(x - m_s[g]);
  }
  tc::cp_async_wait<0>();
  __syncthreads();
  // A warp per head (heads warp, warp + EST_WARPS, ...): a lane owns DPL dims and walks the
  // chunk's rows in shared memory; no reduction across warps.
  for (int g = warp; g < G; g += EST_WARPS) {
    float acc[DPL];
#pragma unroll
    for (int d = 0; d < DPL; ++d) acc[d] = 0.f;
#pragma unroll 4
    for (int j = 0; j < nj; ++j) {
      const bf16* row = rows_s + j * HD + lane * DPL;
      float x[DPL];
      if (DPL == 4) {
        const uint2 raw = *reinterpret_cast<const uint2*>(row);
        x[0] = __uint_as_float(raw.x << 16);
        x[1] = __uint_as_float(raw.x & 0xffff0000u);
        x[2] = __uint_as_float(raw.y << 16);
        x[3] = __uint_as_float(raw.y & 0xffff0000u);
      } else {
        const unsigned raw = *reinterpret_cast<const unsigned*>(row);
        x[0] = __uint_as_float(raw << 16);
        x[1] = __uint_as_float(raw & 0xffff0000u);
      }
      const float wg = w[g][j];
#pragma unroll
      for (int d = 0; d < DPL; ++d) acc[d] += wg * x[d];
    }
#pragma unroll
    for (int d = 0; d < DPL; ++d) est_acc[(part * G + g) * HD + lane * DPL + d] = acc[d];
    float l = 0.f;
    for (int j = lane; j < nj; j += 32) l += w[g][j];
    l = warp_sum(l);
    if (lane == 0) {
      est_m[part * G + g] = m_s[g];
      est_l[part * G + g] = l;
    }
  }
}

}  // namespace wave

extern "C" __global__ void __launch_bounds__(EST_WARPS * 32)
    wave_estimate_partial_hd64(const WaveUnit* units, const float* logits, const int* ids,
                               const int* counts, int max_ids, int max_clusters, int group,
                               float* est_m, float* est_l, float* est_acc) {
  wave::estimate_partial<64>(units, logits, ids, counts, max_ids, max_clusters, group, est_m, est_l,
                             est_acc);
}
extern "C" __global__ void __launch_bounds__(EST_WARPS * 32)
    wave_estimate_partial_hd128(const WaveUnit* units, const float* logits, const int* ids,
                                const int* counts, int max_ids, int max_clusters, int group,
                                float* est_m, float* est_l, float* est_acc) {
  wave::estimate_partial<128>(units, logits, ids, counts, max_ids, max_clusters, group, est_m,
                              est_l, est_acc);
}

// Grid (n_units, group), block 256 threads; merges the chunks of head blockIdx.y of unit
// blockIdx.x: the max over the chunks, their scale factors (into shared memory) and sum, then
// each dimension sums its chunks (loads of 8 chunks in flight per thread).
extern "C" __global__ void __launch_bounds__(256)
    wave_estimate_merge(const float* est_m, const float* est_l, const float* est_acc, int n_chunks,
                        int group, int hd, float* out, float* lse) {
  __shared__ float red[8];
  __shared__ float s_mx, s_l;
  extern __shared__ float fac[];  // [n_chunks]
  const int u = blockIdx.x, g = blockIdx.y, tid = threadIdx.x, G = group;
  const int lane = tid & 31, warp = tid >> 5;
  float m = -INFINITY;
  for (int k = tid; k < n_chunks; k += blockDim.x)
    m = fmaxf(m, est_m[((size_t)u * n_chunks + k) * G + g]);
  m = wave::warp_max(m);
  if (lane == 0) red[warp] = m;
  __syncthreads();
  if (tid == 0) {
    float x = -INFINITY;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) x = fmaxf(x, red[w]);
    s_mx = x;
  }
  __syncthreads();
  const float mx = s_mx;
  float l = 0.f;
  for (int k = tid; k < n_chunks; k += blockDim.x) {
    const size_t i = ((size_t)u * n_chunks + k) * G + g;
    const float mk = est_m[i];
    const float f = (mk == -INFINITY || mx == -INFINITY) ? 0.f : __expf(mk - mx);
    fac[k] = f;
    l += est_l[i] * f;
  }
  l = wave::warp_sum(l);
  __syncthreads();
  if (lane == 0) red[warp] = l;
  __syncthreads();
  if (tid == 0) {
    float x = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) x += red[w];
    s_l = x;
    lse[(size_t)u * G + g] = x > 0.f ? mx + __logf(x) : -INFINITY;
  }
  __syncthreads();
  const float ls = s_l;
  for (int d = tid; d < hd; d += blockDim.x) {
    float a = 0.f;
#pragma unroll 8
    for (int k = 0; k < n_chunks; ++k)
      a += __ldg(est_acc + (((size_t)u * n_chunks + k) * G + g) * hd + d) * fac[k];
    out[((size_t)u * G + g) * hd + d] = ls > 0.f ? a / ls : 0.f;
  }
}

// The host tier's part of wave_tokens (see there) for unit U with tier T: runs the store's LRU
// policy (retrowave_store::policy::WaveBufferPolicy) over the unit's retrieval clusters `uid[0 ..
// nr)` in ascending id order (the `wanted` order; earlier = more recent), writes this step's
// fills to T.jobs and the clusters' list entries from L[steady ..]. Returns the list's length.
//
// The policy, in parallel: a wanted cluster with a stamp is a hit (its stamp renewed, it can not
// be evicted); misses in wanted order are admitted while their pages fit in the free pages plus
// the pages of evictable residents (resident, not wanted), else bypassed (read from host memory
// this step, nothing evicted for them); the admitted pages A need the least recently used
// evictable residents with at least A - free pages between them, found by a radix pass over
// their stamps (unique, so the threshold is one cluster's); admissions take the lowest free
// slots. Slot ids may differ from the CPU policy's (which interleaves evictions and admissions);
// hits, admissions, bypasses, evictions and the resident set are the same.
__device__ int tier_tokens(const WaveUnit& U, const WaveTier& T, const SeqDesc& sd,
                           const int* __restrict__ uid, int nr, int steady, int* __restrict__ L,
                           int list_cap, int* sh, unsigned long long* warp_tot,
                           unsigned long long* total) {
  __shared__ unsigned hist[256];
  __shared__ unsigned s_misc[8];
  const int tid = threadIdx.x;
  const int P = T.page, S = T.capacity;
  const int* offs = reinterpret_cast<const int*>(U.offsets);
  unsigned* stamp = reinterpret_cast<unsigned*>(T.stamp);
  int* owner = reinterpret_cast<int*>(T.slot_owner);
  int* spage = reinterpret_cast<int*>(T.slot_page);
  int* freel = reinterpret_cast<int*>(T.free_list);
  int* jobs = reinterpret_cast<int*>(T.jobs);
  unsigned* state = reinterpret_cast<unsigned*>(T.state);
  unsigned long long* stats = reinterpret_cast<unsigned long long*>(T.stats);
  // sh: s_off[SEL_TOP] (list offset of wanted i), s_adm[SEL_TOP] (first free rank of an admitted
  // i; -1 hit, -2 bypass, -3 miss before the admission pass, -4 a cluster of an index update,
  // whose tokens are in the GPU cache: outside the policy).
  int* s_off = sh;
  int* s_adm = sh + SEL_TOP;
  const unsigned used = state[0], base = state[1];
  nr = min(nr, SEL_TOP);
  if (tid == 0) s_misc[3] = 0u;
  // Hits, list offsets, miss pages.
  unsigned long long hit_pages = 0, miss_pages_t = 0;
  int carry = steady;
  for (int b0 = 0; b0 < nr; b0 += SEL_THREADS) {
    const int i = b0 + tid;
    int sz = 0;
    if (i < nr) {
      const int c = uid[i];
      sz = offs[c + 1] - offs[c];
      const int pg = (sz + P - 1) / P;
      if (c >= T.host_clusters) {
        s_adm[i] = -4;
      } else if (stamp[c] != 0u) {
        stamp[c] = base + (unsigned)(nr - i);
        s_adm[i] = -1;
        hit_pages += pg;
      } else {
        s_adm[i] = -3;
        miss_pages_t += pg;
      }
    }
    const int off = (int)wave::block_scan((unsigned long long)sz, warp_tot, total);
    if (i < nr) s_off[i] = carry + off;
    carry += (int)*total;
    __syncthreads();
  }
  const int list_len = carry;
  // Evictable residents: first pages of clusters with an old stamp.
  unsigned long long ev_pages = 0;
  for (int s = tid; s < S; s += SEL_THREADS) {
    const int o = owner[s];
    if (o >= 0 && spage[s] == 0 && stamp[o] <= base) ev_pages += (offs[o + 1] - offs[o] + P - 1) / P;
  }
  // Block sums of (miss pages, evictable pages, hit pages), packed 21 bits each (< 2M pages).
  wave::block_scan(miss_pages_t | (ev_pages << 21) | (hit_pages << 42), warp_tot, total);
  const unsigned long long packed = *total;
  const long long M = (long long)(packed & 0x1fffff), E = (long long)((packed >> 21) & 0x1fffff);
  const long long H = (long long)(packed >> 42);
  const long long free0 = (long long)S - (long long)used;
  // Admission ranks: a prefix sum of the miss pages when everything fits, else one thread walks
  // the misses in order.
  if (M <= free0 + E) {
    long long acc = 0;
    for (int b0 = 0; b0 < nr; b0 += SEL_THREADS) {
      const int i = b0 + tid;
      int pg = 0;
      if (i < nr && s_adm[i] == -3) {
        const int c = uid[i];
        pg = (offs[c + 1] - offs[c] + P - 1) / P;
      }
      const long long off = (long long)wave::block_scan((unsigned long long)pg, warp_tot, total);
      if (pg > 0) s_adm[i] = (int)(acc + off);
      acc += (long long)*total;
      __syncthreads();
    }
    if (tid == 0) s_misc[0] = (unsigned)acc;
  } else if (tid == 0) {
    long long A = 0;
    for (int i = 0; i < nr; ++i) {
      if (s_adm[i] != -3) continue;
      const int c = uid[i];
      const long long pg = (offs[c + 1] - offs[c] + P - 1) / P;
      if (pg > free0 + E - A) {
        s_adm[i] = -2;
      } else {
        s_adm[i] = (int)A;
        A += pg;
      }
    }
    s_misc[0] = (unsigned)A;
  }
  __syncthreads();
  const long long A = s_misc[0];
  // Evictions: the oldest evictable residents covering A - free0 pages (stamp <= thr).
  long long need = A - free0;
  unsigned thr = 0;
  if (need > 0) {
    unsigned prefix = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = tid; b < 256; b += SEL_THREADS) hist[b] = 0;
      __syncthreads();
      for (int s = tid; s < S; s += SEL_THREADS) {
        const int o = owner[s];
        if (o < 0 || spage[s] != 0) continue;
        const unsigned st = stamp[o];
        if (st > base || ((unsigned long long)(st ^ prefix) >> (shift + 8)) != 0ull) continue;
        atomicAdd(&hist[(st >> shift) & 255u], (unsigned)((offs[o + 1] - offs[o] + P - 1) / P));
      }
      __syncthreads();
      if (tid == 0) {
        long long acc = 0;
        int b = 0;
        for (; b < 255; ++b) {
          if (acc + hist[b] >= need) break;
          acc += hist[b];
        }
        s_misc[1] = prefix | ((unsigned)b << shift);
        s_misc[2] = (unsigned)(need - acc);
      }
      __syncthreads();
      prefix = s_misc[1];
      need = s_misc[2];
      __syncthreads();
    }
    thr = prefix;
  }
  // Evict (a cluster's later pages may see its stamp already cleared: 0 <= thr, evicted alike).
  unsigned ev_t = 0;
  if (thr > 0) {
    for (int s = tid; s < S; s += SEL_THREADS) {
      const int o = owner[s];
      if (o < 0) continue;
      if (stamp[o] <= thr) {
        if (spage[s] == 0) stamp[o] = 0u;
        owner[s] = -1;
        ++ev_t;
      }
    }
  }
  __syncthreads();
  // Free slots in ascending order.
  unsigned long long nfree = 0;
  for (int b0 = 0; b0 < S; b0 += SEL_THREADS) {
    const int s = b0 + tid;
    const int f = (s < S && owner[s] < 0) ? 1 : 0;
    const unsigned long long r = wave::block_scan((unsigned long long)f | ((unsigned long long)ev_t << 32), warp_tot, total);
    if (f && nfree + (r & 0xffffffffull) < (unsigned long long)S) freel[nfree + (r & 0xffffffffull)] = s;
    nfree += *total & 0xffffffffull;
    if (b0 == 0) s_misc[3] = (unsigned)(*total >> 32);  // evicted slots (every thread's count once)
    ev_t = 0;
    __syncthreads();
  }
  // Admissions: slots, jobs, stamps.
  for (int i = tid; i < nr; i += SEL_THREADS) {
    const int a = s_adm[i];
    if (a < 0) continue;
    const int c = uid[i];
    const int o0 = offs[c], sz = offs[c + 1] - o0;
    for (int p = 0; p * P < sz; ++p) {
      const int slot = freel[a + p];
      owner[slot] = c;
      spage[slot] = p;
      jobs[3 * (a + p)] = slot;
      jobs[3 * (a + p) + 1] = o0 + p * P;
      jobs[3 * (a + p) + 2] = min(P, sz - p * P);
    }
    stamp[c] = base + (unsigned)(nr - i);
  }
  __syncthreads();
  // List entries of resident wanted clusters: every slot whose owner is wanted writes its rows.
  // This step's clusters carry this step's stamps, base + nr - i for wanted i: their index.
  for (int s = tid; s < S; s += SEL_THREADS) {
    const int o = owner[s];
    if (o < 0) continue;
    const unsigned st = stamp[o];
    if (st <= base) continue;  // resident, not wanted
    const int lo = nr - (int)(st - base);
    const int p = spage[s];
    const int n = min(P, offs[o + 1] - offs[o] - p * P);
    const int d0 = s_off[lo] + p * P;
    for (int r = 0; r < n; ++r)
      if (d0 + r < list_cap) L[d0 + r] = -(1 + s * P + r);
  }
  // Clusters outside the buffers: those of index updates (their members' slots in the GPU
  // cache) and bypassed ones (rows of the host arena); a warp each, when there are any.
  const int* mem = reinterpret_cast<const int*>(U.members);
  unsigned long long byp = 0;
  int odd = 0;
  for (int i = tid; i < nr; i += SEL_THREADS) odd |= s_adm[i] == -4 || s_adm[i] == -2;
  if (__syncthreads_or(odd)) {
    const int lane = tid & 31, warp = tid >> 5;
    for (int i = warp; i < nr; i += SEL_THREADS / 32) {
      const int a = s_adm[i];
      if (a != -4 && a != -2) continue;
      const int c = uid[i];
      const int o0 = offs[c], sz = offs[c + 1] - o0;
      if (a == -2 && lane == 0) byp += (sz + P - 1) / P;
      for (int r = lane; r < sz; r += 32)
        if (s_off[i] + r < list_cap)
          L[s_off[i] + r] = a == -4 ? seq_slot(sd, mem[o0 + r]) : WAVE_HOST_ENTRY + o0 + r;
    }
  }
  // The bypassed pages, summed over the warps' lane 0s.
  if (tid == 0) s_misc[4] = 0u;
  __syncthreads();
  if (byp) atomicAdd(&s_misc[4], (unsigned)byp);
  __syncthreads();
  if (tid == 0) {
    const unsigned evicted = s_misc[3];
    state[0] = used + (unsigned)A - evicted;
    state[1] = base + (unsigned)nr;
    state[2] = (unsigned)A;
    atomicAdd(stats + 0, (unsigned long long)H);
    atomicAdd(stats + 1, (unsigned long long)A);
    atomicAdd(stats + 2, (unsigned long long)s_misc[4]);
    atomicAdd(stats + 3, (unsigned long long)evicted);
    if (base == 0u) atomicAdd(stats + 4, (unsigned long long)A + s_misc[4]);  // the first step: cold
  }
  return list_len;
}

// wave_tokens: grid (n_units), block SEL_THREADS. The token list of each unit's exact part, in
// the order the attention walks it: the steady zone ([0, sink) and [indexed_end, n_tokens), with
// n_tokens = the cached tokens of the unit's sequence, this step's included), then
// the members of its retrieval clusters (ids[u][0 .. counts[u][0]), ascending ids, so memory is
// walked forwards) into list[u][0 .. list_cap), with the length in count[u]. A list longer than
// list_cap (the host sizes it as a bound, so this means a host bug) is cut and counted in
// overflow[0]: the metrics report it, nothing is dropped silently.
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    wave_tokens(const WaveUnit* units, const SeqDesc* seqs, const int* row_seq, const int* ids,
                const int* counts, int max_ids, int* list, int* count, int list_cap, int* overflow) {
  __shared__ unsigned long long warp_tot[32];
  __shared__ unsigned long long total;
  __shared__ int sh[2 * SEL_TOP];  // s_dst, s_src, s_len here; tier_tokens' arrays with a tier
  int* s_dst = sh;
  int* s_src = sh + SEL_THREADS;
  int* s_len = sh + 2 * SEL_THREADS;
  const int u = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const WaveUnit U = units[u];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  int* L = list + (size_t)u * list_cap;
  const int* offs = reinterpret_cast<const int*>(U.offsets);
  const int* mem = reinterpret_cast<const int*>(U.members);
  const SeqDesc sd = seqs[row_seq[U.q_row]];
  const int n_tokens = sd.start_pos + (U.q_row - sd.row) + 1;
  const int s1 = max(0, min(U.sink, n_tokens));
  const int s2 = max(0, n_tokens - max(U.indexed_end, s1));
  const int steady = s1 + s2;
  for (int j = tid; j < min(steady, list_cap); j += SEL_THREADS)
    L[j] = seq_slot(sd, j < s1 ? j : max(U.indexed_end, s1) + (j - s1));
  const int nr = counts[2 * u];
  const int* uid = ids + (size_t)u * max_ids;
  if (U.tier != 0ull) {
    const WaveTier T = *reinterpret_cast<const WaveTier*>(U.tier);
    const int len = tier_tokens(U, T, sd, uid, nr, steady, L, list_cap, sh, warp_tot, &total);
    if (tid == 0) {
      count[u] = min(len, list_cap);
      if (len > list_cap) atomicAdd(overflow, 1);
    }
    return;
  }
  int carry = steady;
  for (int base = 0; base < nr; base += SEL_THREADS) {
    const int c = base + tid < nr ? uid[base + tid] : -1;
    int o0 = 0, sz = 0;
    if (c >= 0) {
      o0 = offs[c];
      sz = offs[c + 1] - o0;
    }
    const int off = (int)wave::block_scan((unsigned long long)sz, warp_tot, &total);
    s_dst[tid] = carry + off;
    s_src[tid] = o0;
    s_len[tid] = sz;
    const int chunk_total = (int)total;
    __syncthreads();
    // One warp per cluster: coalesced copies of its members.
    const int n_here = min(SEL_THREADS, nr - base);
    for (int k = warp; k < n_here; k += SEL_THREADS / 32) {
      const int d0 = s_dst[k], o = s_src[k], n = s_len[k];
      for (int e = lane; e < n; e += 32)
        if (d0 + e < list_cap) L[d0 + e] = mem[o + e];
    }
    carry += chunk_total;
    __syncthreads();  // the shared arrays and the scan's buffers are reused
  }
  if (tid == 0) {
    count[u] = min(carry, list_cap);
    if (carry > list_cap) atomicAdd(overflow, 1);
  }
}

// wave_cache_fill: grid (n_units, FILL_Y), block 256. Copies this step's admitted pages of each
// unit with a host tier (T.jobs[0 .. T.state[2]): slot, first token, tokens) from its host arena
// (pinned host memory, read over PCIe by the loads themselves) into its wave buffer slots, K and
// V, 16 bytes a thread. Launched after wave_tokens, before the exact attention.
extern "C" __global__ void __launch_bounds__(256)
    wave_cache_fill(const WaveUnit* units, int hd) {
  const WaveUnit U = units[blockIdx.x];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  if (U.tier == 0ull) return;
  const WaveTier T = *reinterpret_cast<const WaveTier*>(U.tier);
  const int n_jobs = (int)reinterpret_cast<const unsigned*>(T.state)[2];
  const int* jobs = reinterpret_cast<const int*>(T.jobs);
  const int cpr = hd >> 3;  // 16-byte chunks per row
  const int per_job = T.page * cpr;
  const long long total = (long long)n_jobs * per_job;
  const uint4* hk = reinterpret_cast<const uint4*>(T.host_k);
  const uint4* hv = reinterpret_cast<const uint4*>(T.host_v);
  uint4* ck = reinterpret_cast<uint4*>(T.cache_k);
  uint4* cv = reinterpret_cast<uint4*>(T.cache_v);
  for (long long x = (long long)blockIdx.y * blockDim.x + threadIdx.x; x < total;
       x += (long long)gridDim.y * blockDim.x) {
    const int j = (int)(x / per_job), r = (int)(x - (long long)j * per_job);
    const int row = r / cpr, ch = r - row * cpr;
    if (row >= jobs[3 * j + 2]) continue;
    const long long src = (long long)(jobs[3 * j + 1] + row) * cpr + ch;
    const long long dst = ((long long)jobs[3 * j] * T.page + row) * cpr + ch;
    ck[dst] = hk[src];
    cv[dst] = hv[src];
  }
}

// wave_tier_restore: grid (n_units, Y), block 256. Puts each unit's host arena rows back at their
// positions in a full cache: k[u][members[u * mstride + j]] = host_k[u][j] for j < it (and v
// alike), 16 bytes a thread; `cap` is the full cache's slots per unit.
extern "C" __global__ void __launch_bounds__(256)
    wave_tier_restore(const bf16* hk, const bf16* hv, const int* members, int it, int mstride,
                      bf16* k, bf16* v, int cap, int hd) {
  const int u = blockIdx.x, cpr = hd >> 3;
  const long long total = (long long)it * cpr;
  const uint4* sk = reinterpret_cast<const uint4*>(hk) + (size_t)u * it * cpr;
  const uint4* sv = reinterpret_cast<const uint4*>(hv) + (size_t)u * it * cpr;
  uint4* dk = reinterpret_cast<uint4*>(k) + (size_t)u * cap * cpr;
  uint4* dv = reinterpret_cast<uint4*>(v) + (size_t)u * cap * cpr;
  const int* mem = members + (size_t)u * mstride;
  for (long long x = (long long)blockIdx.y * blockDim.x + threadIdx.x; x < total;
       x += (long long)gridDim.y * blockDim.x) {
    const int j = (int)(x / cpr), ch = (int)(x - (long long)j * cpr);
    const long long dst = (long long)mem[j] * cpr + ch;
    dk[dst] = sk[x];
    dv[dst] = sv[x];
  }
}

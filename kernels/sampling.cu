// Token selection kernels of the CUDA backend (see kernels/README.md for the contract).
//
// Both kernels take one block per row of logits (grid-stride over rows, so any grid is correct),
// blockDim a power of two in 32..1024 (1024 recommended for vocabularies of 32K and more), no
// dynamic shared memory.
//
// sample_rows never sorts the vocabulary. The top-k and top-p thresholds are found by radix
// selection (a 256-way bisection) over the order-preserving 32-bit keys of the logits, eight bits
// per pass, with block-wide histograms of counts (top-k) or of probability mass (top-p) in shared
// memory. Probability mass is kept in 2^-40 fixed point (64-bit integers) so every sum is exact and
// independent of the order of the additions: the result is deterministic for given inputs, and
// the inverse CDF always lands on a kept token.
#include "common.cuh"

namespace {

constexpr int NBINS = 256;
constexpr float MASS_ONE = 1099511627776.0f;  // 2^40: fixed-point unit of probability weights

// Order-preserving key of a float (larger float -> larger key); -0 and +0 share a key.
__device__ __forceinline__ unsigned int fkey(float f) {
  const unsigned int u = __float_as_uint(f + 0.0f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ bool row_vec_ok(const float* row) {
  return (reinterpret_cast<unsigned long long>(row) & 15ull) == 0;
}

// Elements idx .. idx+3 of a row (idx a multiple of 4); NaN past the end.
__device__ __forceinline__ void load4(const float* row, int idx, int vocab, bool vec, float (&v)[4]) {
  if (vec && idx + 3 < vocab) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(row + idx));
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = idx + e < vocab ? __ldg(row + idx + e) : __int_as_float(0x7fffffff);
  }
}

// Calls f(value, index) for every element of the row this thread owns (4 consecutive elements per
// load, coalesced across the block, UNROLL loads in flight per thread, indices increasing per
// thread). Elements past the end come as NaN.
template <int UNROLL = 4, class F>
__device__ __forceinline__ void for_row(const float* row, int vocab, bool vec, F&& f) {
  const int step = blockDim.x * 4;
  int base = threadIdx.x * 4;
  for (; base + (UNROLL - 1) * step < vocab; base += UNROLL * step) {
    float v[UNROLL][4];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) load4(row, base + j * step, vocab, vec, v[j]);
#pragma unroll
    for (int j = 0; j < UNROLL; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(v[j][e], base + j * step + e);
  }
  for (; base < vocab; base += step) {
    float v[4];
    load4(row, base, vocab, vec, v);
#pragma unroll
    for (int e = 0; e < 4; ++e) f(v[e], base + e);
  }
}

// (v, i) beats (bv, bi): larger value, ties to the lower index; NaN never wins.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

// Block-wide argmax; every thread gets the winner. bi == INT_MAX when every element is NaN.
__device__ __forceinline__ void block_argmax(float& bv, int& bi, float* sv, int* si) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) {
    sv[warp] = bv;
    si[warp] = bi;
  }
  __syncthreads();
  bv = __int_as_float(0xff800000);
  bi = 0x7fffffff;
  if (lane < (int)(blockDim.x >> 5)) {
    bv = sv[lane];
    bi = si[lane];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) {
      bv = ov;
      bi = oi;
    }
  }
}

// Argmax of one row by the calling block; every thread gets the index (0 if every value is NaN).
__device__ __forceinline__ int row_argmax(const float* row, int vocab, bool vec, float* sv, int* si, float& best) {
  float bv = __int_as_float(0xff800000);
  int bi = 0x7fffffff;
  for_row(row, vocab, vec, [&](float v, int i) {
    if (better(v, i, bv, bi)) {
      bv = v;
      bi = i;
    }
  });
  block_argmax(bv, bi, sv, si);
  best = bv;
  return bi == 0x7fffffff ? 0 : bi;
}

// Shared state of sample_rows' selections.
struct SelState {
  unsigned int prefix;       // key bits fixed so far
  unsigned int threshold;    // resulting threshold key (valid once done)
  unsigned int count_above;  // top-k: elements with keys above the current prefix range
  int done;
  unsigned long long mass_above;  // top-p: mass above the current prefix range
  unsigned long long target;      // top-p: mass to reach
  unsigned long long pick_base;   // inverse CDF: mass before the chosen warp's segment
  unsigned long long pick_t;      // inverse CDF: target
  int pick_warp;
};

// Per-thread run-length cache in front of the shared histogram: consecutive hits of the same bin
// are added once, which removes most of the atomic traffic (and its contention on the few bins
// that hold most of the vocabulary in the first passes).
struct BinCache {
  int bin = -1;
  unsigned int cnt = 0;
  unsigned long long mass = 0;
  __device__ __forceinline__ void flush(unsigned int* hc, unsigned long long* hm, bool with_mass) {
    if (cnt) {
      atomicAdd(hc + bin, cnt);
      if (with_mass) atomicAdd(hm + bin, mass);
    }
  }
  __device__ __forceinline__ void add(int b, unsigned long long m, unsigned int* hc, unsigned long long* hm,
                                      bool with_mass) {
    if (b != bin) {
      flush(hc, hm, with_mass);
      bin = b;
      cnt = 0;
      mass = 0;
    }
    ++cnt;
    mass += m;
  }
};

// Warp 0 picks the bin of a level of the radix selection: the highest bin b such that
// above + (sum of hist over bins >= b) >= need. Lane l owns bins 255-8l .. 248-8l. Returns, in
// lane 0, the bin, the total above it (excluding the bin) and the bin's own value. `need` must be
// reachable (above + all bins >= need).
template <class T>
__device__ __forceinline__ void warp_pick_bin(const T* hist, T above, T need, int& bin, T& before, T& own) {
  const int lane = threadIdx.x & 31;
  T loc[8];
  T s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    loc[j] = hist[NBINS - 1 - 8 * lane - j];
    s += loc[j];
  }
  T incl = s;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  const unsigned int hit = __ballot_sync(0xffffffffu, above + incl >= need);
  const int src = hit ? __ffs(hit) - 1 : 31;
  int b = NBINS - 1 - 8 * lane;
  T c = above + incl - s, bo = loc[0];
  bool found = false;
  if (lane == src) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (!found) {
        b = NBINS - 1 - 8 * lane - j;
        bo = loc[j];
        if (c + loc[j] >= need || (j == 7)) found = true;
        else c += loc[j];
      }
    }
  }
  bin = __shfl_sync(0xffffffffu, b, src);
  before = __shfl_sync(0xffffffffu, c, src);
  own = __shfl_sync(0xffffffffu, bo, src);
}

__device__ __forceinline__ unsigned long long warp_incl_scan(unsigned long long v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long t = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace

// out[r] = index of the largest logit of row r; ties go to the lowest index, NaN never wins
// (0 if the whole row is NaN).
extern "C" __global__ void __launch_bounds__(1024)
    argmax_rows(const float* __restrict__ logits, int rows, int vocab, int* __restrict__ out) {
  __shared__ float sv[32];
  __shared__ int si[32];
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = logits + (long long)r * vocab;
    float best;
    const int i = row_argmax(row, vocab, row_vec_ok(row), sv, si, best);
    if (threadIdx.x == 0) out[r] = i;
  }
}

// Samples one token per row r:
// - temperature[r] <= 0 (or NaN, or logits / temperature overflowing) or top_k[r] == 1: greedy,
//   the same index argmax_rows gives.
// - Otherwise probabilities are softmax(logits / temperature[r]) (NaN logits have probability 0
//   and are never kept). top_k[r] in 1..vocab-1 keeps every token whose logit is >= the k-th
//   largest logit (all tokens equal to that threshold are kept, so ties can keep more than k);
//   top_k <= 0 or >= the number of non-NaN logits keeps all. top_p[r] < 1 then keeps the tokens
//   whose logit is >= the largest threshold whose kept mass (within the top-k set) reaches
//   top_p times the top-k set's mass: the smallest set of most probable tokens reaching top_p,
//   again with every token equal to the threshold kept; top_p <= 0 keeps the most probable
//   token(s); top_p >= 1 (or NaN) keeps all.
// - The kept weights are renormalised and the token is picked by inverse CDF at uniform[r]
//   (clamped to [0, 1)), scanning the kept tokens in index order: the first token whose
//   cumulative weight exceeds uniform[r] times the total. Weights are exp(l / T - max / T) in
//   2^-40 fixed point; a kept token whose weight rounds to 0 (probability below ~1e-12 of the
//   top token's) is never picked.
extern "C" __global__ void __launch_bounds__(1024)
    sample_rows(const float* __restrict__ logits, int rows, int vocab, const float* __restrict__ temperature,
                const int* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ uniform,
                int* __restrict__ out) {
  __shared__ unsigned int hc[NBINS];
  __shared__ unsigned long long hm[NBINS];
  __shared__ float sv[32];
  __shared__ int si[32];
  __shared__ unsigned long long seg[32];
  __shared__ SelState st;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;

  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = logits + (long long)r * vocab;
    const bool vec = row_vec_ok(row);
    const float temp = temperature[r];
    const int k = top_k[r];
    const float p = top_p[r];
    float u = uniform[r];
    u = u >= 0.0f ? u : 0.0f;  // NaN -> 0

    const bool want_k = k > 1 && k < vocab;
    // Pass 1: argmax (and the max logit), and the first histogram level of the top-k selection.
    __syncthreads();  // the previous row is done with the shared state
    if (want_k)
      for (int b = tid; b < NBINS; b += blockDim.x) hc[b] = 0;
    __syncthreads();
    float bv = __int_as_float(0xff800000);
    int bi = 0x7fffffff;
    {
      BinCache cache;
      for_row(row, vocab, vec, [&](float v, int i) {
        if (better(v, i, bv, bi)) {
          bv = v;
          bi = i;
        }
        if (want_k && !isnan(v)) cache.add(fkey(v) >> 24, 0, hc, hm, false);
      });
      if (want_k) cache.flush(hc, hm, false);
    }
    block_argmax(bv, bi, sv, si);  // synchronises: the histogram is complete
    const int greedy_idx = bi == 0x7fffffff ? 0 : bi;
    const float m = bv / temp;  // max of logits / T (division is monotone for T > 0)
    if (!(temp > 0.0f) || k == 1 || !isfinite(m)) {
      if (tid == 0) out[r] = greedy_idx;
      continue;
    }

    // Top-k: threshold key thr_k such that the kept set {key >= thr_k} holds the k largest.
    unsigned int thr_k = 0;
    if (want_k) {
      for (int s = 24; s >= 0; s -= 8) {
        if (s != 24) {
          __syncthreads();
          for (int b = tid; b < NBINS; b += blockDim.x) hc[b] = 0;
          __syncthreads();
          const unsigned int prefix = st.prefix;
          BinCache cache;
          for_row(row, vocab, vec, [&](float v, int) {
            if (isnan(v)) return;
            const unsigned int key = fkey(v);
            if ((key >> (s + 8)) == prefix) cache.add((key >> s) & 255u, 0, hc, hm, false);
          });
          cache.flush(hc, hm, false);
          __syncthreads();
        }
        if (warp == 0) {
          const unsigned int above = s == 24 ? 0u : st.count_above;
          // Level 1: if fewer than k non-NaN tokens, top-k keeps everything.
          unsigned int total = 0;
          if (s == 24) {
#pragma unroll
            for (int j = 0; j < 8; ++j) total += hc[8 * lane + j];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
          }
          if (s == 24 && total <= (unsigned int)k) {
            if (lane == 0) {
              st.threshold = 0;
              st.done = 1;
            }
          } else {
            int b;
            unsigned int before, own;
            warp_pick_bin<unsigned int>(hc, above, (unsigned int)k, b, before, own);
            if (lane == 0) {
              const unsigned int prefix = ((s == 24 ? 0u : st.prefix) << 8) | (unsigned int)b;
              st.prefix = prefix;
              st.count_above = before;
              // Whole bin needed, or last level: the threshold is the bin's lowest key.
              st.done = (before + own == (unsigned int)k) || s == 0;
              st.threshold = prefix << s;
            }
          }
        }
        __syncthreads();
        if (st.done) break;
      }
      thr_k = st.threshold;
    }

    // Top-p: threshold key thr_p over the top-k set, by radix selection on mass.
    unsigned int thr = thr_k;
    if (p < 1.0f) {
      for (int s = 24; s >= 0; s -= 8) {
        __syncthreads();
        for (int b = tid; b < NBINS; b += blockDim.x) {
          hc[b] = 0;
          hm[b] = 0;
        }
        __syncthreads();
        const unsigned int prefix = s == 24 ? 0u : st.prefix;
        BinCache cache;
        for_row(row, vocab, vec, [&](float v, int) {
          if (isnan(v)) return;
          const unsigned int key = fkey(v);
          if (key < thr_k) return;
          if (s != 24 && (key >> (s + 8)) != prefix) return;
          const float w = expf(v / temp - m);
          cache.add((key >> s) & 255u, __float2ull_rn(w * MASS_ONE), hc, hm, true);
        });
        cache.flush(hc, hm, true);
        __syncthreads();
        if (warp == 0) {
          unsigned long long above, target;
          if (s == 24) {
            unsigned long long tot = 0;
#pragma unroll
            for (int j = 0; j < 8; ++j) tot += hm[8 * lane + j];
            tot = warp_sum(tot);
            // Mass to reach: ceil(p * total), at least one unit (so p <= 0 keeps the top token).
            double want = ceil((double)p * (double)tot);
            target = want < 1.0 ? 1ull : (want >= (double)tot ? tot : (unsigned long long)want);
            above = 0;
          } else {
            target = st.target;
            above = st.mass_above;
          }
          int b;
          unsigned long long before, own;
          warp_pick_bin<unsigned long long>(hm, above, target, b, before, own);
          const unsigned int own_count = hc[b];
          if (lane == 0) {
            const unsigned int np = (prefix << 8) | (unsigned int)b;
            st.prefix = np;
            st.mass_above = before;
            st.target = target;
            st.done = own_count <= 1 || s == 0;
            st.threshold = np << s;
          }
        }
        __syncthreads();
        if (st.done) break;
      }
      thr = max(thr_k, st.threshold);
    }

    // Inverse CDF. Warp w owns a contiguous segment of 128-element units; segment masses are
    // exact integers, so the scan below finds the same total.
    const int n_units = (vocab + 127) >> 7;
    const int upw = (n_units + nwarps - 1) / nwarps;
    const int u0 = warp * upw, u1 = min(n_units, u0 + upw);
    auto weight_of = [&](float x) -> unsigned long long {
      const bool kept = !isnan(x) && fkey(x) >= thr;
      return kept ? __float2ull_rn(expf(x / temp - m) * MASS_ONE) : 0ull;
    };
    auto weights = [&](int idx, unsigned long long (&wf)[4]) {
      float v[4];
      load4(row, idx, vocab, vec, v);
#pragma unroll
      for (int e = 0; e < 4; ++e) wf[e] = weight_of(v[e]);
    };
    {
      unsigned long long acc = 0;
      int un = u0;
      for (; un + 3 < u1; un += 4) {  // four loads in flight
        float v[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) load4(row, (un + j) * 128 + lane * 4, vocab, vec, v[j]);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc += weight_of(v[j][e]);
      }
      for (; un < u1; ++un) {
        unsigned long long wf[4];
        weights(un * 128 + lane * 4, wf);
        acc += wf[0] + wf[1] + wf[2] + wf[3];
      }
      acc = warp_sum(acc);
      if (lane == 0) seg[warp] = acc;
    }
    __syncthreads();
    if (warp == 0) {
      const unsigned long long mine = lane < nwarps ? seg[lane] : 0ull;
      const unsigned long long incl = warp_incl_scan(mine);
      const unsigned long long total = __shfl_sync(0xffffffffu, incl, 31);
      unsigned long long t = (unsigned long long)((double)u * (double)total);
      if (t >= total) t = total - 1;  // total >= 2^40: the top token is always kept
      const unsigned int hit = __ballot_sync(0xffffffffu, incl > t);
      const int w = hit ? __ffs(hit) - 1 : 0;
      if (lane == w) {
        st.pick_warp = w;
        st.pick_base = incl - mine;
        st.pick_t = t;
      }
    }
    __syncthreads();
    if (warp == st.pick_warp) {
      unsigned long long base = st.pick_base;
      const unsigned long long t = st.pick_t;
      int pick = greedy_idx;  // unreachable fallback: a kept token
      for (int un = u0; un < u1; ++un) {
        unsigned long long wf[4];
        weights(un * 128 + lane * 4, wf);
        const unsigned long long mine = wf[0] + wf[1] + wf[2] + wf[3];
        const unsigned long long incl = warp_incl_scan(mine);
        const unsigned long long tot = __shfl_sync(0xffffffffu, incl, 31);
        if (base + tot > t) {
          const unsigned int hit = __ballot_sync(0xffffffffu, base + incl > t);
          const int src = __ffs(hit) - 1;
          int cand = -1;
          unsigned long long c = base + incl - mine;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            c += wf[e];
            if (cand < 0 && c > t) cand = un * 128 + lane * 4 + e;
          }
          cand = __shfl_sync(0xffffffffu, cand, src);
          if (cand >= 0) pick = cand;
          break;
        }
        base += tot;
      }
      if (lane == 0) out[r] = pick;
    }
  }
}

#include "common.cuh"

// Flash-decoding attention (one query row per sequence) on tensor cores, see kernels/README.md.
//
// attn_decode_partial_hd{64,128}: grid (n_kv, n_rows, max_splits), block DEC_THREADS (128 =
// 4 warps), dynamic shared memory DEC_SMEM = 98304 bytes (over 48 KB: the host raises
// cudaFuncAttributeMaxDynamicSharedMemorySize; two CTAs fit on an SM). One CTA handles one (KV
// head, row i of rows_list, split) for the whole GQA group of G = n_heads / n_kv query heads: it
// streams the split's keys [split * split_tokens, min(len, (split + 1) * split_tokens)) of that
// KV head through a DEC_STAGES-deep cp.async ring of K/V tiles (DEC_TILE_T keys each, rows of
// hd bf16 stored as 16-byte chunks with chunk' = chunk ^ (row & 7), so ldmatrix is conflict
// free), so every key/value byte is read from HBM once for all G query heads.
//
// The query is read from q[rows_list[i], h * hd ..] (q is the full [rows, n_heads * hd] f32
// activation, like `out`).
//
// Math on tensor cores (mma.sync m16n8k16, bf16 inputs, f32 accumulation). Query heads are
// taken in chunks of 8 (one round over the split per chunk; one round unless G > 8). The 16
// rows of the A operand hold the chunk's 8 heads twice: row g = bf16(q_g) ("hi"), row g + 8 =
// bf16(q_g - hi) ("lo"), so S[g] = C[g] + C[g + 8] carries ~16 mantissa bits of q; likewise
// the probabilities P are split hi/lo into rows g, g + 8 of the A operand of O += P V, and
// O[g] = C[g] + C[g + 8]. With the fragment layout (g = lane / 4, t = lane % 4)
//   A a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8, 2t+8..)
//   C c0,c1:(g, 2t..2t+1) c2,c3:(g+8, 2t..2t+1)
// a lane holds both halves of its head g, so the hi + lo sums are lane-local. Each warp owns
// DEC_KPW keys of every tile (its own online-softmax state; rows of a head are spread over the
// 4 lanes of a quad: max by 2 shuffles); warps are merged through shared memory at the end.
//
// Host split rule this kernel was tuned with (H200, Llama-3-8B layer): aim at one wave of
// 2 CTAs per SM, T = 2 * SMs: per = max(1, T / (n_kv * n_rows)) splits for an average row,
// split_tokens = max(256, round_up(ceil(mean_len / per), 64)), max_splits = ceil(max_len / split).
// Measured again with the fused kernel (H200): one CTA per SM (T = SMs) was 0.7-1.1 us faster
// at 32K batch 1-8 and 128K batch 2, 1.5-3 us slower at 128K batch 4-8 (see the report).
//
// attn_decode_fused_hd{64,128}: the same CTAs, plus the merge: the last CTA of each (row, KV
// head) to finish (per-(row, KV head) counter, threadfence + atomicAdd) merges that group's
// splits from o_part / lse_part (through L2, staged in the idle cp.async ring) into out /
// lse_out and resets its counter; rows with one split write out directly. One launch per step
// instead of two; attn_decode_merge is then not launched.
//
// Both kernels execute griddepcontrol.wait after reading the step tables (a no-op unless the
// host launches them with programmatic stream serialization, which then overlaps their start
// with the previous kernel's tail).
// After the main loop each CTA executes griddepcontrol.launch_dependents, so a merge launched
// with programmatic stream serialization can be scheduled early (see attn_decode_merge).
// DEC_PDL_EARLY (experiment, off): trigger at the CTA's start instead.

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#ifndef DEC_NW
#define DEC_NW 4                 // warps per CTA
#endif
#define DEC_THREADS (DEC_NW * 32)
#ifndef DEC_STAGES
#define DEC_STAGES 3             // cp.async ring depth
#endif
#define DEC_HC 8                 // query heads per round (rows g and g + 8 of the mma A operand)
#define DEC_STAGE_BYTES (DEC_NW * 8192)  // K + V bytes of one tile: 16 keys per warp at hd 128, 32 at hd 64
#define DEC_SMEM (DEC_STAGES * DEC_STAGE_BYTES)  // dynamic shared memory: 96 KB

namespace dec {

using namespace tc;
// Split (x0, x1) into bf16x2 hi = bf16(x) and lo = bf16(x - hi).
__device__ __forceinline__ void split_bf16(float x0, float x1, unsigned& hi, unsigned& lo) {
  hi = pack_bf16(x0, x1);
  const float h0 = __uint_as_float(hi << 16), h1 = __uint_as_float(hi & 0xffff0000u);
  lo = pack_bf16(x0 - h0, x1 - h1);
}
// Byte offset of 16-byte chunk `ch` of row `row` in a swizzled tile with HD-element rows.
template <int HD>
__device__ __forceinline__ unsigned swz(int row, int ch) {
  return (unsigned)(row * (HD * 2) + ((ch ^ (row & 7)) << 4));
}

// FUSED: the attn_decode_fused_* entry points (the merge is done by the last CTA of each (row,
// KV head), see there); otherwise attn_decode_partial_* (out, lse_out and counters unused).
// Wave mode (attn_wave_fused_*): each (row i, KV head) unit attends to its own list of token
// positions instead of [0, len): list[unit * list_cap ..] with count[unit] entries (unit = i *
// n_kv + kvh); its split size follows from its count and max_splits; the final output is merged
// by log-sum-exp with the unit's estimation zone (est_out [unit][G][HD], est_lse [unit][G]).
struct WaveExec {
  const WaveUnit* units;  // the step's units of this layer (their tiers: see WAVE_HOST_ENTRY)
  const int* list;
  const int* count;
  int list_cap;
  const float* est_out;
  const float* est_lse;
};

// Combines a normalised exact output o (log-sum-exp lse) with the estimate oe (lse le).
__device__ __forceinline__ float merge_est(float o, float lse, float oe, float le) {
  const float M = fmaxf(lse, le);
  if (M == -INFINITY) return 0.f;
  const float a = __expf(lse - M), b = __expf(le - M);
  return (a * o + b * oe) / (a + b);
}

template <int HD, bool FUSED, bool WAVE>
__device__ __forceinline__ void decode_partial(const float* __restrict__ q, const SeqDesc* __restrict__ seqs,
                                               const int* __restrict__ row_seq, const int* __restrict__ rows_list,
                                               int layer, int n_heads, int n_kv, int split_tokens, int max_splits,
                                               float scale, float* __restrict__ o_part, float* __restrict__ lse_part,
                                               float* __restrict__ out, float* __restrict__ lse_out,
                                               int* __restrict__ counters, const WaveExec wx) {
  constexpr int KT = HD / 16;                        // k16 steps over the head dim (Q K^T)
  constexpr int DT = HD / 8;                         // n8 tiles over the head dim (O)
  constexpr int TILE_BYTES = DEC_STAGE_BYTES / 2;    // K (or V) bytes of a tile
  constexpr int TILE_T = TILE_BYTES / (HD * 2);      // keys per tile
  constexpr int KPW = TILE_T / DEC_NW;               // keys per warp per tile (16 or 32)
  constexpr int NT = KPW / 8;                        // n8 key tiles per warp per tile
  constexpr int CPR = HD / 8;                        // 16-byte chunks per key row
  constexpr float LOG2E = 1.4426950408889634f;
  constexpr float LN2 = 0.6931471805599453f;
  static_assert(KPW % 16 == 0, "a warp needs whole k16 steps of keys");

  extern __shared__ __align__(128) unsigned char smem[];  // DEC_SMEM bytes
  const unsigned sbase = smem_u32(smem);

  const int kvh = blockIdx.x, i = blockIdx.y, split = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int G = n_heads / n_kv;

  const int row = rows_list[i];
  const SeqDesc sd = seqs[row_seq[row]];
  const int unit = i * n_kv + kvh;
  const int* list = nullptr;
  int len;
  if constexpr (WAVE) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The token lists and counts come from the previous kernel.
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    len = min(wx.count[unit], wx.list_cap);
    list = wx.list + (size_t)unit * wx.list_cap;
    split_tokens = max(64, (((len + max_splits - 1) / max_splits) + 63) & ~63);
  } else {
    len = sd.start_pos + (row - sd.row) + 1;
  }
  const int begin = split * split_tokens;
  const int end = min(len, begin + split_tokens);
  // Non-empty splits of this row (the host sizes max_splits for the longest row).
  const int nv = min(max_splits, (len + split_tokens - 1) / split_tokens);
  if (FUSED && begin >= end) return;  // nothing to write: the merge reads splits < nv only

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Before the wait: hint the first tiles' keys and values into L2, so that their HBM latency
  // passes while the previous kernel finishes (a launch with programmatic serialization starts
  // this CTA early). A prefetch into L2, the point of coherence, never reads stale data, even for
  // the newest key that the previous kernel may still be writing.
  if (!WAVE && begin < end) {
    const bf16* kp = seq_k(sd, layer, n_kv, kvh, HD) + (size_t)begin * HD;
    const bf16* vp = seq_v(sd, layer, n_kv, kvh, HD) + (size_t)begin * HD;
    const int lines = (min(end - begin, (DEC_STAGES - 1) * TILE_T) * HD * 2 + 127) / 128;
    for (int c = tid; c < lines; c += DEC_THREADS) {
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(reinterpret_cast<const char*>(kp) + c * 128));
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(reinterpret_cast<const char*>(vp) + c * 128));
    }
  }
  // Programmatic dependent launch: everything above reads only the step tables; q, the KV cache
  // and every output may belong to the previous kernel (no-op without the launch attribute).
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif

  // o_part / lse_part index of head (kvh * G + gh) of row i, this split.
  auto part_idx = [&](int gh) -> size_t {
    return ((size_t)i * n_heads + (size_t)kvh * G + gh) * max_splits + split;
  };

  if (begin >= end) {  // split past the row's length: empty
    for (int idx = tid; idx < G * HD; idx += DEC_THREADS) {
      int gh = idx / HD, d = idx % HD;
      o_part[part_idx(gh) * HD + d] = 0.f;
      if (d == 0) lse_part[part_idx(gh)] = -INFINITY;
    }
    return;
  }

#if defined(DEC_PDL_EARLY) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  const bf16* kbase = seq_k(sd, layer, n_kv, kvh, HD);
  const bf16* vbase = seq_v(sd, layer, n_kv, kvh, HD);
  // Wave units with a host tier: list entries may name wave buffer rows or host arena rows.
  const bf16 *hk = nullptr, *hv = nullptr, *ck = nullptr, *cv = nullptr;
  if constexpr (WAVE) {
    const unsigned long long tp = wx.units[unit].tier;
    if (tp != 0ull) {
      const WaveTier* T = reinterpret_cast<const WaveTier*>(tp);
      hk = reinterpret_cast<const bf16*>(T->host_k);
      hv = reinterpret_cast<const bf16*>(T->host_v);
      ck = reinterpret_cast<const bf16*>(T->cache_k);
      cv = reinterpret_cast<const bf16*>(T->cache_v);
    }
  }
  const int n_tiles = (end - begin + TILE_T - 1) / TILE_T;
  const float qscale = scale * LOG2E;

  // Wave mode: the list entries of the next tile to issue, loaded one tile ahead (when tile t is
  // issued, t + 1's entries are requested), so that issuing a tile never waits on its list.
  constexpr int CPT = TILE_T * CPR / DEC_THREADS;  // 16-byte copies per thread per tile
  int ent[CPT];
  auto load_ent = [&](int t) {
    if constexpr (WAVE) {
      const int tb = begin + t * TILE_T;
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        const int tok = (tid + k * DEC_THREADS) / CPR;
        ent[k] = (t < n_tiles && tb + tok < end) ? __ldg(list + tb + tok) : 0;
      }
    }
  };
  // Issue the cp.async copies of tile t (tokens begin + t*TILE_T ..) into stage t % STAGES.
  // Tiles are issued in order, each round of query heads from 0 (after load_ent(0)).
  auto issue_tile = [&](int t) {
    if (t < n_tiles) {
      const unsigned ks = sbase + (unsigned)(t % DEC_STAGES) * DEC_STAGE_BYTES;
      const unsigned vs = ks + TILE_BYTES;
      const int tb = begin + t * TILE_T;
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        const int c = tid + k * DEC_THREADS;
        const int tok = c / CPR, ch = c % CPR;
        const bool ok = tb + tok < end;
        const bf16* kp = kbase;
        const bf16* vp = vbase;
        if (ok) {
          if constexpr (WAVE) {
            const int e = ent[k];
            if (e < 0) {
              kp = ck + (size_t)(-e - 1) * HD;
              vp = cv + (size_t)(-e - 1) * HD;
            } else if (e >= WAVE_HOST_ENTRY) {
              kp = hk + (size_t)(e - WAVE_HOST_ENTRY) * HD;
              vp = hv + (size_t)(e - WAVE_HOST_ENTRY) * HD;
            } else {
              kp = kbase + (size_t)e * HD;
              vp = vbase + (size_t)e * HD;
            }
          } else {
            kp = kbase + (size_t)(tb + tok) * HD;
            vp = vbase + (size_t)(tb + tok) * HD;
          }
          kp += ch * 8;
          vp += ch * 8;
        }
        const unsigned so = swz<HD>(tok, ch);
        cp_async16(ks + so, kp, ok);
        cp_async16(vs + so, vp, ok);
      }
    }
    cp_async_commit();
    load_ent(t + 1);
  };

  for (int cbase = 0; cbase < G; cbase += DEC_HC) {
    // Prologue first (the copies fly while the query is read): STAGES-1 tiles in flight.
    load_ent(0);
#pragma unroll
    for (int t = 0; t < DEC_STAGES - 1; ++t) issue_tile(t);
    // Query fragments: head cbase + g (zero past G), scaled by scale * log2e, split hi / lo.
    unsigned qa[KT][4];
    {
      const int gh = cbase + g;
      const bool ok = gh < G;
      const float* qr = q + ((size_t)row * n_heads + (size_t)kvh * G + (ok ? gh : 0)) * HD + 2 * t4;
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        float2 x0 = ok ? *reinterpret_cast<const float2*>(qr + kk * 16) : make_float2(0.f, 0.f);
        float2 x1 = ok ? *reinterpret_cast<const float2*>(qr + kk * 16 + 8) : make_float2(0.f, 0.f);
        split_bf16(x0.x * qscale, x0.y * qscale, qa[kk][0], qa[kk][1]);
        split_bf16(x1.x * qscale, x1.y * qscale, qa[kk][2], qa[kk][3]);
      }
    }
    float o[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float m = -INFINITY;  // running max (log2 units) of head g, equal over the quad
    float l = 0.f;        // this lane's partial sum

    for (int t = 0; t < n_tiles; ++t) {
      cp_async_wait<DEC_STAGES - 2>();  // tile t has landed (for this thread's copies)
      __syncthreads();                  // ... for everyone's; and tile t-1's stage is free
      issue_tile(t + DEC_STAGES - 1);

      const unsigned kt = sbase + (unsigned)(t % DEC_STAGES) * DEC_STAGE_BYTES;
      const unsigned vt = kt + TILE_BYTES;
      const int r0 = warp * KPW;                 // first tile row (key) of this warp
      const int kb = begin + t * TILE_T + r0;    // its token index
      if (kb < end) {
        // ---- S = Q K^T (16 x KPW per warp) ----
        float s[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
          for (int np = 0; np < NT / 2; ++np) {
            unsigned b0, b1, b2, b3;
            ldsm_x4(kt + swz<HD>(r0 + np * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)), b0,
                    b1, b2, b3);
            mma16816(s[2 * np], qa[kk], b0, b1);
            mma16816(s[2 * np + 1], qa[kk], b2, b3);
          }
        }
        // scores of head g: sc[n][e] = hi + lo rows, masked past the end
        float sc[NT][2];
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float v = s[n][e] + s[n][e + 2];
            if (kb + n * 8 + 2 * t4 + e >= end) v = -INFINITY;
            sc[n][e] = v;
            mx = fmaxf(mx, v);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m, mx);
        const float ms = (mn == -INFINITY) ? 0.f : mn;
        const float corr = ex2(m - ms);
        m = mn;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            sc[n][e] = ex2(sc[n][e] - ms);
            sum += sc[n][e];
          }
        l = l * corr + sum;
        if (__any_sync(0xffffffffu, corr != 1.f)) {
#pragma unroll
          for (int d = 0; d < DT; ++d) {
            o[d][0] *= corr;
            o[d][1] *= corr;
            o[d][2] *= corr;
            o[d][3] *= corr;
          }
        }
        // ---- O += P V (P hi in rows g, lo in rows g + 8) ----
#pragma unroll
        for (int kk = 0; kk < KPW / 16; ++kk) {
          unsigned a[4];
          split_bf16(sc[2 * kk][0], sc[2 * kk][1], a[0], a[1]);
          split_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1], a[2], a[3]);
#pragma unroll
          for (int dp = 0; dp < DT / 2; ++dp) {
            unsigned b0, b1, b2, b3;
            ldsm_x4_t(vt + swz<HD>(r0 + kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), dp * 2 + (lane >> 4)), b0,
                      b1, b2, b3);
            mma16816(o[2 * dp], a, b0, b1);
            mma16816(o[2 * dp + 1], a, b2, b3);
          }
        }
      }
    }
    cp_async_wait<0>();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // The merge (if launched as a programmatic dependent) may start being scheduled now; it
    // still waits for this whole grid to complete before reading o_part / lse_part.
#ifndef DEC_PDL_EARLY
    if (cbase + DEC_HC >= G) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
#endif
    __syncthreads();  // all tiles consumed: the ring becomes the reduction buffer

    // Per warp: head g's sum over its quad; O[g][d] = hi row + lo row.
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    float* red_acc = reinterpret_cast<float*>(smem);         // [warp][DEC_HC][HD]
    float* red_ml = red_acc + DEC_NW * DEC_HC * HD;          // [warp][DEC_HC][2]
    {
      float* dst = red_acc + (warp * DEC_HC + g) * HD + 2 * t4;
#pragma unroll
      for (int d = 0; d < DT; ++d)
        *reinterpret_cast<float2*>(dst + d * 8) = make_float2(o[d][0] + o[d][2], o[d][1] + o[d][3]);
      if (t4 == 0) {
        red_ml[(warp * DEC_HC + g) * 2] = m;
        red_ml[(warp * DEC_HC + g) * 2 + 1] = l;
      }
    }
    __syncthreads();
    // Combine the warps of each head and write the normalised partial output and its LSE.
    const int nh = min(DEC_HC, G - cbase);
    for (int idx = tid; idx < nh * HD; idx += DEC_THREADS) {
      const int hh = idx / HD, d = idx % HD;
      float M = -INFINITY;
#pragma unroll
      for (int w = 0; w < DEC_NW; ++w) M = fmaxf(M, red_ml[(w * DEC_HC + hh) * 2]);
      const float Ms = (M == -INFINITY) ? 0.f : M;
      float L = 0.f, O = 0.f;
#pragma unroll
      for (int w = 0; w < DEC_NW; ++w) {
        const float wt = ex2(red_ml[(w * DEC_HC + hh) * 2] - Ms);
        L += red_ml[(w * DEC_HC + hh) * 2 + 1] * wt;
        O += red_acc[(w * DEC_HC + hh) * HD + d] * wt;
      }
      const float ov = (L > 0.f) ? O / L : 0.f;
      const float lv = (L > 0.f) ? (M + __log2f(L)) * LN2 : -INFINITY;
      if (FUSED && nv == 1) {  // the row's only split: final output, no merge
        const int h = kvh * G + cbase + hh;
        if constexpr (WAVE) {
          const size_t e = (size_t)unit * G + cbase + hh;
          out[((size_t)row * n_heads + h) * HD + d] = merge_est(ov, lv, wx.est_out[e * HD + d], wx.est_lse[e]);
        } else {
          out[((size_t)row * n_heads + h) * HD + d] = ov;
        }
        if (d == 0 && lse_out != nullptr) lse_out[(size_t)i * n_heads + h] = lv;
      } else {
        const size_t pi = part_idx(cbase + hh);
        o_part[pi * HD + d] = ov;
        if (d == 0) lse_part[pi] = lv;
      }
    }
    __syncthreads();  // the buffer is reused by the next round's ring
  }
  if (!FUSED || nv == 1) return;

  // ---- Fused merge: the last CTA of this (row, KV head) to finish merges its nv splits ----
  // Classic threadfence reduction: every CTA makes its partial writes visible device-wide, then
  // counts itself in; the CTA that sees nv - 1 knows all partials are in L2, merges them (reads
  // through L2 only: cp.async.cg / ld.cg) and resets the counter for the next launch.
  __shared__ int s_last;
  __threadfence();
  __syncthreads();
  int* ctr = counters + (size_t)i * n_kv + kvh;
  if (tid == 0) s_last = (atomicAdd(ctr, 1) == nv - 1);
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (tid == 0) *ctr = 0;

  constexpr int C4 = HD / 4;                           // float4 columns of a head row
  constexpr int HG = DEC_THREADS / C4;                 // heads merged at once (one float4 per thread)
  constexpr int LSE_BYTES = 4096;
  constexpr int MCS = (DEC_SMEM - LSE_BYTES) / (HG * HD * 4);  // splits per shared-memory chunk
  static_assert(HG * MCS * 4 <= LSE_BYTES, "lse chunk fits");
  float* mlse = reinterpret_cast<float*>(smem + DEC_SMEM - LSE_BYTES);  // [HG][MCS]
  const float4* mbuf = reinterpret_cast<const float4*>(smem);           // [HG][MCS][C4]
  const int hh = tid / C4, c = tid % C4;
  for (int hg0 = 0; hg0 < G; hg0 += HG) {
    const int nh = min(HG, G - hg0);
    float M = -INFINITY, L = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < nv; s0 += MCS) {
      const int cs = min(MCS, nv - s0);
      const int per_head = cs * C4;  // 16-byte pieces of one head (its splits are contiguous)
      for (int p = tid; p < nh * per_head; p += DEC_THREADS) {
        const int h2 = p / per_head, r = p - h2 * per_head;
        cp_async16(sbase + (unsigned)((h2 * MCS * C4 + r) * 16), o_part + (part_idx(hg0 + h2) - split + s0) * HD + r * 4,
                   true);
      }
      cp_async_commit();
      for (int p = tid; p < nh * cs; p += DEC_THREADS) {
        const int h2 = p / cs, s = p - h2 * cs;
        mlse[h2 * MCS + s] = __ldcg(lse_part + part_idx(hg0 + h2) - split + s0 + s);
      }
      cp_async_wait<0>();
      __syncthreads();
      if (hh < nh) {
        float cm = M;
        for (int s = 0; s < cs; ++s) cm = fmaxf(cm, mlse[hh * MCS + s]);
        const float ms = (cm == -INFINITY) ? 0.f : cm;
        const float cr = __expf(M - ms);
        L *= cr;
        acc.x *= cr; acc.y *= cr; acc.z *= cr; acc.w *= cr;
#pragma unroll 4
        for (int s = 0; s < cs; ++s) {
          const float w = __expf(mlse[hh * MCS + s] - ms);
          const float4 v = mbuf[(hh * MCS + s) * C4 + c];
          L += w;
          acc.x = fmaf(w, v.x, acc.x); acc.y = fmaf(w, v.y, acc.y);
          acc.z = fmaf(w, v.z, acc.z); acc.w = fmaf(w, v.w, acc.w);
        }
        M = cm;
      }
      __syncthreads();  // the chunk buffers are refilled next
    }
    if (hh < nh) {
      const int h = kvh * G + hg0 + hh;
      if constexpr (WAVE) {
        // Fold the estimate in as one more term of the merge.
        const size_t e = (size_t)unit * G + hg0 + hh;
        const float le = wx.est_lse[e];
        const float cm = fmaxf(M, le);
        if (cm != -INFINITY) {
          const float cr = __expf(M - cm), we = __expf(le - cm);
          const float4 oe = reinterpret_cast<const float4*>(wx.est_out + e * HD)[c];
          L = L * cr + we;
          acc.x = fmaf(we, oe.x, acc.x * cr); acc.y = fmaf(we, oe.y, acc.y * cr);
          acc.z = fmaf(we, oe.z, acc.z * cr); acc.w = fmaf(we, oe.w, acc.w * cr);
          M = cm;
        }
      }
      const float inv = (L > 0.f) ? 1.f / L : 0.f;
      reinterpret_cast<float4*>(out + ((size_t)row * n_heads + h) * HD)[c] =
          make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
      if (c == 0 && lse_out != nullptr) lse_out[(size_t)i * n_heads + h] = (L > 0.f) ? M + __logf(L) : -INFINITY;
    }
  }
}

}  // namespace dec

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    attn_decode_partial_hd64(const float* q, const SeqDesc* seqs, const int* row_seq, const int* rows_list, int layer,
                             int n_heads, int n_kv, int split_tokens, int max_splits, float scale, float* o_part,
                             float* lse_part) {
  dec::decode_partial<64, false, false>(q, seqs, row_seq, rows_list, layer, n_heads, n_kv, split_tokens, max_splits, scale,
                                 o_part, lse_part, nullptr, nullptr, nullptr, dec::WaveExec{});
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    attn_decode_partial_hd128(const float* q, const SeqDesc* seqs, const int* row_seq, const int* rows_list, int layer,
                              int n_heads, int n_kv, int split_tokens, int max_splits, float scale, float* o_part,
                              float* lse_part) {
  dec::decode_partial<128, false, false>(q, seqs, row_seq, rows_list, layer, n_heads, n_kv, split_tokens, max_splits, scale,
                                  o_part, lse_part, nullptr, nullptr, nullptr, dec::WaveExec{});
}

// Single-kernel flash-decoding: the partial kernel's grid, block and shared memory, plus the
// merge. Arguments as attn_decode_partial_*, then out / lse_out as attn_decode_merge (out
// [rows, n_heads * hd] written at rows_list[i]; lse_out [n_rows, n_heads] may be null) and
// counters: n_rows * n_kv ints, zero before the first launch; every launch leaves them zero
// (the last CTA of each (row, KV head) resets its counter), so one zeroed buffer serves every
// launch that runs after the previous one completed (same stream or graph order; launches that
// may overlap need separate buffers). A row with a single non-empty split writes `out`
// directly; otherwise its CTAs write o_part / lse_part as the partial kernel does (empty splits
// write nothing) and the last one to finish merges them.
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    attn_decode_fused_hd64(const float* q, const SeqDesc* seqs, const int* row_seq, const int* rows_list, int layer,
                           int n_heads, int n_kv, int split_tokens, int max_splits, float scale, float* o_part,
                           float* lse_part, float* out, float* lse_out, int* counters) {
  dec::decode_partial<64, true, false>(q, seqs, row_seq, rows_list, layer, n_heads, n_kv, split_tokens, max_splits, scale,
                                o_part, lse_part, out, lse_out, counters, dec::WaveExec{});
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    attn_decode_fused_hd128(const float* q, const SeqDesc* seqs, const int* row_seq, const int* rows_list, int layer,
                            int n_heads, int n_kv, int split_tokens, int max_splits, float scale, float* o_part,
                            float* lse_part, float* out, float* lse_out, int* counters) {
  dec::decode_partial<128, true, false>(q, seqs, row_seq, rows_list, layer, n_heads, n_kv, split_tokens, max_splits, scale,
                                 o_part, lse_part, out, lse_out, counters, dec::WaveExec{});
}
// Wave flash-decoding: the fused kernel over each unit's token list (see dec::WaveExec), its
// split size derived on the device from the list's length (at most max_splits splits), merged
// with the unit's estimation zone. Launched after the kernel that writes the lists.
extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    attn_wave_fused_hd64(const float* q, const SeqDesc* seqs, const int* row_seq, const int* rows_list, int layer,
                         int n_heads, int n_kv, int max_splits, float scale, float* o_part, float* lse_part,
                         float* out, int* counters, const int* list, const int* count, int list_cap,
                         const float* est_out, const float* est_lse, const WaveUnit* units) {
  dec::decode_partial<64, true, true>(q, seqs, row_seq, rows_list, layer, n_heads, n_kv, 64, max_splits, scale, o_part,
                                      lse_part, out, nullptr, counters,
                                      dec::WaveExec{units, list, count, list_cap, est_out, est_lse});
}

extern "C" __global__ void __launch_bounds__(DEC_THREADS)
    attn_wave_fused_hd128(const float* q, const SeqDesc* seqs, const int* row_seq, const int* rows_list, int layer,
                          int n_heads, int n_kv, int max_splits, float scale, float* o_part, float* lse_part,
                          float* out, int* counters, const int* list, const int* count, int list_cap,
                          const float* est_out, const float* est_lse, const WaveUnit* units) {
  dec::decode_partial<128, true, true>(q, seqs, row_seq, rows_list, layer, n_heads, n_kv, 64, max_splits, scale,
                                       o_part, lse_part, out, nullptr, counters,
                                       dec::WaveExec{units, list, count, list_cap, est_out, est_lse});
}

// Merge the splits of each (row i, head h): grid (n_heads, n_rows), block MERGE_THREADS (256),
// no dynamic shared memory; head_dim a multiple of 4, at most 1024.
// out[rows_list[i], h*hd + d] = sum_s exp(lse_s - M) o_s[d] / sum_s exp(lse_s - M).
// Thread layout: VPS = hd / 4 threads cover one split's row with float4 loads; the block's
// SG = 256 / VPS groups of threads take splits sg, sg + SG, ... Each group keeps its own
// running max / sum / weighted row (every load of a pass is issued before any is used: one
// memory round trip for up to 4 * SG splits), and the groups are combined through shared memory.
// Programmatic dependent launch: when the host launches this kernel with programmatic stream
// serialization, it may start while attn_decode_partial_* finishes; griddepcontrol.wait blocks
// until that grid has completed and its writes are visible (without the attribute it returns
// at once).
#define MERGE_THREADS 256
extern "C" __global__ void __launch_bounds__(MERGE_THREADS)
    attn_decode_merge(const float* o_part, const float* lse_part, const int* rows_list, int n_rows, int n_heads,
                      int max_splits, int head_dim, float* out, float* lse_out) {
  __shared__ __align__(16) float part[MERGE_THREADS * 4];
  __shared__ float red_m[MERGE_THREADS], red_l[MERGE_THREADS];
  const int h = blockIdx.x, i = blockIdx.y;
  if (i >= n_rows || h >= n_heads) return;
  const int tid = threadIdx.x;
  const int vps = head_dim >> 2;        // threads per split row
  const int sgn = MERGE_THREADS / vps;  // split groups
  const int sg = tid / vps, c = tid % vps;
  const size_t base = ((size_t)i * n_heads + h) * max_splits;
  const int row = rows_list[i];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif

  float M = -INFINITY, L = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (sg < sgn) {
    for (int s0 = sg; s0 < max_splits; s0 += 4 * sgn) {
      float ls[4];
      float4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int s = s0 + u * sgn;
        if (s < max_splits) {
          ls[u] = lse_part[base + s];
          v[u] = reinterpret_cast<const float4*>(o_part + (base + s) * head_dim)[c];
        } else {
          ls[u] = -INFINITY;
          v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
      const float mx = fmaxf(fmaxf(M, fmaxf(ls[0], ls[1])), fmaxf(ls[2], ls[3]));
      const float ms = (mx == -INFINITY) ? 0.f : mx;
      const float cr = __expf(M - ms);
      L *= cr;
      acc.x *= cr; acc.y *= cr; acc.z *= cr; acc.w *= cr;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const float w = __expf(ls[u] - ms);
        L += w;
        acc.x = fmaf(w, v[u].x, acc.x); acc.y = fmaf(w, v[u].y, acc.y);
        acc.z = fmaf(w, v[u].z, acc.z); acc.w = fmaf(w, v[u].w, acc.w);
      }
      M = mx;
    }
    reinterpret_cast<float4*>(part)[tid] = acc;  // part[sg][head_dim]
    if (c == 0) {
      red_m[sg] = M;
      red_l[sg] = L;
    }
  }
  __syncthreads();
  float GM = -INFINITY;
  for (int k = 0; k < sgn; ++k) GM = fmaxf(GM, red_m[k]);
  const float Ms = (GM == -INFINITY) ? 0.f : GM;
  float GL = 0.f;
  for (int k = 0; k < sgn; ++k) GL += red_l[k] * __expf(red_m[k] - Ms);
  const float invL = (GL > 0.f) ? 1.f / GL : 0.f;
  float* dst = out + (size_t)row * n_heads * head_dim + (size_t)h * head_dim;
  for (int d = tid; d < head_dim; d += MERGE_THREADS) {
    float sum = 0.f;
    for (int k = 0; k < sgn; ++k) sum = fmaf(part[k * head_dim + d], __expf(red_m[k] - Ms), sum);
    dst[d] = sum * invL;
  }
  if (lse_out != nullptr && tid == 0) lse_out[(size_t)i * n_heads + h] = (GL > 0.f) ? GM + __logf(GL) : -INFINITY;
}

// Shared definitions of retrowave's CUDA kernels (see kernels/README.md for the contract).
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

// Rows of queries one prefill attention CTA handles. The host reads this value from this file.
#define PREFILL_BLOCK_M 64

// Shapes of the wave kernels (wave.cu). The host reads these values from here.
#define WAVE_CHUNK 256   // clusters per wave_logits CTA (its threads)
#define WAVE_MAX_G 16    // largest GQA group
#define SEL_THREADS 1024 // threads of a wave_select CTA
#define SEL_TOP 4096     // most clusters the adaptive retrieval budget may grow to (its sort)
#define EST_CHUNK 64     // estimation clusters per wave_estimate_partial CTA
#define EST_WARPS 4      // warps of a wave_estimate_partial CTA

// One sequence of a step: where its KV cache lives and which activation rows belong to it.
// Layer l, KV head h, token t is at base + ((l * n_kv + h) * cap + t) * head_dim.
struct SeqDesc {
  unsigned long long k_base;  // bf16* of the K cache (layer 0, head 0, token 0)
  unsigned long long v_base;  // bf16* of the V cache
  int cap;                    // tokens the cache can hold
  int start_pos;              // position of this step's first row
  int n_tokens;               // rows of this step (1 for decode)
  int row;                    // first activation row of the sequence
  // Positions [hole_start, hole_start + hole_len) are not in this cache (a wave index moved
  // them to host memory, see WaveTier): position p >= hole_start is at p - hole_len. 0: none.
  int hole_start;
  int hole_len;
};

// Where position `pos` of a sequence is in its cache (see SeqDesc::hole_start).
__device__ __forceinline__ int seq_slot(const SeqDesc& s, int pos) {
  return pos < s.hole_start ? pos : pos - s.hole_len;
}

// One unit of a wave step: one (decode row, KV head) of one layer with its index in device
// memory. Shared by the wave kernels (wave.cu) and wave flash-decoding (attention_decode.cu).
struct WaveUnit {
  unsigned long long centroids;  // const bf16* [n_clusters][hd]
  unsigned long long ln_sizes;   // const float* [n_clusters]: ln |C_i|, -inf for empty clusters
  unsigned long long means;      // const bf16* [n_clusters][hd]: value_sum / |C_i| (estimation)
  int n_clusters;
  int q_row;                     // activation row of the unit's query
  int retrieval;                 // clusters wanted in the retrieval zone
  int estimation;                // clusters wanted in the estimation zone
  // For wave_tokens (the exact part's token list); unused by the scoring kernels.
  unsigned long long offsets;    // const int* [n_clusters + 1]: CSR offsets of the members
  unsigned long long members;    // const int*: token positions, cluster after cluster
  int sink;                      // steady zone: positions [0, sink) and [indexed_end, n_tokens),
  int indexed_end;               // n_tokens from the unit's sequence descriptor (this step's
                                 // token included)
  int retrieval_cap;             // adaptive retrieval: grow `retrieval` (up to this many) until
  float retrieval_mass;          // the zone covers this share of the scores (0: fixed budget)
  int rank_by_size;              // 1: rank by the softmax of scale * q . c_i + ln |C_i| (the
                                 // clusters' estimated mass; WaveConfig::rank_by_size), 0: of
                                 // scale * q . c_i alone. The logits written stay without ln |C_i|.
  int union_ranking;             // 1: the retrieval zone is the union of each query head's best
                                 // clusters by its own logit (WaveConfig::union_ranking; see
                                 // wave_select), 0: the best by summed score
  unsigned long long tier;       // WaveTier* when the unit's indexed KV lives in host memory, or 0
};

// The host tier and wave buffer of one unit (one layer and KV head of a sequence) whose indexed
// tokens were moved out of the GPU's KV cache: their K and V in pinned host memory in cluster
// order (cluster c's members at [offsets[c], offsets[c + 1])), and a GPU block cache of
// `capacity` slots of `page` tokens run by the store's LRU policy (retrowave_store::policy; see
// wave_tokens). Token lists address it with three kinds of entries (see wave_entry).
struct WaveTier {
  unsigned long long host_k, host_v;    // bf16 [indexed tokens][hd], cluster order (mapped)
  unsigned long long cache_k, cache_v;  // bf16 [capacity * page][hd] (device)
  unsigned long long stamp;             // unsigned [n_clusters]: last use (0: not resident)
  unsigned long long slot_owner;        // int [capacity]: resident cluster, or -1 when free
  unsigned long long slot_page;         // int [capacity]: page of the owner held in the slot
  unsigned long long free_list;         // int [capacity]: scratch of wave_tokens
  unsigned long long jobs;              // int3 [capacity]: this step's fills (slot, token, count)
  unsigned long long state;             // unsigned [4]: used slots, next stamp, jobs, -
  unsigned long long stats;             // unsigned long long [4]: cumulative hit, admitted,
                                        // bypassed and evicted pages
  int capacity;
  int page;
  int host_clusters;                    // clusters [0, host_clusters) are in the host arena; later
                                        // ones (index updates) keep their tokens in the GPU cache
};

// Token-list entries of a wave step: e >= WAVE_HOST_ENTRY is token e - WAVE_HOST_ENTRY of the
// unit's host arena (a read over PCIe: a bypassed cluster), e < 0 is row -e - 1 of its wave
// buffer, anything else a slot of the sequence's GPU KV cache.
#define WAVE_HOST_ENTRY (1 << 30)

__device__ __forceinline__ const bf16* seq_k(const SeqDesc& s, int layer, int n_kv, int h, int head_dim) {
  return reinterpret_cast<const bf16*>(s.k_base) + ((size_t)(layer * n_kv + h) * s.cap) * head_dim;
}
__device__ __forceinline__ const bf16* seq_v(const SeqDesc& s, int layer, int n_kv, int h, int head_dim) {
  return reinterpret_cast<const bf16*>(s.v_base) + ((size_t)(layer * n_kv + h) * s.cap) * head_dim;
}

// Tensor-core and async-copy helpers shared by the attention kernels (sm_80+ instructions).
namespace tc {

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 16-byte async copy global -> shared; when !pred nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool pred) {
  int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
// C += A * B, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// Two floats -> packed bf16x2 (lo in the low half), round to nearest even.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

}  // namespace tc

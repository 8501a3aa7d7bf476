// Shared definitions of retrowave's CUDA kernels (see kernels/README.md for the contract).
#pragma once
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

// Rows of queries one prefill attention CTA handles. The host reads this value from this file.
#define PREFILL_BLOCK_M 64

// One sequence of a step: where its KV cache lives and which activation rows belong to it.
// Layer l, KV head h, token t is at base + ((l * n_kv + h) * cap + t) * head_dim.
struct SeqDesc {
  unsigned long long k_base;  // bf16* of the K cache (layer 0, head 0, token 0)
  unsigned long long v_base;  // bf16* of the V cache
  int cap;                    // tokens the cache can hold
  int start_pos;              // position of this step's first row
  int n_tokens;               // rows of this step (1 for decode)
  int row;                    // first activation row of the sequence
};

__device__ __forceinline__ const bf16* seq_k(const SeqDesc& s, int layer, int n_kv, int h, int head_dim) {
  return reinterpret_cast<const bf16*>(s.k_base) + ((size_t)(layer * n_kv + h) * s.cap) * head_dim;
}
__device__ __forceinline__ const bf16* seq_v(const SeqDesc& s, int layer, int n_kv, int h, int head_dim) {
  return reinterpret_cast<const bf16*>(s.v_base) + ((size_t)(layer * n_kv + h) * s.cap) * head_dim;
}

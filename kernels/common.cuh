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
};

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

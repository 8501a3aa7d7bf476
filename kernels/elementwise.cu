// Element-wise and row-wise kernels of the CUDA backend (see kernels/README.md for the contract).
//
// Every kernel takes its shapes as arguments and loops grid-stride, so any grid is correct; the
// launch shapes in the comments are what makes them fast. Vectorised (16-byte) paths are taken
// only when every pointer involved is 16-byte aligned and the row length allows it; otherwise a
// scalar path computes the same values. Arithmetic is written with the `__f*_rn` intrinsics where
// the CPU backend (crates/retrowave-cpu/src/ops.rs) rounds each operation separately, so that the
// compiler does not fuse a multiply and an add into an FMA that the CPU does not do.
#include "common.cuh"

namespace {

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

__device__ __forceinline__ long long grid_tid() {
  return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ long long grid_stride() {
  return (long long)gridDim.x * blockDim.x;
}

// 8 bf16 (one 16-byte word) to 8 floats.
__device__ __forceinline__ void bf16x8_to_f32(uint4 raw, float4& lo, float4& hi) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&raw);
  float2 a = __bfloat1622float2(p[0]);
  float2 b = __bfloat1622float2(p[1]);
  float2 c = __bfloat1622float2(p[2]);
  float2 d = __bfloat1622float2(p[3]);
  lo = make_float4(a.x, a.y, b.x, b.y);
  hi = make_float4(c.x, c.y, d.x, d.y);
}

// 8 floats to 8 bf16 (round to nearest even) in one 16-byte word.
__device__ __forceinline__ uint4 f32x8_to_bf16(float4 lo, float4 hi) {
  uint4 raw;
  __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(&raw);
  p[0] = __floats2bfloat162_rn(lo.x, lo.y);
  p[1] = __floats2bfloat162_rn(lo.z, lo.w);
  p[2] = __floats2bfloat162_rn(hi.x, hi.y);
  p[3] = __floats2bfloat162_rn(hi.z, hi.w);
  return raw;
}

// Sum over the block; blockDim.x is a power of two in 32..1024. Every thread gets the result.
// `scratch` holds 32 floats; the function synchronises before returning, and once more at entry
// so that it can be called repeatedly with the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? scratch[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}

// splitmix64 finaliser.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Element i of fill_uniform_bf16: the (i+1)-th output of splitmix64 seeded with `seed`, its top
// 24 bits as u in [0, 1), mapped to (2u - 1) * scale in [-scale, scale).
__device__ __forceinline__ float uniform_at(unsigned long long seed, long long i, float scale) {
  unsigned long long z = mix64(seed + 0x9E3779B97F4A7C15ull * (unsigned long long)(i + 1));
  float u = (float)(z >> 40) * (1.0f / 16777216.0f);
  return __fmul_rn(__fsub_rn(__fmul_rn(2.0f, u), 1.0f), scale);
}

__device__ __forceinline__ float silu_mul1(float g, float u) {
  // CPU: g / (1 + exp(-g)) * u
  return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}


// sin and cos of a double without the library's Payne-Hanek slow path (which needs a stack frame):
// Cody-Waite reduction by pi/2 with FMAs (three-part constant; accurate for |a| < 2^31, which
// covers every int position times an inverse frequency <= 1), then the fdlibm kernels on
// [-pi/4, pi/4]. Within about 1 ulp of the correctly rounded values, so that the float casts
// agree with the CPU backend's `(a.cos() as f32, a.sin() as f32)`.
__device__ __forceinline__ void sincos_rope(double a, double* s_out, double* c_out) {
  const double n = rint(a * 6.36619772367581382433e-01);  // 2/pi
  double r = fma(-n, 1.57079632679489655800e+00, a);        // pi/2 (high)
  r = fma(-n, 6.12323399573676603587e-17, r);               // pi/2 - high
  r = fma(-n, -1.49738490485916018065e-33, r);              // next term
  const double z = r * r, w = z * z;
  const double sr = 8.33333333332248946124e-03 + z * (-1.98412698298579493134e-04 + z * 2.75573137070700676789e-06) +
                    z * w * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10);
  const double s = r + (z * r) * (-1.66666666666666324348e-01 + z * sr);
  const double cr = z * (4.16666666666666019037e-02 + z * (-1.38888888888741095749e-03 + z * 2.48015872894767294178e-05)) +
                    w * w * (-2.75573143513906633035e-07 + z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11));
  const double hz = 0.5 * z, cw = 1.0 - hz;
  const double c = cw + (((1.0 - cw) - hz) + z * cr);
  const int q = (int)((long long)n & 3);
  *s_out = q == 0 ? s : q == 1 ? c : q == 2 ? -s : -c;
  *c_out = q == 0 ? c : q == 1 ? -s : q == 2 ? -c : s;
}

}  // namespace

// out[r, :] = table[tokens[r], :] (bf16 -> f32). Tokens are checked on the host.
// Launch: block 256 (any multiple of 32), grid min(rows, 65535); one block per row, grid-stride.
extern "C" __global__ void __launch_bounds__(1024)
    embed_bf16(const bf16* __restrict__ table, const int* __restrict__ tokens, float* __restrict__ out,
               int rows, int hidden) {
  const bool vec = (hidden & 7) == 0 && aligned16(table) && aligned16(out);
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const bf16* src = table + (long long)tokens[r] * hidden;
    float* dst = out + (long long)r * hidden;
    if (vec) {
      const uint4* s8 = reinterpret_cast<const uint4*>(src);
      float4* d4 = reinterpret_cast<float4*>(dst);
      for (int c = threadIdx.x; c < (hidden >> 3); c += blockDim.x) {
        float4 lo, hi;
        bf16x8_to_f32(__ldg(s8 + c), lo, hi);
        d4[2 * c] = lo;
        d4[2 * c + 1] = hi;
      }
    } else {
      for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = __bfloat162float(src[c]);
    }
  }
}

// out[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w, sums in f32; with a residual `y` (not null)
// x[r] += y[r] first (written back: the residual stream's add and the next norm in one pass), and
// with `out_b` (not null) out is also written as bf16 there (the next GEMM's input, so that no
// separate cast runs). Each thread reads back only the elements of x it wrote itself.
// Launch: one block per row (grid min(rows, 65535), grid-stride over rows), blockDim a power of
// two in 32..1024, about cols / 4 (one 16-byte word a thread: a decode step has few rows, and
// each thread's loads then wait on one memory latency, not several in turn), no dynamic shared
// memory.
extern "C" __global__ void __launch_bounds__(1024)
    rms_norm(float* __restrict__ x, const float* __restrict__ y, const float* __restrict__ w,
             float* __restrict__ out, bf16* __restrict__ out_b, int rows, int cols, float eps) {
  __shared__ float scratch[32];
  const bool vec = (cols & 3) == 0 && aligned16(x) && aligned16(w) && aligned16(out) &&
                   (y == nullptr || aligned16(y)) && (out_b == nullptr || aligned16(out_b));
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    float* xr = x + (long long)r * cols;
    const float* rr = y == nullptr ? nullptr : y + (long long)r * cols;
    float* yr = out + (long long)r * cols;
    bf16* br = out_b == nullptr ? nullptr : out_b + (long long)r * cols;
    float ss = 0.0f;
    if (vec) {
      float4* x4 = reinterpret_cast<float4*>(xr);
      for (int c = threadIdx.x; c < (cols >> 2); c += blockDim.x) {
        float4 v = x4[c];
        if (rr != nullptr) {
          const float4 d = __ldg(reinterpret_cast<const float4*>(rr) + c);
          v = make_float4(__fadd_rn(v.x, d.x), __fadd_rn(v.y, d.y), __fadd_rn(v.z, d.z), __fadd_rn(v.w, d.w));
          x4[c] = v;
        }
        ss = fmaf(v.x, v.x, ss);
        ss = fmaf(v.y, v.y, ss);
        ss = fmaf(v.z, v.z, ss);
        ss = fmaf(v.w, v.w, ss);
      }
    } else {
      for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float v = xr[c];
        if (rr != nullptr) {
          v = __fadd_rn(v, rr[c]);
          xr[c] = v;
        }
        ss = fmaf(v, v, ss);
      }
    }
    ss = block_sum(ss, scratch);
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)cols), eps)));
    if (vec) {
      const float4* x4 = reinterpret_cast<const float4*>(xr);
      const float4* w4 = reinterpret_cast<const float4*>(w);
      float4* y4 = reinterpret_cast<float4*>(yr);
      for (int c = threadIdx.x; c < (cols >> 2); c += blockDim.x) {
        const float4 v = x4[c], g = __ldg(w4 + c);
        const float4 o = make_float4(__fmul_rn(__fmul_rn(v.x, scale), g.x), __fmul_rn(__fmul_rn(v.y, scale), g.y),
                                     __fmul_rn(__fmul_rn(v.z, scale), g.z), __fmul_rn(__fmul_rn(v.w, scale), g.w));
        y4[c] = o;
        if (br != nullptr) {
          __nv_bfloat162* b2 = reinterpret_cast<__nv_bfloat162*>(br + 4 * c);
          b2[0] = __floats2bfloat162_rn(o.x, o.y);
          b2[1] = __floats2bfloat162_rn(o.z, o.w);
        }
      }
    } else {
      for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float o = __fmul_rn(__fmul_rn(xr[c], scale), w[c]);
        yr[c] = o;
        if (br != nullptr) br[c] = __float2bfloat16_rn(o);
      }
    }
  }
}

// Copies consecutive column blocks of src (rows of `stride` floats; `src` points at the first
// block's first column) into up to four [rows, w_i] outputs (a null d_i with w_i 0 ends the
// list): one launch instead of one 2-D copy per block (split Q/K/V and gate/up after their
// stacked projection).
// Launch: grid (rows, ceil((w_0 + .. + w_3) / 1024)) (grid-stride over both), block 256.
extern "C" __global__ void __launch_bounds__(1024)
    split_cols(const float* __restrict__ src, int rows, int stride, float* __restrict__ d0, int w0,
               float* __restrict__ d1, int w1, float* __restrict__ d2, int w2, float* __restrict__ d3, int w3) {
  const int e1 = w0, e2 = e1 + w1, e3 = e2 + w2, n = e3 + w3;
  const bool vec = ((w0 | w1 | w2 | w3 | stride) & 3) == 0 && aligned16(src) && aligned16(d0) &&
                   (d1 == nullptr || aligned16(d1)) && (d2 == nullptr || aligned16(d2)) &&
                   (d3 == nullptr || aligned16(d3));
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* s = src + (long long)r * stride;
    if (vec) {
      for (int c = 4 * (blockIdx.y * blockDim.x + threadIdx.x); c < n; c += 4 * gridDim.y * blockDim.x) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(s + c));
        float* d = c < e1 ? d0 + (long long)r * w0 + c
                 : c < e2 ? d1 + (long long)r * w1 + (c - e1)
                 : c < e3 ? d2 + (long long)r * w2 + (c - e2)
                          : d3 + (long long)r * w3 + (c - e3);
        *reinterpret_cast<float4*>(d) = v;
      }
    } else {
      for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < n; c += gridDim.y * blockDim.x) {
        float* d = c < e1 ? d0 + (long long)r * w0 + c
                 : c < e2 ? d1 + (long long)r * w1 + (c - e1)
                 : c < e3 ? d2 + (long long)r * w2 + (c - e2)
                          : d3 + (long long)r * w3 + (c - e3);
        *d = s[c];
      }
    }
  }
}

// y = bf16(x), round to nearest even.
// Launch: block 256, grid min(ceil(n / 2048), 4 * SMs) or so (any grid is correct).
extern "C" __global__ void __launch_bounds__(1024)
    cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
  long long start = 0;
  if (aligned16(x) && aligned16(y)) {
    const long long n8 = n >> 3;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    uint4* y8 = reinterpret_cast<uint4*>(y);
    for (long long i = grid_tid(); i < n8; i += grid_stride()) y8[i] = f32x8_to_bf16(__ldg(x4 + 2 * i), __ldg(x4 + 2 * i + 1));
    start = n8 << 3;
  }
  for (long long i = start + grid_tid(); i < n; i += grid_stride()) y[i] = __float2bfloat16_rn(x[i]);
}

// Rotary embedding in place on x viewed as [rows, n_heads, head_dim], position positions[r].
// Pair i < rot_dim / 2 of every head rotates by positions[r] * theta^(-2i / rot_dim), the angle,
// its cosine and sine computed in double and the cosine and sine rounded to float, as the CPU
// backend does. Pairs are (2i, 2i+1) when neox == 0, (i, i + rot_dim/2) otherwise; dims at and
// past rot_dim are left alone. Nothing happens if rot_dim is odd, < 2 or > head_dim.
// Launch: grid (rows, ceil(n_heads / (block / (rot_dim/2)))), grid-stride over rows and head
// groups, block 256 (a multiple of 32): each thread computes one (cos, sin) and applies it to one
// head of its block's group, so that a decode step's few rows still spread over many blocks.
// With `x2` not null the heads of a second tensor of the same rows, [rows, n_heads2, head_dim]
// (the keys beside the queries), follow the n_heads of x as heads n_heads.. of one launch.
extern "C" __global__ void __launch_bounds__(1024)
    rope(float* __restrict__ x, const int* __restrict__ positions, int rows, int n_heads, int head_dim,
         int rot_dim, float theta, int neox, float* __restrict__ x2, int n_heads2) {
  if (rot_dim < 2 || (rot_dim & 1) || rot_dim > head_dim) return;
  const int half = rot_dim >> 1;
  const int groups = (int)blockDim.x >= half ? (int)blockDim.x / half : 1;
  const int items = half * groups;
  const long long row_len = (long long)n_heads * head_dim, row_len2 = (long long)n_heads2 * head_dim;
  const int all_heads = n_heads + (x2 == nullptr ? 0 : n_heads2);
  const bool pair_vec = ((reinterpret_cast<unsigned long long>(x) & 7ull) == 0) &&
                        (x2 == nullptr || (reinterpret_cast<unsigned long long>(x2) & 7ull) == 0) &&
                        (head_dim & 1) == 0;
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const double pos = (double)positions[r];
    float* xr = x + (long long)r * row_len;
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
      const int i = it % half, g = it / half;
      const double inv_freq = pow((double)theta, -2.0 * (double)i / (double)rot_dim);
      double sd, cd;
      sincos_rope(pos * inv_freq, &sd, &cd);
      const float c = (float)cd, s = (float)sd;
      for (int h = blockIdx.y * groups + g; h < all_heads; h += gridDim.y * groups) {
        float* hp = h < n_heads ? xr + (long long)h * head_dim
                                : x2 + (long long)r * row_len2 + (long long)(h - n_heads) * head_dim;
        if (neox) {
          const float a = hp[i], b = hp[i + half];
          hp[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
          hp[i + half] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
        } else if (pair_vec) {
          float2* p2 = reinterpret_cast<float2*>(hp) + i;
          const float2 v = *p2;
          *p2 = make_float2(__fsub_rn(__fmul_rn(v.x, c), __fmul_rn(v.y, s)),
                            __fadd_rn(__fmul_rn(v.x, s), __fmul_rn(v.y, c)));
        } else {
          const float a = hp[2 * i], b = hp[2 * i + 1];
          hp[2 * i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
          hp[2 * i + 1] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
        }
      }
    }
  }
}

// out = silu(g) * u = g / (1 + exp(-g)) * u; with `out_b` (not null) also as bf16 there.
// Launch: block 256, grid min(ceil(n / 1024), 4 * SMs) or so (any grid is correct).
extern "C" __global__ void __launch_bounds__(1024)
    silu_mul(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ out,
             bf16* __restrict__ out_b, long long n) {
  long long start = 0;
  if (aligned16(g) && aligned16(u) && aligned16(out) && (out_b == nullptr || aligned16(out_b))) {
    const long long n4 = n >> 2;
    const float4* g4 = reinterpret_cast<const float4*>(g);
    const float4* u4 = reinterpret_cast<const float4*>(u);
    float4* o4 = reinterpret_cast<float4*>(out);
    for (long long i = grid_tid(); i < n4; i += grid_stride()) {
      const float4 a = __ldg(g4 + i), b = __ldg(u4 + i);
      const float4 o = make_float4(silu_mul1(a.x, b.x), silu_mul1(a.y, b.y), silu_mul1(a.z, b.z), silu_mul1(a.w, b.w));
      o4[i] = o;
      if (out_b != nullptr) {
        __nv_bfloat162* b2 = reinterpret_cast<__nv_bfloat162*>(out_b + 4 * i);
        b2[0] = __floats2bfloat162_rn(o.x, o.y);
        b2[1] = __floats2bfloat162_rn(o.z, o.w);
      }
    }
    start = n4 << 2;
  }
  for (long long i = start + grid_tid(); i < n; i += grid_stride()) {
    out[i] = silu_mul1(g[i], u[i]);
    if (out_b != nullptr) out_b[i] = __float2bfloat16_rn(out[i]);
  }
}

// x += y.
// Launch: block 256, grid min(ceil(n / 1024), 4 * SMs) or so (any grid is correct).
extern "C" __global__ void __launch_bounds__(1024) add_inplace(float* __restrict__ x, const float* __restrict__ y,
                                                               long long n) {
  long long start = 0;
  if (aligned16(x) && aligned16(y)) {
    const long long n4 = n >> 2;
    float4* x4 = reinterpret_cast<float4*>(x);
    const float4* y4 = reinterpret_cast<const float4*>(y);
    for (long long i = grid_tid(); i < n4; i += grid_stride()) {
      float4 a = x4[i];
      const float4 b = __ldg(y4 + i);
      a.x = __fadd_rn(a.x, b.x);
      a.y = __fadd_rn(a.y, b.y);
      a.z = __fadd_rn(a.z, b.z);
      a.w = __fadd_rn(a.w, b.w);
      x4[i] = a;
    }
    start = n4 << 2;
  }
  for (long long i = start + grid_tid(); i < n; i += grid_stride()) x[i] = __fadd_rn(x[i], y[i]);
}

// x[r, :] += b.
// Launch: one block per row (grid min(rows, 65535), grid-stride over rows), block 256.
extern "C" __global__ void __launch_bounds__(1024)
    add_bias(float* __restrict__ x, const float* __restrict__ b, int rows, int cols) {
  const bool vec = (cols & 3) == 0 && aligned16(x) && aligned16(b);
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    float* xr = x + (long long)r * cols;
    if (vec) {
      float4* x4 = reinterpret_cast<float4*>(xr);
      const float4* b4 = reinterpret_cast<const float4*>(b);
      for (int c = threadIdx.x; c < (cols >> 2); c += blockDim.x) {
        float4 a = x4[c];
        const float4 v = __ldg(b4 + c);
        a.x = __fadd_rn(a.x, v.x);
        a.y = __fadd_rn(a.y, v.y);
        a.z = __fadd_rn(a.z, v.z);
        a.w = __fadd_rn(a.w, v.w);
        x4[c] = a;
      }
    } else {
      for (int c = threadIdx.x; c < cols; c += blockDim.x) xr[c] = __fadd_rn(xr[c], b[c]);
    }
  }
}

// Writes rows' K and V (f32 [rows, n_kv * head_dim]) as bf16 into their sequences' caches at
// layer `layer`, position seq.start_pos + (r - seq.row) (at its slot: see SeqDesc::hole_start). A
// row whose slot falls outside [0, cap) or whose position is in the hole is skipped (the host
// never asks for that).
// Launch: one block per row (grid min(rows, 65535), grid-stride over rows), block 128 (8B model:
// n_kv * head_dim / 8 = 128 16-byte stores per row for K and as many for V).
extern "C" __global__ void __launch_bounds__(1024)
    kv_append(const float* __restrict__ k, const float* __restrict__ v, const SeqDesc* __restrict__ seqs,
              const int* __restrict__ row_seq, int rows, int layer, int n_kv, int head_dim) {
  const int width = n_kv * head_dim;
  const bool in_vec = (head_dim & 7) == 0 && aligned16(k) && aligned16(v);
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const SeqDesc sd = seqs[row_seq[r]];
    const int lpos = sd.start_pos + (r - sd.row);
    if (lpos >= sd.hole_start && lpos < sd.hole_start + sd.hole_len) continue;  // in host memory
    const int pos = seq_slot(sd, lpos);
    if (pos < 0 || pos >= sd.cap) continue;
    bf16* kb = reinterpret_cast<bf16*>(sd.k_base);
    bf16* vb = reinterpret_cast<bf16*>(sd.v_base);
    const float* kr = k + (long long)r * width;
    const float* vr = v + (long long)r * width;
    // Token `pos` of head h starts at ((layer * n_kv + h) * cap + pos) * head_dim.
    const long long head_stride = (long long)sd.cap * head_dim;
    const long long tok_off = ((long long)layer * n_kv * sd.cap + pos) * head_dim;
    if (in_vec && aligned16(kb) && aligned16(vb)) {
      const int per_head = head_dim >> 3;
      for (int u = threadIdx.x; u < (width >> 3); u += blockDim.x) {
        const int h = u / per_head, d = (u - h * per_head) << 3;
        const long long dst = tok_off + h * head_stride + d;
        const float4* k4 = reinterpret_cast<const float4*>(kr) + 2 * u;
        const float4* v4 = reinterpret_cast<const float4*>(vr) + 2 * u;
        *reinterpret_cast<uint4*>(kb + dst) = f32x8_to_bf16(__ldg(k4), __ldg(k4 + 1));
        *reinterpret_cast<uint4*>(vb + dst) = f32x8_to_bf16(__ldg(v4), __ldg(v4 + 1));
      }
    } else {
      for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const int h = c / head_dim, d = c - h * head_dim;
        const long long dst = tok_off + h * head_stride + d;
        kb[dst] = __float2bfloat16_rn(kr[c]);
        vb[dst] = __float2bfloat16_rn(vr[c]);
      }
    }
  }
}

// out[i] = bf16(((2u - 1) * scale)) with u the top 24 bits of the (i+1)-th output of splitmix64
// seeded with `seed` (state seed + (i+1) * 0x9E3779B97F4A7C15, then the splitmix64 finaliser),
// divided by 2^24. The same seed gives the same values whatever the launch.
// Launch: block 256, grid min(ceil(n / 2048), 4 * SMs) or so (any grid is correct).
extern "C" __global__ void __launch_bounds__(1024)
    fill_uniform_bf16(bf16* __restrict__ out, long long n, unsigned long long seed, float scale) {
  long long start = 0;
  if (aligned16(out)) {
    const long long n8 = n >> 3;
    uint4* o8 = reinterpret_cast<uint4*>(out);
    for (long long i = grid_tid(); i < n8; i += grid_stride()) {
      const long long e = i << 3;
      const float4 lo = make_float4(uniform_at(seed, e, scale), uniform_at(seed, e + 1, scale),
                                    uniform_at(seed, e + 2, scale), uniform_at(seed, e + 3, scale));
      const float4 hi = make_float4(uniform_at(seed, e + 4, scale), uniform_at(seed, e + 5, scale),
                                    uniform_at(seed, e + 6, scale), uniform_at(seed, e + 7, scale));
      o8[i] = f32x8_to_bf16(lo, hi);
    }
    start = n8 << 3;
  }
  for (long long i = start + grid_tid(); i < n; i += grid_stride())
    out[i] = __float2bfloat16_rn(uniform_at(seed, i, scale));
}

// out[i, :] = x[rows[i], :] for i < n (rows checked on the host).
// Launch: one block per output row (grid min(n, 65535), grid-stride), block 256.
extern "C" __global__ void __launch_bounds__(1024)
    select_rows(const float* __restrict__ x, const int* __restrict__ rows, float* __restrict__ out, int n, int cols) {
  const bool vec = (cols & 3) == 0 && aligned16(x) && aligned16(out);
  for (int i = blockIdx.x; i < n; i += gridDim.x) {
    const float* src = x + (long long)rows[i] * cols;
    float* dst = out + (long long)i * cols;
    if (vec) {
      const float4* s4 = reinterpret_cast<const float4*>(src);
      float4* d4 = reinterpret_cast<float4*>(dst);
      for (int c = threadIdx.x; c < (cols >> 2); c += blockDim.x) d4[c] = __ldg(s4 + c);
    } else {
      for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
    }
  }
}

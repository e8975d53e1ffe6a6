// guided_step: one reverse step with token-local critic guidance, in one kernel pass.
//
// For N = B * L tokens of width d (contract: docs/design.md §3, reference:
// fastdia.ops.guided_step.guided_step_reference):
//
//   z'[n] = a z[n] + b eps[n] + (c lambda) g[n] + s zeta(seed_b, step, i d + j),  n = b L + i
//
// (the noise of sequence b is drawn under its own seed, numbered within the sequence)
//   g[n]  = grad[n] + (silu'(pre[n]) * w2) W1 / L,    pre[n] = z[n] W1^T + b1
//   h_b   = mean_{n in sequence b} w2 . silu(pre[n]) + b2
//
// with (a, b, c, s) one coefficient row [4] or one per sample [B, 4], and with kappa > 0 the
// noise of sequence b scaled by exp(-kappa h_b). Header-only; the launcher returns a
// cudaError_t and knows nothing of PyTorch.
//
// Design
// * Without a critic the step is elementwise: a grid-stride loop over 16-byte groups
//   (4 fp32 or 8 fp16/bf16 elements), one Philox4x32-10 draw per four elements (fastdia.noise).
// * With a critic a block owns kRows = 64 tokens. Phase A computes pre = z W1^T on the
//   tensor cores (3xTF32: fp32-level accuracy) over d in chunks of 32 and W1 in blocks of
//   128 hidden units (padded with zero units, which contribute nothing), into shared memory;
//   the activation turns it into gp = silu'(pre + b1) * w2 in place and gives each token's
//   value w2 . silu(pre + b1). Phase C computes gp W1 chunk by chunk (3xTF32 again) and the
//   step itself: z, eps and grad read with 16-byte loads, Philox noise in registers, z'
//   written once with 16-byte stores. z is read twice (the second time from L2).
// * Column groups: with few row tiles (small N: B = 1 has one or a few), the grid's second
//   dimension splits phase C's columns across blocks; each block recomputes phase A over all
//   of d (z and W1 come from L2), so the result is the same for any split.
// * Sequence mode (kappa > 0 or h requested): one block per sequence walks its row tiles;
//   with kappa it first runs phase A over the whole sequence to get h_b (reduced in a fixed
//   order: deterministic, no atomics), then the step with s exp(-kappa h_b).
// * Graph safe: seed, step, guidance, the coefficients and b2 are read from device memory.
#pragma once

#include "common.cuh"
#include "philox.cuh"

namespace fastdia {
namespace guided {

constexpr int kThreads = 256;
constexpr int kRows = 64;         // tokens per tile
constexpr int kChunk = 32;        // columns of d per chunk
constexpr int kHidBlock = 128;    // hidden units per staged block of W1
constexpr int kLd = kChunk + 4;   // padded row length (floats) of the chunk buffers

// Pointers and sizes of one call. T is the dtype of z, eps and grad; everything else fp32.
struct Params {
  const void* z;            // [n, d] T
  const void* eps;          // [n, d] T
  const void* grad;         // [n, d] T, or nullptr
  float* out;               // [n, d]
  float* h;                 // [n / seq_len], or nullptr (not requested)
  const float* coef;        // [4] or [n / seq_len, 4]
  const int64_t* seed;      // [n / seq_len], one seed per sequence
  const int64_t* step;      // 0-d
  const float* guidance;    // 0-d
  const float* w1;          // [hidden, d], or nullptr (no critic)
  const float* b1;          // [hidden]
  const float* w2;          // [hidden]
  const float* b2;          // 0-d
  float kappa;              // adaptive noise strength (used with a critic only)
  int64_t n;
  int d;
  int hidden;
  int seq_len;
  int chunks_per_group;     // phase C chunks of d per column group (set by the launcher)
  bool per_sample;          // coef is [B, 4]
};

// Which operands take 16-byte vector loads / stores.
struct VecFlags {
  bool z;    // z, eps, grad
  bool w1;
  bool out;
};

__host__ __device__ __forceinline__ int padded_hidden(int hidden) {
  const int h = hidden < 1 ? 1 : hidden;
  return (h + kHidBlock - 1) / kHidBlock * kHidBlock;
}

// Dynamic shared memory of the critic kernels for `hidden` units.
inline size_t tile_smem_bytes(int hidden) {
  const size_t hp = static_cast<size_t>(padded_hidden(hidden));
  return sizeof(float) * ((kRows + kHidBlock) * static_cast<size_t>(kLd) + kRows * (hp + 4) +
                          2 * hp + kRows + 1);
}

struct Coef {
  float a, b, cl, s;
};

// The Philox key of token `row`'s sequence and the noise counter of its element `col`
// (numbered within the sequence: i d + col for position i).
__device__ __forceinline__ uint64_t row_key(const Params& p, int64_t row) {
  return philox::make_key(p.seed[row / p.seq_len], *p.step);
}

__device__ __forceinline__ int64_t row_counter(const Params& p, int64_t row, int64_t col) {
  return (row % p.seq_len) * p.d + col;
}

__device__ __forceinline__ Coef row_coef(const Params& p, int64_t row, float lam,
                                         float noise_mult) {
  const float* c = p.coef + (p.per_sample ? (row / p.seq_len) * 4 : 0);
  return {c[0], c[1], c[2] * lam, c[3] * noise_mult};
}

// ---- no critic: elementwise -------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(const Params p, const bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  const T* z = static_cast<const T*>(p.z);
  const T* eps = static_cast<const T*>(p.eps);
  const T* grad = static_cast<const T*>(p.grad);
  const float lam = *p.guidance;
  const int64_t total = p.n * p.d;
  const int64_t groups = (total + kVec - 1) / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += stride) {
    const int64_t k0 = g * kVec;
    if (vec) {  // d % kVec == 0: the group lies in one row
      const int64_t row = k0 / p.d;
      const Coef c = row_coef(p, row, lam, 1.0f);
      T zv[kVec], ev[kVec], gv[kVec];
      load_n(z + k0, zv, true, kVec);
      load_n(eps + k0, ev, true, kVec);
      if (grad != nullptr) load_n(grad + k0, gv, true, kVec);
      float o[kVec], zeta[kVec] = {};
      // the counter is a multiple of 4: one draw per four elements
      philox::randn_span(row_key(p, row), row_counter(p, row, k0 % p.d), zeta, kVec);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float gi = grad != nullptr ? to_float(gv[i]) : 0.0f;
        o[i] = c.a * to_float(zv[i]) + c.b * to_float(ev[i]) + c.cl * gi + c.s * zeta[i];
      }
      store_f32(p.out + k0, o, true, kVec);
    } else {
      for (int i = 0; i < kVec; ++i) {
        const int64_t k = k0 + i;
        if (k >= total) break;
        const int64_t row = k / p.d;  // the group may straddle rows: one draw per element
        const float zeta = philox::randn(row_key(p, row),
                                         static_cast<uint32_t>(row_counter(p, row, k % p.d)));
        const Coef c = row_coef(p, row, lam, 1.0f);
        const float gi = grad != nullptr ? to_float(grad[k]) : 0.0f;
        p.out[k] = c.a * to_float(z[k]) + c.b * to_float(eps[k]) + c.cl * gi + c.s * zeta;
      }
    }
  }
}

// ---- with a critic ----------------------------------------------------------------------

// Shared memory of one block, carved from the dynamic buffer (every WMMA tile 32-byte aligned).
// zs and sg share their bytes: phase A and phase C are separated by barriers. About 63 KB
// for H <= 128, 97 KB for H <= 256 (the limit of sm_86/sm_89), 164 KB for H <= 512 (A100).
struct Smem {
  float* zs;    // [kRows][kLd]       phase A: a chunk of z (fp32)
  float* sg;    // [kRows][kLd]       phase C: the critic gradient chunk gp W1 (= zs)
  float* ws;    // [kHidBlock][kLd]   a chunk of W1: [unit][column]
  float* sp;    // [kRows][hp + 4]    pre-activations, then gp
  float* sb1;   // [hp]               b1, zero-padded
  float* sw2;   // [hp]               w2, zero-padded
  float* shv;   // [kRows + 1]        token values; shv[kRows] broadcasts h
  int hp;
};

__device__ __forceinline__ Smem carve(unsigned char* raw, int hidden) {
  Smem s;
  s.hp = padded_hidden(hidden);
  s.zs = reinterpret_cast<float*>(raw);
  s.sg = s.zs;
  s.ws = s.zs + kRows * kLd;
  s.sp = s.ws + kHidBlock * kLd;
  s.sb1 = s.sp + kRows * (s.hp + 4);
  s.sw2 = s.sb1 + s.hp;
  s.shv = s.sw2 + s.hp;
  return s;
}

// W1[hb + unit][d0 + column] -> ws[unit][column]: 16 floats per thread, zero past H and d.
__device__ __forceinline__ void stage_w1(const Params& p, float* ws, int hb, int d0, bool vec) {
  const int unit = threadIdx.x >> 1;
  const int c0 = (threadIdx.x & 1) * 16;
  const int valid = hb + unit < p.hidden ? clamp_count(p.d - (d0 + c0), 16) : 0;
  float v[16];
  load_n(valid > 0 ? p.w1 + static_cast<int64_t>(hb + unit) * p.d + d0 + c0 : p.w1, v, vec, valid);
  store_shared(ws + unit * kLd + c0, v);
}

// z[row0 + r][d0 + column] -> zs[r][column] as fp32: 8 elements per thread, zero past the
// tile's valid rows and past d.
template <typename T>
__device__ __forceinline__ void stage_z(const Params& p, float* zs, int64_t row0, int rows, int d0,
                                        bool vec) {
  const int r = threadIdx.x >> 2;
  const int c0 = (threadIdx.x & 3) * 8;
  const int valid = r < rows ? clamp_count(p.d - (d0 + c0), 8) : 0;
  const T* z = static_cast<const T*>(p.z);
  T v[8];
  load_n(valid > 0 ? z + (row0 + r) * p.d + d0 + c0 : z, v, vec, valid);
  float f[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_float(v[i]);
  store_shared(zs + r * kLd + c0, f);
}

// Phase A: sp[r][u] = z[row0 + r] . W1[u] for the tile's rows (zero rows past `rows`).
template <typename T>
__device__ void critic_pre(const Params& p, const Smem& s, int64_t row0, int rows,
                           const VecFlags& vec) {
  const int warp = threadIdx.x >> 5;
  const int wm = warp >> 2;  // rows 32 wm .. 32 wm + 31
  const int wn = warp & 3;   // units 32 wn .. 32 wn + 31 of the block
  for (int hb = 0; hb < s.hp; hb += kHidBlock) {
    Mma<float>::Acc acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    for (int d0 = 0; d0 < p.d; d0 += kChunk) {
      __syncthreads();  // the previous chunk is consumed
      stage_z<T>(p, s.zs, row0, rows, d0, vec.z);
      stage_w1(p, s.ws, hb, d0, vec.w1);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kChunk; kk += Mma<float>::kK) {
        TileA<float> a[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) a[i].load(s.zs + (32 * wm + 16 * i) * kLd + kk, kLd);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          TileB<float, wmma::col_major> b;  // B(k, u) = ws[u][k]
          b.load(s.ws + (32 * wn + 16 * j) * kLd + kk, kLd);
#pragma unroll
          for (int i = 0; i < 2; ++i) mma(acc[i][j], a[i], b);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(s.sp + (32 * wm + 16 * i) * (s.hp + 4) + hb + 32 * wn + 16 * j,
                                acc[i][j], s.hp + 4, wmma::mem_row_major);
      }
    }
  }
  __syncthreads();
}

// sp <- gp = silu'(pre + b1) * w2 in place; returns the token value w2 . silu(pre + b1) of
// row threadIdx.x / 4 (the same in the row's four threads). Needs a barrier before sp is read.
__device__ __forceinline__ float critic_activation(const Smem& s) {
  const int r = threadIdx.x >> 2;
  float* row = s.sp + r * (s.hp + 4);
  float hv = 0.0f;
  for (int u = threadIdx.x & 3; u < s.hp; u += 4) {
    const float x = row[u] + s.sb1[u];
    const float sig = 1.0f / (1.0f + expf(-x));
    hv += (x * sig) * s.sw2[u];
    row[u] = sig * (1.0f + x * (1.0f - sig)) * s.sw2[u];
  }
  hv += __shfl_xor_sync(0xffffffffu, hv, 1);
  hv += __shfl_xor_sync(0xffffffffu, hv, 2);
  return hv;
}

// Phase C and the step for the tile's rows: z' = a z + b eps + (c lambda)(grad + gp W1 / L)
// + s noise_mult zeta.
template <typename T>
__device__ void critic_step(const Params& p, const Smem& s, int64_t row0, int rows, int d_begin,
                            int d_end, float lam, float noise_mult,
                            const VecFlags& vec) {
  const int warp = threadIdx.x >> 5;
  const int fi = warp >> 1;  // rows 16 fi .. 16 fi + 15
  const int fj = warp & 1;   // columns 16 fj .. 16 fj + 15 of the chunk
  const T* z = static_cast<const T*>(p.z);
  const T* eps = static_cast<const T*>(p.eps);
  const T* grad = static_cast<const T*>(p.grad);
  const float len = static_cast<float>(p.seq_len);
  const int r = threadIdx.x >> 2;
  const int c0 = (threadIdx.x & 3) * 8;
  for (int d0 = d_begin; d0 < d_end; d0 += kChunk) {
    Mma<float>::Acc acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int hb = 0; hb < s.hp; hb += kHidBlock) {
      __syncthreads();  // ws and sg are free
      stage_w1(p, s.ws, hb, d0, vec.w1);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kHidBlock; kk += Mma<float>::kK) {
        TileA<float> a;
        a.load(s.sp + 16 * fi * (s.hp + 4) + hb + kk, s.hp + 4);
        TileB<float, wmma::row_major> b;  // B(u, j) = ws[u][j]
        b.load(s.ws + kk * kLd + 16 * fj, kLd);
        mma(acc, a, b);
      }
    }
    wmma::store_matrix_sync(s.sg + 16 * fi * kLd + 16 * fj, acc, kLd, wmma::mem_row_major);
    __syncthreads();
    const int valid = r < rows ? clamp_count(p.d - (d0 + c0), 8) : 0;
    if (valid > 0) {
      const int64_t row = row0 + r;
      const int64_t off = row * p.d + d0 + c0;
      const Coef c = row_coef(p, row, lam, noise_mult);
      T zv[8], ev[8], gv[8];
      load_n(z + off, zv, vec.z, valid);
      load_n(eps + off, ev, vec.z, valid);
      if (grad != nullptr) load_n(grad + off, gv, vec.z, valid);
      float o[8], zeta[8] = {};
      // d % 4 == 0: two draws for eight elements
      philox::randn_span(row_key(p, row), row_counter(p, row, d0 + c0), zeta, valid);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        // the reference's order: g = grad + (gp W1) / L
        const float critic_g = s.sg[r * kLd + c0 + i] / len;
        const float g = grad != nullptr ? to_float(gv[i]) + critic_g : critic_g;
        o[i] = c.a * to_float(zv[i]) + c.b * to_float(ev[i]) + c.cl * g + c.s * zeta[i];
      }
      store_f32(p.out + off, o, vec.out, valid);
    }
  }
}

// Sum of the token values of the tile's first `rows` rows, in row order (thread 0's result;
// the other threads return 0). Contains a barrier.
__device__ __forceinline__ float tile_value_sum(const Smem& s, float hv, int rows) {
  if ((threadIdx.x & 3) == 0) s.shv[threadIdx.x >> 2] = hv;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int r = 0; r < rows; ++r) total += s.shv[r];
  }
  return total;
}

// kSeq = false: grid (ceil(n / kRows), G), row tiles that may straddle sequences.
// kSeq = true:  grid (n / seq_len, G), one block per sequence (adaptive noise and/or h).
// Column group g (blockIdx.y) writes z' for the columns of chunks
// [g chunks_per_group, (g + 1) chunks_per_group); every group runs phase A over all of d
// (the critic's forward needs every column), so h is the same in every group and group 0
// writes it.
template <typename T, bool kSeq>
__global__ void __launch_bounds__(kThreads)
    critic_kernel(const Params p, const VecFlags vec) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const Smem s = carve(smem_raw, p.hidden);
  const int d_begin = static_cast<int>(blockIdx.y) * p.chunks_per_group * kChunk;
  const int d_span = p.chunks_per_group * kChunk;
  const int d_end = d_begin + d_span < p.d ? d_begin + d_span : p.d;
  for (int u = threadIdx.x; u < s.hp; u += kThreads) {
    s.sb1[u] = u < p.hidden ? p.b1[u] : 0.0f;
    s.sw2[u] = u < p.hidden ? p.w2[u] : 0.0f;
  }  // visible after critic_pre's first barrier
  const float lam = *p.guidance;
  if constexpr (!kSeq) {
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
    const int rows = clamp_count(p.n - row0, kRows);
    critic_pre<T>(p, s, row0, rows, vec);
    critic_activation(s);
    __syncthreads();
    critic_step<T>(p, s, row0, rows, d_begin, d_end, lam, 1.0f, vec);
  } else {
    const int64_t first = static_cast<int64_t>(blockIdx.x) * p.seq_len;
    const bool use_kappa = p.kappa > 0.0f;
    const float len = static_cast<float>(p.seq_len);
    float noise_mult = 1.0f;
    float h = 0.0f;
    if (use_kappa) {  // pass 1: the critic's value h_b over the whole sequence
      float total = 0.0f;
      for (int t0 = 0; t0 < p.seq_len; t0 += kRows) {
        const int rows = clamp_count(p.seq_len - t0, kRows);
        critic_pre<T>(p, s, first + t0, rows, vec);
        total += tile_value_sum(s, critic_activation(s), rows);
      }
      if (threadIdx.x == 0) s.shv[kRows] = total / len + *p.b2;
      __syncthreads();
      h = s.shv[kRows];
      noise_mult = expf(-p.kappa * h);
    }
    // pass 2: the step
    float total = 0.0f;
    for (int t0 = 0; t0 < p.seq_len; t0 += kRows) {
      const int rows = clamp_count(p.seq_len - t0, kRows);
      critic_pre<T>(p, s, first + t0, rows, vec);
      const float hv = critic_activation(s);
      if (!use_kappa && p.h != nullptr) {
        total += tile_value_sum(s, hv, rows);  // contains the barrier before sp is read
      } else {
        __syncthreads();
      }
      critic_step<T>(p, s, first + t0, rows, d_begin, d_end, lam, noise_mult, vec);
    }
    if (p.h != nullptr && blockIdx.y == 0 && threadIdx.x == 0) {
      p.h[blockIdx.x] = use_kappa ? h : total / len + *p.b2;
    }
  }
}

// ---- launcher ---------------------------------------------------------------------------

// Column groups of the critic kernel for `blocks` row tiles (or sequences): one group while
// the blocks alone give at least half an SM each, else enough groups for about one block
// per SM, at most one per chunk of d. `requested` > 0 asks for a count (for tests).
inline int column_groups(int64_t blocks, int d, int sm_count, int requested) {
  const int64_t chunks = (static_cast<int64_t>(d) + kChunk - 1) / kChunk;
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  int64_t groups = requested;
  if (groups <= 0) groups = 2 * blocks >= sms ? 1 : (sms + blocks - 1) / blocks;
  groups = groups < chunks ? groups : chunks;
  groups = groups < 65535 ? groups : 65535;
  return groups < 1 ? 1 : static_cast<int>(groups);
}

// Launches the step on `stream`; `sm_count` sizes the grids, `d_groups` > 0 forces the
// critic kernel's column groups. Returns the first CUDA error (cudaErrorInvalidValue when
// the critic needs more shared memory than the device allows a block).
template <typename T>
cudaError_t launch_guided_step(const Params& params, cudaStream_t stream, int sm_count,
                               int d_groups = 0) {
  Params p = params;
  if (p.n <= 0 || p.d <= 0) return cudaSuccess;
  const bool vec_z = aligned16(p.z) && aligned16(p.eps) &&
                     (p.grad == nullptr || aligned16(p.grad)) &&
                     (static_cast<size_t>(p.d) * sizeof(T)) % 16 == 0;
  const bool vec_out = aligned16(p.out) && p.d % 4 == 0;
  if (p.w1 == nullptr) {
    constexpr int kVec = 16 / sizeof(T);
    const int64_t groups = (p.n * p.d + kVec - 1) / kVec;
    const int64_t wanted = (groups + kThreads - 1) / kThreads;
    const int64_t cap = static_cast<int64_t>(sm_count > 0 ? sm_count : 1) * 16;
    const int blocks = static_cast<int>(wanted < cap ? wanted : cap);
    elementwise_kernel<T><<<blocks, kThreads, 0, stream>>>(p, vec_z && vec_out);
    return cudaGetLastError();
  }
  const VecFlags vec{vec_z, aligned16(p.w1) && p.d % 4 == 0, vec_out};
  const size_t smem = tile_smem_bytes(p.hidden);
  const bool seq = p.kappa > 0.0f || p.h != nullptr;
  auto kernel = seq ? critic_kernel<T, true> : critic_kernel<T, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const int64_t blocks = seq ? p.n / p.seq_len : (p.n + kRows - 1) / kRows;
  const int chunks = (p.d + kChunk - 1) / kChunk;
  const int groups = column_groups(blocks, p.d, sm_count, d_groups);
  p.chunks_per_group = (chunks + groups - 1) / groups;
  const int used = (chunks + p.chunks_per_group - 1) / p.chunks_per_group;  // none empty
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(used));
  kernel<<<grid, kThreads, smem, stream>>>(p, vec);
  return cudaGetLastError();
}

}  // namespace guided
}  // namespace fastdia

// round_to_vocab: ids[n] = argmax_v <E_v, z_n> + bias_v without writing the [N, V] scores.
//
// Contract: docs/design.md §3; reference:
// fastdia.ops.round_to_vocab.round_to_vocab_reference (ties to the lowest id, as
// torch.argmax). Header-only; launchers return a cudaError_t and know nothing of PyTorch.
//
// Design
// * Main kernel, grid (ceil(N / kRows), S), 8 warps. Block (m, s) owns kRows = 128 rows of z
//   and the vocabulary slice [s Vs, (s + 1) Vs) (Vs a multiple of kVocab). It walks the slice
//   in tiles of kVocab = 128 entries; each tile's [128, 128] scores accumulate in fp32 on
//   the tensor cores (WMMA) over d in chunks of kChunk = 32: fp16/bf16 operands natively
//   (m16n16k16), fp32 operands as 3xTF32 (m16n16k8, three TF32 products: fp32-level
//   accuracy). The (tile, chunk) pairs form one flat loop with a register-staged double
//   buffer: the next chunk's 16-byte global loads are in flight while the current one runs
//   on the tensor cores. Rows past N and entries past V are clamped for the loads, columns
//   past d are zero.
// * Epilogue per tile: the accumulators go through shared memory (the WMMA layout is
//   opaque; the score tile reuses the staging buffers' bytes, so a block needs 68 KB for
//   16-bit operands and 74 KB for fp32, within the 99 KB of sm_86/sm_89), the bias is
//   added, entries past V are -inf, and two threads per row scan 64 columns each in
//   increasing order with a strict '>' and then combine (value, id) with ties to the lower
//   id; the running (max, argmax) of the row updates with a strict '>', so the lowest id
//   wins every tie, inside a tile and across tiles. The scores never reach global memory.
// * Vocabulary split (small N): each block writes a partial (max, argmax) to [S, N]
//   buffers; the merge kernel takes per row the largest value, ties to the lowest id (the
//   first split holding the maximum), and optionally gathers E[ids] on raw bits (exact).
//   With S == 1 and no embeddings the main kernel writes the ids directly.
// * Mixed operands: z fp32 with E fp16/bf16 computes in fp32 (E converted while staged).
#pragma once

#include <climits>
#include <cmath>

#include "common.cuh"

namespace fastdia {
namespace rounding {

constexpr int kThreads = 256;
constexpr int kRows = 128;          // rows of z per block
constexpr int kVocab = 128;         // vocabulary entries per tile
constexpr int kChunk = 32;          // columns of d per chunk
constexpr int kLdC = kVocab + 4;    // padded row length (floats) of the score tile
constexpr int kMergeWarps = 8;      // rows per merge block (one warp each)

// Padded row length (elements) of the staged operand chunks.
template <typename TC>
__host__ __device__ constexpr int operand_ld() {
  return kChunk + (sizeof(TC) == 4 ? 4 : 8);
}

// Shared memory: the double-buffered operand chunks, and the [kRows, kVocab] fp32 score tile
// of the epilogue in the same bytes (the epilogue runs between barriers, when no chunk is
// staged), then the bias of the tile.
template <typename TC>
constexpr size_t staging_bytes() {
  return 2 * static_cast<size_t>(kRows + kVocab) * operand_ld<TC>() * sizeof(TC);
}
constexpr size_t kScoreBytes = static_cast<size_t>(kRows) * kLdC * sizeof(float);
template <typename TC>
constexpr size_t smem_bytes() {
  return (staging_bytes<TC>() > kScoreBytes ? staging_bytes<TC>() : kScoreBytes) +
         kVocab * sizeof(float);
}

struct Params {
  const void* z;          // [n, d] TZ
  const void* w;          // [v, d] TW
  const float* bias;      // [v], or nullptr
  float* part_val;        // [splits, n] (unless direct)
  int64_t* part_idx;      // [splits, n] (unless direct)
  int64_t* ids;           // [n] (direct only)
  int64_t n;
  int64_t v;
  int d;
  int64_t v_per_split;    // a multiple of kVocab
  bool direct;            // one split and no embeddings: write the ids directly
};

// Blocks per vocabulary split so that about two blocks run per SM in all (1 for large N).
inline int num_splits(int64_t n, int64_t v, int sm_count) {
  const int64_t row_tiles = (n + kRows - 1) / kRows;
  const int64_t target = 2 * static_cast<int64_t>(sm_count > 0 ? sm_count : 1);
  const int64_t want = (target + row_tiles - 1) / row_tiles;
  const int64_t cap = (v + 2 * kVocab - 1) / (2 * kVocab);
  int64_t s = want < cap ? want : cap;
  if (s > 65535) s = 65535;
  return s < 1 ? 1 : static_cast<int>(s);
}

// Vocabulary entries per split for `splits` requested splits (a multiple of kVocab); the
// number of splits actually used is ceil(v / vocab_per_split).
inline int64_t vocab_per_split(int64_t v, int64_t splits) {
  const int64_t per = (v + splits - 1) / splits;
  return (per + kVocab - 1) / kVocab * kVocab;
}

template <typename TZ, typename TW, typename TC>
__global__ void __launch_bounds__(kThreads, sizeof(TC) == 2 ? 2 : 1)
    argmax_kernel(const Params p, const bool vec_z, const bool vec_w) {
  constexpr int kLd = operand_ld<TC>();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  TC* sa = reinterpret_cast<TC*>(smem_raw);           // [2][kRows][kLd]
  TC* sb = sa + 2 * kRows * kLd;                      // [2][kVocab][kLd]
  float* sc = reinterpret_cast<float*>(smem_raw);     // [kRows][kLdC], aliases sa and sb
  float* sbias = reinterpret_cast<float*>(smem_raw + smem_bytes<TC>()) - kVocab;  // [kVocab]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wm = warp >> 1;  // rows 32 wm .. 32 wm + 31
  const int wn = warp & 1;   // vocabulary columns 64 wn .. 64 wn + 63
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t v_begin = static_cast<int64_t>(blockIdx.y) * p.v_per_split;
  const int64_t v_end = v_begin + p.v_per_split < p.v ? v_begin + p.v_per_split : p.v;
  const int tiles = v_end > v_begin ? static_cast<int>((v_end - v_begin + kVocab - 1) / kVocab) : 0;
  const int nk = p.d > 0 ? (p.d + kChunk - 1) / kChunk : 1;  // d = 0: one all-zero chunk
  const int total = tiles * nk;

  // Staging: each thread moves 16 consecutive elements of one z row and of one E row.
  const int sr = tid >> 1;
  const int sk = (tid & 1) * 16;
  const TZ* z = static_cast<const TZ*>(p.z);
  const TW* w = static_cast<const TW*>(p.w);
  const int64_t zr = row0 + sr < p.n ? row0 + sr : p.n - 1;
  TZ ra[16];
  TW rb[16];
  auto fetch = [&](int it) {
    const int tile = it / nk;
    const int col = (it - tile * nk) * kChunk + sk;
    const int valid = clamp_count(static_cast<int64_t>(p.d) - col, 16);
    int64_t vr = v_begin + static_cast<int64_t>(tile) * kVocab + sr;
    vr = vr < p.v ? vr : p.v - 1;
    load_n(valid > 0 ? z + zr * p.d + col : z, ra, vec_z, valid);
    load_n(valid > 0 ? w + vr * p.d + col : w, rb, vec_w, valid);
  };
  auto stash = [&](int buf) {
    TC ca[16];
    TC cb[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      ca[i] = convert<TC>(ra[i]);
      cb[i] = convert<TC>(rb[i]);
    }
    store_shared(sa + (buf * kRows + sr) * kLd + sk, ca);
    store_shared(sb + (buf * kVocab + sr) * kLd + sk, cb);
  };

  typename Mma<TC>::Acc acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  // The epilogue's thread -> (row er, columns ep, ep + 2, ...) and its running argmax.
  const int er = tid >> 1;
  const int ep = tid & 1;
  float best = -INFINITY;
  int64_t best_idx = v_begin;

  if (total > 0) fetch(0);
  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    stash(buf);
    __syncthreads();  // the chunk is staged; the other buffer is no longer read
    if (it + 1 < total) fetch(it + 1);
    const TC* a_base = sa + buf * kRows * kLd;
    const TC* b_base = sb + buf * kVocab * kLd;
#pragma unroll
    for (int kk = 0; kk < kChunk; kk += Mma<TC>::kK) {
      TileA<TC> a[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) a[i].load(a_base + (32 * wm + 16 * i) * kLd + kk, kLd);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        TileB<TC, wmma::col_major> b;  // B(k, v) = E[v][k]
        b.load(b_base + (64 * wn + 16 * j) * kLd + kk, kLd);
#pragma unroll
        for (int i = 0; i < 2; ++i) mma(acc[i][j], a[i], b);
      }
    }
    const int tile = it / nk;
    if (it - tile * nk == nk - 1) {  // the tile's last chunk: the argmax epilogue
      const int64_t v0 = v_begin + static_cast<int64_t>(tile) * kVocab;
      __syncthreads();  // every warp is done reading the staged chunk that sc overwrites
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          wmma::store_matrix_sync(sc + (32 * wm + 16 * i) * kLdC + 64 * wn + 16 * j, acc[i][j],
                                  kLdC, wmma::mem_row_major);
          wmma::fill_fragment(acc[i][j], 0.0f);
        }
      }
      if (tid < kVocab) {
        sbias[tid] = v0 + tid < p.v ? (p.bias != nullptr ? p.bias[v0 + tid] : 0.0f) : -INFINITY;
      }
      __syncthreads();
      float tbest = -INFINITY;
      int tcol = ep;
      const float* crow = sc + er * kLdC;
#pragma unroll 8
      for (int j = 0; j < kVocab / 2; ++j) {
        const int col = 2 * j + ep;
        const float score = v0 + col < p.v ? crow[col] + sbias[col] : -INFINITY;
        if (score > tbest) {  // strict: the lowest column keeps a tie
          tbest = score;
          tcol = col;
        }
      }
      const float other = __shfl_xor_sync(0xffffffffu, tbest, 1);
      const int other_col = __shfl_xor_sync(0xffffffffu, tcol, 1);
      if (other > tbest || (other == tbest && other_col < tcol)) {
        tbest = other;
        tcol = other_col;
      }
      if (tbest > best) {  // strict: an earlier tile keeps its tie
        best = tbest;
        best_idx = v0 + tcol;
      }
      __syncthreads();  // sc is read; the next chunk may be staged over it
    }
  }
  const int64_t row = row0 + er;
  if (ep == 0 && row < p.n) {
    if (p.direct) {
      p.ids[row] = best_idx;
    } else {
      p.part_val[static_cast<int64_t>(blockIdx.y) * p.n + row] = best;
      p.part_idx[static_cast<int64_t>(blockIdx.y) * p.n + row] = best_idx;
    }
  }
}

// One warp per row: the largest partial value, ties to the lowest id (partials are never
// NaN: they start at -inf and only grow through a strict '>'), then optionally the row's
// embedding E[id] copied as raw bits of width sizeof(E).
template <typename E>
__global__ void __launch_bounds__(kMergeWarps * 32)
    merge_kernel(const float* __restrict__ part_val, const int64_t* __restrict__ part_idx,
                 int64_t* __restrict__ ids, const E* __restrict__ w, E* __restrict__ emb, int64_t n,
                 int splits, int d, bool vec) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMergeWarps + (threadIdx.x >> 5);
  if (row >= n) return;
  float bv = -INFINITY;
  int64_t bi = LLONG_MAX;
  for (int s = lane; s < splits; s += 32) {
    const float v = part_val[static_cast<int64_t>(s) * n + row];
    const int64_t i = part_idx[static_cast<int64_t>(s) * n + row];
    if (v > bv || (v == bv && i < bi)) {
      bv = v;
      bi = i;
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, offset);
    const long long oi = __shfl_xor_sync(0xffffffffu, static_cast<long long>(bi), offset);
    if (ov > bv || (ov == bv && oi < bi)) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0) ids[row] = bi;
  if (emb == nullptr) return;
  const E* src = w + bi * d;
  E* dst = emb + row * d;
  if (vec) {  // 16-byte words; d * sizeof(E) is a multiple of 16
    const int words = static_cast<int>(static_cast<int64_t>(d) * sizeof(E) / 16);
    for (int c = lane; c < words; c += 32) {
      reinterpret_cast<uint4*>(dst)[c] = __ldg(reinterpret_cast<const uint4*>(src) + c);
    }
  } else {
    for (int c = lane; c < d; c += 32) dst[c] = src[c];
  }
}

// ---- launchers --------------------------------------------------------------------------

// The main kernel over grid (ceil(n / kRows), splits) with p.v_per_split entries per split.
template <typename TZ, typename TW, typename TC>
cudaError_t launch_argmax(const Params& p, int splits, cudaStream_t stream) {
  if (p.n <= 0) return cudaSuccess;
  const bool vec_z = aligned16(p.z) && (static_cast<size_t>(p.d) * sizeof(TZ)) % 16 == 0;
  const bool vec_w = aligned16(p.w) && (static_cast<size_t>(p.d) * sizeof(TW)) % 16 == 0;
  constexpr size_t smem = smem_bytes<TC>();
  auto kernel = argmax_kernel<TZ, TW, TC>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.n + kRows - 1) / kRows), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, smem, stream>>>(p, vec_z, vec_w);
  return cudaGetLastError();
}

// The merge of `splits` partials into ids, and E[ids] into `emb` unless it is nullptr.
// E is the raw element type of the embedding matrix (uint16_t or uint32_t).
template <typename E>
cudaError_t launch_merge(const float* part_val, const int64_t* part_idx, int64_t* ids, const E* w,
                         E* emb, int64_t n, int splits, int d, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const bool vec = aligned16(w) && (emb == nullptr || aligned16(emb)) &&
                   (static_cast<size_t>(d) * sizeof(E)) % 16 == 0;
  const unsigned blocks = static_cast<unsigned>((n + kMergeWarps - 1) / kMergeWarps);
  merge_kernel<E><<<blocks, kMergeWarps * 32, 0, stream>>>(part_val, part_idx, ids, w, emb, n,
                                                          splits, d, vec);
  return cudaGetLastError();
}

}  // namespace rounding
}  // namespace fastdia

// Device helpers shared by fastdia's kernels: dtype conversion, 16-byte vector loads and
// stores, and WMMA tensor-core tiles (bf16/fp16 operands, or fp32 operands as 3xTF32),
// always accumulating in fp32. Header-only; knows nothing of PyTorch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastdia {

namespace wmma = nvcuda::wmma;

// ---- dtypes -----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Exact conversion between the operand types used here (16-bit -> fp32, or identity).
template <typename To, typename From>
__device__ __forceinline__ To convert(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else {
    return from_float<To>(to_float(x));
  }
}

// ---- memory -----------------------------------------------------------------------------

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__host__ __device__ __forceinline__ int clamp_count(int64_t count, int upper) {
  return count <= 0 ? 0 : (count >= upper ? upper : static_cast<int>(count));
}

// N consecutive elements from global memory. With `vec` (the caller guarantees that `src` is
// 16-byte aligned) and all N valid: 16-byte loads through the read-only path. Otherwise
// element by element: the first `valid` elements are read and the rest are zero (elements
// past `valid` are never touched).
template <typename T, int N>
__device__ __forceinline__ void load_n(const T* __restrict__ src, T (&dst)[N], bool vec,
                                       int valid) {
  static_assert((N * sizeof(T)) % 16 == 0, "load_n moves whole 16-byte words");
  if (vec && valid >= N) {
#pragma unroll
    for (int i = 0; i < static_cast<int>(N * sizeof(T) / 16); ++i) {
      const uint4 word = __ldg(reinterpret_cast<const uint4*>(src) + i);
      memcpy(reinterpret_cast<char*>(dst) + 16 * i, &word, 16);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      dst[i] = i < valid ? src[i] : from_float<T>(0.0f);
    }
  }
}

// N float32 values to global memory: 16-byte stores with `vec` (16-byte aligned `dst`) when
// all N are valid, else the first `valid` one by one.
template <int N>
__device__ __forceinline__ void store_f32(float* dst, const float (&src)[N], bool vec, int valid) {
  static_assert(N % 4 == 0, "store_f32 moves whole float4 words");
  if (vec && valid >= N) {
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      reinterpret_cast<float4*>(dst)[i] =
          make_float4(src[4 * i], src[4 * i + 1], src[4 * i + 2], src[4 * i + 3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (i < valid) dst[i] = src[i];
    }
  }
}

// N elements to 16-byte aligned shared memory, 16 bytes at a time.
template <typename T, int N>
__device__ __forceinline__ void store_shared(T* dst, const T (&src)[N]) {
  static_assert((N * sizeof(T)) % 16 == 0, "store_shared moves whole 16-byte words");
#pragma unroll
  for (int i = 0; i < static_cast<int>(N * sizeof(T) / 16); ++i) {
    uint4 word;
    memcpy(&word, reinterpret_cast<const char*>(src) + 16 * i, 16);
    reinterpret_cast<uint4*>(dst)[i] = word;
  }
}

// ---- tensor cores -------------------------------------------------------------------------
//
// Mma<TC> names the 16x16xK WMMA fragments for operands of type TC: K = 16 for fp16/bf16,
// K = 8 for fp32, whose products run as 3xTF32: x = hi + lo with hi = tf32(x) and
// lo = tf32(x - hi), and a*b ~ a_hi*b_hi + a_hi*b_lo + a_lo*b_hi (the dropped a_lo*b_lo is
// about 2**-22 relative), which gives fp32-level accuracy on the TF32 tensor cores.

template <typename TC>
struct Mma;

template <>
struct Mma<float> {
  static constexpr int kK = 8;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  template <typename Layout>
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, Layout>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
};

template <typename T16>
struct Mma16 {
  static constexpr int kK = 16;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 16, T16, wmma::row_major>;
  template <typename Layout>
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 16, T16, Layout>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};
template <>
struct Mma<__half> : Mma16<__half> {};
template <>
struct Mma<__nv_bfloat16> : Mma16<__nv_bfloat16> {};

// Splits a loaded fp32 fragment into its tf32 high part (in place) and low part.
template <typename Frag>
__device__ __forceinline__ void split_tf32(Frag& hi, Frag& lo) {
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float x = hi.x[i];
    const float high = wmma::__float_to_tf32(x);
    lo.x[i] = wmma::__float_to_tf32(x - high);
    hi.x[i] = high;
  }
}

// A 16xK operand tile of the left matrix (row-major in shared memory).
template <typename TC>
struct TileA {
  typename Mma<TC>::A hi;
  __device__ __forceinline__ void load(const TC* p, unsigned ld) {
    wmma::load_matrix_sync(hi, p, ld);
  }
};
template <>
struct TileA<float> {
  Mma<float>::A hi, lo;
  __device__ __forceinline__ void load(const float* p, unsigned ld) {
    wmma::load_matrix_sync(hi, p, ld);
    split_tf32(hi, lo);
  }
};

// A Kx16 operand tile of the right matrix in shared memory, `Layout` row- or column-major.
template <typename TC, typename Layout>
struct TileB {
  typename Mma<TC>::template B<Layout> hi;
  __device__ __forceinline__ void load(const TC* p, unsigned ld) {
    wmma::load_matrix_sync(hi, p, ld);
  }
};
template <typename Layout>
struct TileB<float, Layout> {
  typename Mma<float>::template B<Layout> hi, lo;
  __device__ __forceinline__ void load(const float* p, unsigned ld) {
    wmma::load_matrix_sync(hi, p, ld);
    split_tf32(hi, lo);
  }
};

// acc += a * b on the tensor cores (three TF32 products for fp32 operands, small terms first).
template <typename TC, typename Layout>
__device__ __forceinline__ void mma(typename Mma<TC>::Acc& acc, const TileA<TC>& a,
                                    const TileB<TC, Layout>& b) {
  if constexpr (std::is_same_v<TC, float>) {
    wmma::mma_sync(acc, a.lo, b.hi, acc);
    wmma::mma_sync(acc, a.hi, b.lo, acc);
  }
  wmma::mma_sync(acc, a.hi, b.hi, acc);
}

}  // namespace fastdia

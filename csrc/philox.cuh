// Counter-based Gaussian noise numbered exactly as fastdia.noise and Triton's tl.randn4x.
//
// The Gaussian for element k (the row-major flat index, 0 <= k < 2**31) of step `step`
// under user seed `seed` is lane k % 4 of tl.randn4x(key, k / 4) with the 64-bit key
// (seed << 32) | step: Philox4x32-10 on the counter (k / 4, 0, 0, 0) with key words
// (k0, k1) = (step, seed), so one draw serves four consecutive elements (a group). The four
// words map to uniforms u1..u4 in [0, 1) (bitcast to int32, negatives to -x - 1, times
// 4.6566127342e-10f); u1 and u3 are clamped to >= 1e-7; lanes 0 and 1 are r cos(2 pi u2) and
// r sin(2 pi u2) with r = sqrt(-2 log u1), lanes 2 and 3 the same of (u3, u4), all in fp32.
// The Philox integers are bit-identical to Triton's and to the PyTorch reference; the floats
// agree to the rounding of log/sqrt/cos/sin.
//
// Everything here is __host__ __device__ so a host program can pin the integers to the
// reference without a GPU (tests/csrc/philox_host.cu).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTDIA_HD __host__ __device__ __forceinline__
#else
#define FASTDIA_HD inline
#endif
#if defined(__CUDA_ARCH__)
#define FASTDIA_UNROLL _Pragma("unroll")
#else
#define FASTDIA_UNROLL
#endif

namespace fastdia {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;    // key increment of word 0
constexpr uint32_t kKeyB = 0xBB67AE85u;    // key increment of word 1
constexpr uint32_t kRoundA = 0xD2511F53u;  // round multiplier of counter word 0
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // round multiplier of counter word 2
constexpr int kRounds = 10;
constexpr float kUniformScale = 4.6566127342e-10f;  // Triton's int32 -> [0, 1) scale
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kU1Min = 1.0e-7f;

struct Words {
  uint32_t w0, w1, w2, w3;
};

// High 32 bits of the 64-bit product a * b.
FASTDIA_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds, as Triton's philox_impl.
FASTDIA_HD Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
FASTDIA_UNROLL
  for (int round = 0; round < kRounds; ++round) {
    const uint32_t a0 = c0;
    const uint32_t a2 = c2;
    c0 = mulhi(kRoundB, a2) ^ c1 ^ k0;
    c2 = mulhi(kRoundA, a0) ^ c3 ^ k1;
    c1 = kRoundB * a2;
    c3 = kRoundA * a0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return {c0, c1, c2, c3};
}

// The 64-bit Triton key (seed << 32) | step; seed and step lie in [0, 2**31).
FASTDIA_HD uint64_t make_key(int64_t seed, int64_t step) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(seed)) << 32) |
         static_cast<uint64_t>(static_cast<uint32_t>(step));
}

// The four Philox words of counter (counter, 0, 0, 0) under `key` (tl.randint4x).
FASTDIA_HD Words randint4x(uint64_t key, uint32_t counter) {
  return philox4x32_10(counter, 0u, 0u, 0u, static_cast<uint32_t>(key),
                       static_cast<uint32_t>(key >> 32));
}

// Triton's uint_to_uniform_float for a 32-bit word: bitcast to int32, negatives s map to
// -s - 1 (here 0xFFFFFFFF - x, which avoids the signed overflow of -INT32_MIN), times the
// scale; the result lies in [0, 1).
FASTDIA_HD float uniform(uint32_t x) {
  const uint32_t folded = x >= 0x80000000u ? 0xFFFFFFFFu - x : x;
  return static_cast<float>(static_cast<int32_t>(folded)) * kUniformScale;
}

// The four Gaussians of group `group` (tl.randn4x(key, group)), lanes 0..3.
struct Normals {
  float n0, n1, n2, n3;

  // Lane `lane` (0..3), without indexing a local array (no local memory on the device).
  FASTDIA_HD float lane(uint32_t l) const {
    return l < 2u ? (l == 0u ? n0 : n1) : (l == 2u ? n2 : n3);
  }
};

FASTDIA_HD Normals randn4(uint64_t key, uint32_t group) {
  const Words w = randint4x(key, group);
  const float r01 = sqrtf(-2.0f * logf(fmaxf(kU1Min, uniform(w.w0))));
  const float r23 = sqrtf(-2.0f * logf(fmaxf(kU1Min, uniform(w.w2))));
  const float t01 = kTwoPi * uniform(w.w1);
  const float t23 = kTwoPi * uniform(w.w3);
  return {r01 * cosf(t01), r01 * sinf(t01), r23 * cosf(t23), r23 * sinf(t23)};
}

// The Gaussian of element k alone (one draw for one element: prefer randn_span).
FASTDIA_HD float randn(uint64_t key, uint32_t k) { return randn4(key, k >> 2).lane(k & 3u); }

// The Gaussians of elements k0 .. k0 + count - 1 into out[0 .. count) (count <= N), one
// draw per group the span touches: a span of N = 4 m elements starting at a multiple of 4
// costs m draws. Lanes past `count` are left as they are.
template <int N>
FASTDIA_HD void randn_span(uint64_t key, int64_t k0, float (&out)[N], int count) {
  Normals group = randn4(key, static_cast<uint32_t>(k0 >> 2));
FASTDIA_UNROLL
  for (int i = 0; i < N; ++i) {
    if (i >= count) break;
    const auto k = static_cast<uint32_t>(k0 + i);
    if (i > 0 && (k & 3u) == 0u) group = randn4(key, k >> 2);
    out[i] = group.lane(k & 3u);
  }
}

}  // namespace philox
}  // namespace fastdia

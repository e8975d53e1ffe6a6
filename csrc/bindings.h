// The thin torch bindings of fastdia's CUDA kernels, shared by the .cu files that implement
// them (input checks, device guard, current stream, dtype dispatch) and ops.cpp, which
// allocates outputs and registers the ops with TORCH_LIBRARY. Only ATen's TensorBase is
// used here, so the .cu files stay lean to compile.
#pragma once

#include <ATen/core/TensorBase.h>

#include <cstdint>

namespace fastdia {

// One guided_step call. Optional tensors are undefined (at::TensorBase()) when absent.
struct GuidedStepArgs {
  at::TensorBase z;         // [N, d] float32/float16/bfloat16, contiguous
  at::TensorBase eps;       // [N, d] z's dtype, contiguous
  at::TensorBase coef;      // [4] or [B, 4] float32, contiguous
  at::TensorBase seed;      // 1 element, int64
  at::TensorBase step;      // 1 element, int64
  at::TensorBase guidance;  // 1 element, float32
  at::TensorBase grad;      // [N, d] z's dtype, contiguous, or undefined
  at::TensorBase w1;        // [H, d] float32, contiguous, or undefined (no critic)
  at::TensorBase b1;        // [H] float32
  at::TensorBase w2;        // [H] float32
  at::TensorBase b2;        // 1 element, float32
  at::TensorBase out;       // [N, d] float32, contiguous (written)
  at::TensorBase h;         // [B] float32 (written) when return_h and a critic, else any
  int64_t seq_len = 1;
  double noise_kappa = 0.0;
  bool return_h = false;
  int64_t d_groups = 0;     // column groups of the critic kernel; <= 0: automatic
};

// Runs the step on the current stream of z's device. Throws c10::Error on bad input.
void guided_step_cuda(const GuidedStepArgs& args);

// Dynamic shared memory (bytes) a block of the critic kernel needs for `hidden` units.
int64_t guided_step_smem_bytes(int64_t hidden);

// Vocabulary split of one round_to_vocab call.
struct RoundPlan {
  int64_t splits;           // blocks along the vocabulary
  int64_t vocab_per_split;  // entries per split (a multiple of the kernel's tile)
};

// The split for z [N, d] against weight [V, d] on z's device; `requested` <= 0: automatic.
RoundPlan round_to_vocab_plan(const at::TensorBase& z, const at::TensorBase& weight,
                              int64_t requested);

// One round_to_vocab call.
struct RoundArgs {
  at::TensorBase z;           // [N, d] float32/float16/bfloat16, contiguous
  at::TensorBase weight;      // [V, d] z's dtype (or 16-bit when z is float32), contiguous
  at::TensorBase bias;        // [V] float32, contiguous, or undefined
  at::TensorBase ids;         // [N] int64, contiguous (written)
  at::TensorBase embeddings;  // [N, d] weight's dtype (written) when return_embeddings
  at::TensorBase part_val;    // [splits, N] float32 workspace unless direct
  at::TensorBase part_idx;    // [splits, N] int64 workspace unless direct
  RoundPlan plan;
  bool return_embeddings = false;
};

// Runs the rounding on the current stream of z's device. Throws c10::Error on bad input.
void round_to_vocab_cuda(const RoundArgs& args);

}  // namespace fastdia

// Registers fastdia's CUDA ops with TORCH_LIBRARY as the namespace fastdia_cuda:
//
//   guided_step(z, eps, coef, seed, step, guidance, grad?, w1?, b1?, w2?, b2?, seq_len,
//               noise_kappa, return_h, d_groups=0) -> (out [N, d] float32, h [B] or [0])
//   guided_step_out(..., Tensor(a!) out, Tensor(b!) h_out) -> ()
//   round_to_vocab(z, weight, bias?, return_embeddings, num_splits)
//       -> (ids [N] int64, embeddings [N, d] or [0] in weight's dtype)
//   round_to_vocab_out(..., Tensor(a!) ids, Tensor(b!) embeddings) -> ()
//   guided_step_smem_bytes(hidden) -> int
//
// The CUDA implementations allocate outputs and workspaces here and call the bindings in
// guided_step.cu and round_to_vocab.cu; the fake (meta) implementations that torch.compile
// traces with are registered from Python (fastdia/ops/cuda_ops.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "bindings.h"

namespace fastdia {
namespace {

at::TensorBase optional_base(const std::optional<at::Tensor>& t) {
  return t.has_value() ? at::TensorBase(*t) : at::TensorBase();
}

GuidedStepArgs guided_args(const at::Tensor& z, const at::Tensor& eps, const at::Tensor& coef,
                           const at::Tensor& seed, const at::Tensor& step,
                           const at::Tensor& guidance, const std::optional<at::Tensor>& grad,
                           const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1,
                           const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                           int64_t seq_len, double noise_kappa, bool return_h, int64_t d_groups) {
  GuidedStepArgs args;
  args.z = z;
  args.eps = eps;
  args.coef = coef;
  args.seed = seed;
  args.step = step;
  args.guidance = guidance;
  args.grad = optional_base(grad);
  args.w1 = optional_base(w1);
  args.b1 = optional_base(b1);
  args.w2 = optional_base(w2);
  args.b2 = optional_base(b2);
  args.seq_len = seq_len;
  args.noise_kappa = noise_kappa;
  args.return_h = return_h;
  args.d_groups = d_groups;
  return args;
}

std::tuple<at::Tensor, at::Tensor> guided_step(
    const at::Tensor& z, const at::Tensor& eps, const at::Tensor& coef, const at::Tensor& seed,
    const at::Tensor& step, const at::Tensor& guidance, const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2, int64_t seq_len,
    double noise_kappa, bool return_h, int64_t d_groups) {
  TORCH_CHECK(z.dim() == 2, "guided_step: z must be [N, d], got shape ", z.sizes());
  TORCH_CHECK(seq_len >= 1, "guided_step: seq_len must be >= 1, got ", seq_len);
  GuidedStepArgs args = guided_args(z, eps, coef, seed, step, guidance, grad, w1, b1, w2, b2,
                                    seq_len, noise_kappa, return_h, d_groups);
  const at::TensorOptions f32 = z.options().dtype(at::kFloat);
  at::Tensor out = at::empty({z.size(0), z.size(1)}, f32);
  const bool want_h = return_h && w1.has_value();
  at::Tensor h = at::empty({want_h ? z.size(0) / seq_len : 0}, f32);
  args.out = out;
  args.h = h;
  guided_step_cuda(args);
  return {out, h};
}

void guided_step_out(const at::Tensor& z, const at::Tensor& eps, const at::Tensor& coef,
                     const at::Tensor& seed, const at::Tensor& step, const at::Tensor& guidance,
                     const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& w1,
                     const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                     const std::optional<at::Tensor>& b2, int64_t seq_len, double noise_kappa,
                     bool return_h, int64_t d_groups, const at::Tensor& out,
                     const at::Tensor& h_out) {
  GuidedStepArgs args = guided_args(z, eps, coef, seed, step, guidance, grad, w1, b1, w2, b2,
                                    seq_len, noise_kappa, return_h, d_groups);
  args.out = out;
  args.h = h_out;
  guided_step_cuda(args);
}

RoundArgs round_args(const at::Tensor& z, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, bool return_embeddings,
                     int64_t num_splits) {
  RoundArgs args;
  args.z = z;
  args.weight = weight;
  args.bias = optional_base(bias);
  args.return_embeddings = return_embeddings;
  args.plan = round_to_vocab_plan(z, weight, num_splits);
  if (args.plan.splits > 1 || return_embeddings) {
    const int64_t n = z.size(0);
    args.part_val = at::empty({args.plan.splits, n}, z.options().dtype(at::kFloat));
    args.part_idx = at::empty({args.plan.splits, n}, z.options().dtype(at::kLong));
  }
  return args;
}

std::tuple<at::Tensor, at::Tensor> round_to_vocab(const at::Tensor& z, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  bool return_embeddings, int64_t num_splits) {
  TORCH_CHECK(z.dim() == 2 && weight.dim() == 2,
              "round_to_vocab: need z [N, d] and weight [V, d], got ", z.sizes(), " and ",
              weight.sizes());
  RoundArgs args = round_args(z, weight, bias, return_embeddings, num_splits);
  at::Tensor ids = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  at::Tensor emb = at::empty({return_embeddings ? z.size(0) : 0, return_embeddings ? z.size(1) : 0},
                             weight.options());
  args.ids = ids;
  args.embeddings = emb;
  round_to_vocab_cuda(args);
  return {ids, emb};
}

void round_to_vocab_out(const at::Tensor& z, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, bool return_embeddings,
                        int64_t num_splits, const at::Tensor& ids, const at::Tensor& embeddings) {
  TORCH_CHECK(z.dim() == 2 && weight.dim() == 2,
              "round_to_vocab: need z [N, d] and weight [V, d], got ", z.sizes(), " and ",
              weight.sizes());
  RoundArgs args = round_args(z, weight, bias, return_embeddings, num_splits);
  args.ids = ids;
  args.embeddings = embeddings;
  round_to_vocab_cuda(args);
}

}  // namespace
}  // namespace fastdia

TORCH_LIBRARY(fastdia_cuda, m) {
  m.def(
      "guided_step(Tensor z, Tensor eps, Tensor coef, Tensor seed, Tensor step, Tensor guidance, "
      "Tensor? grad, Tensor? w1, Tensor? b1, Tensor? w2, Tensor? b2, int seq_len, "
      "float noise_kappa, bool return_h, int d_groups=0) -> (Tensor, Tensor)");
  m.def(
      "guided_step_out(Tensor z, Tensor eps, Tensor coef, Tensor seed, Tensor step, "
      "Tensor guidance, Tensor? grad, Tensor? w1, Tensor? b1, Tensor? w2, Tensor? b2, "
      "int seq_len, float noise_kappa, bool return_h, int d_groups, Tensor(a!) out, "
      "Tensor(b!) h_out) -> ()");
  m.def(
      "round_to_vocab(Tensor z, Tensor weight, Tensor? bias, bool return_embeddings, "
      "int num_splits) -> (Tensor, Tensor)");
  m.def(
      "round_to_vocab_out(Tensor z, Tensor weight, Tensor? bias, bool return_embeddings, "
      "int num_splits, Tensor(a!) ids, Tensor(b!) embeddings) -> ()");
  m.def("guided_step_smem_bytes(int hidden) -> int", &fastdia::guided_step_smem_bytes);
}

TORCH_LIBRARY_IMPL(fastdia_cuda, CUDA, m) {
  m.impl("guided_step", &fastdia::guided_step);
  m.impl("guided_step_out", &fastdia::guided_step_out);
  m.impl("round_to_vocab", &fastdia::round_to_vocab);
  m.impl("round_to_vocab_out", &fastdia::round_to_vocab_out);
}

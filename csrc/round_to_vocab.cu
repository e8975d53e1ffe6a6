// The torch binding of round_to_vocab (csrc/round_to_vocab.cuh): input checks, device
// guard, current stream, dtype dispatch. Registered as fastdia_cuda::round_to_vocab in ops.cpp.
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "bindings.h"
#include "round_to_vocab.cuh"

namespace fastdia {
namespace {

void expect(const at::TensorBase& t, const char* name, const c10::Device& device,
            at::ScalarType dtype, c10::IntArrayRef sizes) {
  TORCH_CHECK(t.defined(), "round_to_vocab: ", name, " is missing");
  TORCH_CHECK(t.device() == device, "round_to_vocab: ", name, " is on ", t.device(),
              " but z is on ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "round_to_vocab: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, "round_to_vocab: ", name, " must have shape ", sizes, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "round_to_vocab: ", name, " must be contiguous");
}

bool is_supported(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

template <typename TZ, typename TW, typename TC>
cudaError_t launch(const rounding::Params& p, int splits, cudaStream_t stream) {
  return rounding::launch_argmax<TZ, TW, TC>(p, splits, stream);
}

}  // namespace

RoundPlan round_to_vocab_plan(const at::TensorBase& z, const at::TensorBase& weight,
                              int64_t requested) {
  TORCH_CHECK(z.defined() && z.is_cuda() && z.dim() == 2,
              "round_to_vocab: z must be a CUDA [N, d] tensor");
  TORCH_CHECK(weight.defined() && weight.dim() == 2 && weight.size(0) >= 1,
              "round_to_vocab: weight must be [V, d] with V >= 1");
  const int64_t n = z.size(0);
  const int64_t v = weight.size(0);
  int64_t splits = requested;
  if (splits <= 0) {
    int sms = 0;
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, z.device().index()));
    splits = rounding::num_splits(n, v, sms);
  }
  splits = splits > 65535 ? 65535 : splits;
  const int64_t per = rounding::vocab_per_split(v, splits);
  return {(v + per - 1) / per, per};
}

void round_to_vocab_cuda(const RoundArgs& a) {
  const at::TensorBase& z = a.z;
  TORCH_CHECK(z.defined() && z.is_cuda(), "round_to_vocab: z must be a CUDA tensor");
  TORCH_CHECK(z.dim() == 2, "round_to_vocab: z must be [N, d], got shape ", z.sizes());
  const c10::Device device = z.device();
  const int64_t n = z.size(0);
  const int64_t d = z.size(1);
  TORCH_CHECK(a.weight.defined() && a.weight.dim() == 2 && a.weight.size(1) == d,
              "round_to_vocab: weight must be [V, d = ", d, "]");
  const int64_t v = a.weight.size(0);
  TORCH_CHECK(v >= 1, "round_to_vocab: the vocabulary is empty");
  TORCH_CHECK(v < (int64_t{1} << 31) && d < (int64_t{1} << 31),
              "round_to_vocab: V and d must be < 2**31");
  const at::ScalarType zt = z.scalar_type();
  const at::ScalarType wt = a.weight.scalar_type();
  TORCH_CHECK(is_supported(zt) && is_supported(wt),
              "round_to_vocab: z and weight must be float32, float16 or bfloat16, got ", zt,
              " and ", wt);
  TORCH_CHECK(zt == wt || zt == at::kFloat, "round_to_vocab: a ", zt, " z with a ", wt,
              " weight is not supported: cast z to float32");
  expect(z, "z", device, zt, {n, d});
  expect(a.weight, "weight", device, wt, {v, d});
  if (a.bias.defined()) expect(a.bias, "bias", device, at::kFloat, {v});
  expect(a.ids, "ids", device, at::kLong, {n});
  if (a.return_embeddings) expect(a.embeddings, "embeddings", device, wt, {n, d});
  const int64_t splits = a.plan.splits;
  TORCH_CHECK(splits >= 1 && splits <= 65535 && a.plan.vocab_per_split >= 1 &&
                  a.plan.vocab_per_split % rounding::kVocab == 0 &&
                  (splits - 1) * a.plan.vocab_per_split < v && splits * a.plan.vocab_per_split >= v,
              "round_to_vocab: bad vocabulary split");
  const bool direct = splits == 1 && !a.return_embeddings;
  if (!direct) {
    expect(a.part_val, "part_val", device, at::kFloat, {splits, n});
    expect(a.part_idx, "part_idx", device, at::kLong, {splits, n});
  }
  if (n == 0) return;

  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  rounding::Params p{};
  p.z = z.const_data_ptr();
  p.w = a.weight.const_data_ptr();
  p.bias = a.bias.defined() ? static_cast<const float*>(a.bias.const_data_ptr()) : nullptr;
  p.ids = static_cast<int64_t*>(a.ids.mutable_data_ptr());
  if (!direct) {
    p.part_val = static_cast<float*>(a.part_val.mutable_data_ptr());
    p.part_idx = static_cast<int64_t*>(a.part_idx.mutable_data_ptr());
  }
  p.n = n;
  p.v = v;
  p.d = static_cast<int>(d);
  p.v_per_split = a.plan.vocab_per_split;
  p.direct = direct;

  const int s = static_cast<int>(splits);
  cudaError_t err = cudaSuccess;
  if (zt == at::kFloat && wt == at::kFloat) {
    err = launch<float, float, float>(p, s, stream);
  } else if (zt == at::kHalf && wt == at::kHalf) {
    err = launch<__half, __half, __half>(p, s, stream);
  } else if (zt == at::kBFloat16 && wt == at::kBFloat16) {
    err = launch<__nv_bfloat16, __nv_bfloat16, __nv_bfloat16>(p, s, stream);
  } else if (wt == at::kHalf) {  // float32 z, float16 weight: fp32 products
    err = launch<float, __half, float>(p, s, stream);
  } else {  // float32 z, bfloat16 weight: fp32 products
    err = launch<float, __nv_bfloat16, float>(p, s, stream);
  }
  C10_CUDA_CHECK(err);
  if (direct) return;

  void* emb = a.return_embeddings ? a.embeddings.mutable_data_ptr() : nullptr;
  if (a.weight.element_size() == 2) {  // E[ids] copied as raw 16-bit words
    err = rounding::launch_merge<uint16_t>(p.part_val, p.part_idx, p.ids,
                                           static_cast<const uint16_t*>(p.w),
                                           static_cast<uint16_t*>(emb), n, s, p.d, stream);
  } else {
    err = rounding::launch_merge<uint32_t>(p.part_val, p.part_idx, p.ids,
                                           static_cast<const uint32_t*>(p.w),
                                           static_cast<uint32_t*>(emb), n, s, p.d, stream);
  }
  C10_CUDA_CHECK(err);
}

}  // namespace fastdia

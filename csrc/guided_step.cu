// The torch binding of guided_step (csrc/guided_step.cuh): input checks, device guard,
// current stream, dtype dispatch. Registered as fastdia_cuda::guided_step in ops.cpp.
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "bindings.h"
#include "guided_step.cuh"

namespace fastdia {
namespace {

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// A defined, contiguous tensor of `dtype` and `sizes` on `device`.
void expect(const at::TensorBase& t, const char* name, const c10::Device& device,
            at::ScalarType dtype, c10::IntArrayRef sizes) {
  TORCH_CHECK(t.defined(), "guided_step: ", name, " is missing");
  TORCH_CHECK(t.device() == device, "guided_step: ", name, " is on ", t.device(), " but z is on ",
              device);
  TORCH_CHECK(t.scalar_type() == dtype, "guided_step: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, "guided_step: ", name, " must have shape ", sizes, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "guided_step: ", name, " must be contiguous");
}

// A one-element tensor of `dtype` on `device` (read by the kernel: graph safe).
void expect_scalar(const at::TensorBase& t, const char* name, const c10::Device& device,
                   at::ScalarType dtype) {
  TORCH_CHECK(t.defined() && t.numel() == 1, "guided_step: ", name,
              " must be a one-element tensor");
  TORCH_CHECK(t.device() == device, "guided_step: ", name, " is on ", t.device(), " but z is on ",
              device);
  TORCH_CHECK(t.scalar_type() == dtype, "guided_step: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

}  // namespace

int64_t guided_step_smem_bytes(int64_t hidden) {
  TORCH_CHECK(hidden >= 0 && hidden < (int64_t{1} << 24), "guided_step: bad hidden width ", hidden);
  return static_cast<int64_t>(guided::tile_smem_bytes(static_cast<int>(hidden)));
}

void guided_step_cuda(const GuidedStepArgs& a) {
  const at::TensorBase& z = a.z;
  TORCH_CHECK(z.defined() && z.is_cuda(), "guided_step: z must be a CUDA tensor");
  TORCH_CHECK(z.dim() == 2, "guided_step: z must be [N, d], got shape ", z.sizes());
  const c10::Device device = z.device();
  const int64_t n = z.size(0);
  const int64_t d = z.size(1);
  TORCH_CHECK(a.seq_len >= 1 && n % a.seq_len == 0, "guided_step: N = ", n,
              " tokens is not a multiple of seq_len = ", a.seq_len);
  TORCH_CHECK(n * d < (int64_t{1} << 31), "guided_step: N * d = ", n * d,
              " must be < 2**31 (the noise counter is the int32 element index)");
  TORCH_CHECK(a.noise_kappa >= 0.0, "guided_step: noise_kappa must be >= 0, got ", a.noise_kappa);
  TORCH_CHECK(a.d_groups >= 0 && a.d_groups <= 65535, "guided_step: d_groups must be in [0, 65535]");
  const at::ScalarType dtype = z.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "guided_step: z must be float32, float16 or bfloat16, got ", dtype);
  const int64_t batch = n / a.seq_len;
  expect(z, "z", device, dtype, {n, d});
  expect(a.eps, "eps", device, dtype, {n, d});
  if (a.grad.defined()) expect(a.grad, "grad", device, dtype, {n, d});
  TORCH_CHECK(a.coef.defined() && a.coef.dim() >= 1 && a.coef.size(-1) == 4,
              "guided_step: coef must be [4] or [B, 4]");
  const bool per_sample = a.coef.dim() == 2;
  if (per_sample) {
    expect(a.coef, "coef", device, at::kFloat, {batch, 4});
  } else {
    expect(a.coef, "coef", device, at::kFloat, {4});
  }
  expect(a.seed, "seed (one per sequence)", device, at::kLong, {batch});
  expect_scalar(a.step, "step", device, at::kLong);
  expect_scalar(a.guidance, "guidance", device, at::kFloat);
  expect(a.out, "out", device, at::kFloat, {n, d});

  const bool has_critic = a.w1.defined();
  int64_t hidden = 0;
  if (has_critic) {
    TORCH_CHECK(a.w1.dim() == 2, "guided_step: critic w1 must be [H, d]");
    hidden = a.w1.size(0);
    expect(a.w1, "w1", device, at::kFloat, {hidden, d});
    expect(a.b1, "b1 (one row of the step table: pass stack.row(r))", device, at::kFloat, {hidden});
    expect(a.w2, "w2", device, at::kFloat, {hidden});
    expect_scalar(a.b2, "b2", device, at::kFloat);
  }
  const bool want_h = has_critic && a.return_h;
  if (want_h) expect(a.h, "h", device, at::kFloat, {batch});
  if (n == 0 || d == 0) return;

  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  if (has_critic) {
    const int64_t needed = guided_step_smem_bytes(hidden);
    const int limit = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device.index());
    TORCH_CHECK(needed <= limit, "guided_step: a critic stack of H = ", hidden, " units needs ",
                needed, " bytes of shared memory per block, more than this device's ", limit,
                " (use fewer or narrower critics, or the triton or reference backend)");
  }

  guided::Params p{};
  p.z = z.const_data_ptr();
  p.eps = a.eps.const_data_ptr();
  p.grad = a.grad.defined() ? a.grad.const_data_ptr() : nullptr;
  p.out = static_cast<float*>(a.out.mutable_data_ptr());
  p.h = want_h ? static_cast<float*>(a.h.mutable_data_ptr()) : nullptr;
  p.coef = static_cast<const float*>(a.coef.const_data_ptr());
  p.seed = static_cast<const int64_t*>(a.seed.const_data_ptr());
  p.step = static_cast<const int64_t*>(a.step.const_data_ptr());
  p.guidance = static_cast<const float*>(a.guidance.const_data_ptr());
  if (has_critic) {
    p.w1 = static_cast<const float*>(a.w1.const_data_ptr());
    p.b1 = static_cast<const float*>(a.b1.const_data_ptr());
    p.w2 = static_cast<const float*>(a.w2.const_data_ptr());
    p.b2 = static_cast<const float*>(a.b2.const_data_ptr());
  }
  p.kappa = static_cast<float>(a.noise_kappa);
  p.n = n;
  p.d = static_cast<int>(d);
  p.hidden = static_cast<int>(hidden);
  p.seq_len = static_cast<int>(a.seq_len);
  p.per_sample = per_sample;

  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device.index());
  const int groups = static_cast<int>(a.d_groups);
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case at::kFloat:
      err = guided::launch_guided_step<float>(p, stream, sms, groups);
      break;
    case at::kHalf:
      err = guided::launch_guided_step<__half>(p, stream, sms, groups);
      break;
    case at::kBFloat16:
      err = guided::launch_guided_step<__nv_bfloat16>(p, stream, sms, groups);
      break;
    default:
      TORCH_CHECK(false, "guided_step: unsupported dtype ", dtype);
  }
  C10_CUDA_CHECK(err);
}

}  // namespace fastdia

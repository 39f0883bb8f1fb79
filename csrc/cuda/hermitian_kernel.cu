// CUDA registration of the batched Hermitian ops: their device-agnostic ATen forms
// (csrc/hermitian_common.cpp; cuSOLVER's batched Cholesky and cuBLAS's batched products).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "hermitian.h"

namespace {

at::Tensor hermitian_cholesky_test_cuda(const at::Tensor& re, const at::Tensor& im, const at::Tensor& shift) {
  const c10::cuda::OptionalCUDAGuard guard(re.device());
  return lipfast::hermitian_cholesky_test_aten(re, im, shift);
}

at::Tensor hermitian_power_gain_cuda(const at::Tensor& re, const at::Tensor& im, const at::Tensor& start,
                                     int64_t steps) {
  const c10::cuda::OptionalCUDAGuard guard(re.device());
  return lipfast::hermitian_power_gain_aten(re, im, start, steps);
}

std::tuple<at::Tensor, at::Tensor> hermitian_gram_cuda(const at::Tensor& S, int64_t p, bool negate) {
  const c10::cuda::OptionalCUDAGuard guard(S.device());
  return lipfast::hermitian_gram_aten(S, p, negate);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CUDA, m) {
  m.impl("hermitian_cholesky_test", &hermitian_cholesky_test_cuda);
  m.impl("hermitian_power_gain", &hermitian_power_gain_cuda);
  m.impl("hermitian_gram", &hermitian_gram_cuda);
}

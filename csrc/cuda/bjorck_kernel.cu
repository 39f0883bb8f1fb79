// CUDA registration of the Björck–Bowie step: its ATen form (csrc/bjorck_common.cpp; cuBLAS products).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bjorck.h"

namespace {

std::tuple<at::Tensor, at::Tensor> bjorck_step_cuda(const at::Tensor& Q, double beta) {
  const c10::cuda::OptionalCUDAGuard guard(Q.device());
  return lipfast::bjorck_step_aten(Q, beta);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CUDA, m) { m.impl("bjorck_step", &bjorck_step_cuda); }

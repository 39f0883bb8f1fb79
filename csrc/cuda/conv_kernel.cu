// CUDA registration of the convolution-operator op.  The loop is the device-agnostic ATen code of
// csrc/conv_common.cpp: each pass is one cuDNN convolution and one transposed convolution, launched
// by ATen on the current stream of the weight's device.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "conv.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_spectral_norm_cuda(
    const at::Tensor& weight, const std::optional<at::Tensor>& v0, at::IntArrayRef input_size,
    at::IntArrayRef stride, at::IntArrayRef pad_lo, at::IntArrayRef pad_hi, at::IntArrayRef dilation,
    int64_t groups, c10::string_view padding_mode, at::IntArrayRef output_size, int64_t max_iters, double rtol,
    std::optional<double> upper) {
  const c10::cuda::OptionalCUDAGuard guard(weight.device());
  return lipfast::conv_spectral_norm(weight, v0, input_size, stride, pad_lo, pad_hi, dilation, groups, padding_mode,
                                     output_size, max_iters, rtol, upper);
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CUDA, m) {
  m.impl("conv_spectral_norm", &conv_spectral_norm_cuda);
}

// The convolution-operator op family: a conv layer's linear map in canonical form
//     x (C_in, *input_size) -> crop(conv(pad(x))) (C_out, *output_size)
// (pad: pad_lo / pad_hi entries per side by padding_mode; conv: no padding, given stride, dilation
// and groups; crop: the first output_size outputs per dim), written with ATen operators only, so
// that one implementation serves every device.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace lipfast {

// Lanczos on AᵀA for the operator A above: (sigma, u (C_out, *output_size), v (C_in, *input_size),
// rel_err (float64, 0-dim)); see the schema in csrc/lipfast.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_spectral_norm(
    const at::Tensor& weight, const std::optional<at::Tensor>& v0, at::IntArrayRef input_size,
    at::IntArrayRef stride, at::IntArrayRef pad_lo, at::IntArrayRef pad_hi, at::IntArrayRef dilation,
    int64_t groups, c10::string_view padding_mode, at::IntArrayRef output_size, int64_t max_iters, double rtol,
    std::optional<double> upper);

}  // namespace lipfast

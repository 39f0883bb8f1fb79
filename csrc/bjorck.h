// The Björck–Bowie step (lipfast.nn.orthogonal): argument checks and the device-agnostic ATen form.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace lipfast {

// Checks Q (m, n) float32 or float64 and beta finite; raises naming the argument.
void check_bjorck_args(const at::Tensor& Q, double beta);

// (out, G): G = QᵀQ, out = (1 + beta) Q - beta Q G (one addmm).
std::tuple<at::Tensor, at::Tensor> bjorck_step_aten(const at::Tensor& Q, double beta);

}  // namespace lipfast

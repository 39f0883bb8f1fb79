// The batched Hermitian op family: helpers of the circulant bound (lipfast/conv.py), which holds
// each frequency's Gram matrix H = H_re + i H_im as two real (B, q, q) tensors (H_re symmetric,
// H_im antisymmetric; only their lower triangles are read).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace lipfast {

// Checks re, im (B, q, q) and shift (B,) (start (2, q) for the power gain): one floating dtype, one
// device, square matrices; raises naming the argument.
void check_hermitian_args(const char* op, const at::Tensor& re, const at::Tensor& im, const at::Tensor& other,
                          bool other_is_start);

// Checks S (B, 2p, q) float32 or float64 and p >= 1 for hermitian_gram; raises naming the argument.
void check_gram_args(const char* op, const at::Tensor& S, int64_t p);

// The device-agnostic ATen forms (the CUDA registration; the CPU has its own kernels).
at::Tensor hermitian_cholesky_test_aten(const at::Tensor& re, const at::Tensor& im, const at::Tensor& shift);
at::Tensor hermitian_power_gain_aten(const at::Tensor& re, const at::Tensor& im, const at::Tensor& start,
                                     int64_t steps);
std::tuple<at::Tensor, at::Tensor> hermitian_gram_aten(const at::Tensor& S, int64_t p, bool negate);

}  // namespace lipfast

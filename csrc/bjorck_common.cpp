// Argument checks and the ATen form of the Björck–Bowie step (csrc/bjorck.h).
#include "bjorck.h"

#include <ATen/ATen.h>

#include <cmath>

namespace lipfast {

void check_bjorck_args(const at::Tensor& Q, double beta) {
  TORCH_CHECK_VALUE(Q.dim() == 2, "bjorck_step: Q must be a matrix (m, n), got shape ", Q.sizes());
  TORCH_CHECK_VALUE(Q.scalar_type() == at::kFloat || Q.scalar_type() == at::kDouble,
                    "bjorck_step: Q must be float32 or float64, got ", Q.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(beta), "bjorck_step: beta must be finite, got ", beta);
}

std::tuple<at::Tensor, at::Tensor> bjorck_step_aten(const at::Tensor& Q, double beta) {
  check_bjorck_args(Q, beta);
  at::Tensor G = at::mm(Q.mT(), Q);
  return {at::addmm(Q, Q, G, 1 + beta, -beta), G};
}

}  // namespace lipfast

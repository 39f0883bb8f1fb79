// Argument checks and the device-agnostic ATen forms of the batched Hermitian ops (csrc/hermitian.h).
#include "hermitian.h"

#include <ATen/ATen.h>

namespace lipfast {

void check_hermitian_args(const char* op, const at::Tensor& re, const at::Tensor& im, const at::Tensor& other,
                          bool other_is_start) {
  TORCH_CHECK_VALUE(re.dim() == 3 && re.size(1) == re.size(2), op, ": re must be (B, q, q), got ", re.sizes());
  TORCH_CHECK_VALUE(im.sizes() == re.sizes(), op, ": im must have re's shape ", re.sizes(), ", got ", im.sizes());
  TORCH_CHECK_VALUE(re.scalar_type() == at::kFloat || re.scalar_type() == at::kDouble, op,
                    ": re must be float32 or float64, got ", re.scalar_type());
  const char* name = other_is_start ? "start" : "shift";
  for (const auto& [t, n] : {std::pair<const at::Tensor&, const char*>{im, "im"}, {other, name}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == re.scalar_type(), op, ": ", n, " must have re's dtype ", re.scalar_type(),
                      ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == re.device(), op, ": ", n, " must be on re's device ", re.device(), ", got ",
                      t.device());
  }
  if (other_is_start) {
    TORCH_CHECK_VALUE(other.dim() == 2 && other.size(0) == 2 && other.size(1) == re.size(1), op,
                      ": start must be (2, q) = (2, ", re.size(1), "), got ", other.sizes());
  } else {
    TORCH_CHECK_VALUE(other.dim() == 1 && other.size(0) == re.size(0), op, ": shift must be (B,) = (", re.size(0),
                      ",), got ", other.sizes());
  }
}

void check_gram_args(const char* op, const at::Tensor& S, int64_t p) {
  TORCH_CHECK_VALUE(p >= 1, op, ": p must be >= 1, got ", p);
  TORCH_CHECK_VALUE(S.dim() == 3 && S.size(1) == 2 * p, op, ": S must be (B, 2p, q) = (B, ", 2 * p, ", q), got ",
                    S.sizes());
  TORCH_CHECK_VALUE(S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble, op,
                    ": S must be float32 or float64, got ", S.scalar_type());
}

at::Tensor hermitian_cholesky_test_aten(const at::Tensor& re, const at::Tensor& im, const at::Tensor& shift) {
  check_hermitian_args("hermitian_cholesky_test", re, im, shift, false);
  at::Tensor M = at::complex(re, im);
  M.diagonal(0, -2, -1).add_(shift.unsqueeze(-1));
  return std::get<1>(at::linalg_cholesky_ex(M)) == 0;
}

at::Tensor hermitian_power_gain_aten(const at::Tensor& re, const at::Tensor& im, const at::Tensor& start,
                                     int64_t steps) {
  check_hermitian_args("hermitian_power_gain", re, im, start, true);
  TORCH_CHECK_VALUE(steps >= 1, "hermitian_power_gain: steps must be >= 1, got ", steps);
  const int64_t B = re.size(0), q = re.size(1);
  at::Tensor xr = start[0].reshape({1, q, 1}).expand({B, q, 1});
  at::Tensor xi = start[1].reshape({1, q, 1}).expand({B, q, 1});
  at::Tensor gain = re.new_zeros({B});
  const double tiny = re.scalar_type() == at::kFloat ? 1.1754943508222875e-38 : 2.2250738585072014e-308;
  for (int64_t s = 0; s < steps; ++s) {
    at::Tensor yr = at::baddbmm(at::bmm(re, xr), im, xi, 1, -1);
    at::Tensor yi = at::baddbmm(at::bmm(im, xr), re, xi);
    gain = (yr.square().sum({1, 2}) + yi.square().sum({1, 2})).sqrt();
    at::Tensor scale = gain.clamp_min(tiny).reshape({B, 1, 1});
    xr = yr / scale;
    xi = yi / scale;
  }
  return gain;
}

std::tuple<at::Tensor, at::Tensor> hermitian_gram_aten(const at::Tensor& S, int64_t p, bool negate) {
  check_gram_args("hermitian_gram", S, p);
  const at::Tensor A = S.narrow(1, 0, p), B = S.narrow(1, p, p);
  at::Tensor re = at::bmm(S.mT(), S);
  re = re.tril() + re.tril(-1).mT();  // exactly symmetric
  const at::Tensor X = at::bmm(A.mT(), B);
  at::Tensor im = X - X.mT();  // exactly antisymmetric
  if (negate) {
    re.neg_();
    im.neg_();
  }
  return {re, im};
}


}  // namespace lipfast

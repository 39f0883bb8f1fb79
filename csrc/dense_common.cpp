// Device-agnostic pieces of the dense op family, written with ATen operators so that the CPU and
// CUDA kernels share one certified implementation.
//
// Rounding model (IEEE binary64, round to nearest): every operation's result is the exact value
// times (1 + d) with |d| <= u = 2^-53, plus an absolute error of at most 2^-1074 where the result
// underflows.  A dot product of length k, in any summation order, is off by at most
// gamma(k) * sum |x_i y_i| with gamma(k) = k u / (1 - k u).  Every bound below follows from these two
// facts; where a computed quantity enters a bound, it is first pushed outwards by its own error.
#include "dense.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

namespace lipfast {
namespace {

constexpr double kUnit = 0x1p-53;        // unit roundoff of float64
constexpr double kTiny = 0x1p-1074;      // smallest positive float64 (underflow granularity)

double gamma(double k) {
  TORCH_CHECK(k * kUnit < 0.5, "lipfast: matrix too large for the rounding-error bound");
  return k * kUnit / (1.0 - k * kUnit);
}

// Exact powers of two 2^k (k int64 tensor, any values): built from the exponent bits, split into two
// factors so that every k in the float64 exponent range is reachable.  x * pow2 is exact unless the
// product underflows or overflows.
at::Tensor times_pow2(const at::Tensor& x, const at::Tensor& k) {
  auto k1 = at::clamp(at::floor_divide(k, 2), -1022, 1023);
  auto k2 = at::clamp(k - k1, -1022, 1023);
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = k.size(0);  // one exponent per matrix, broadcast over its entries
  auto p1 = at::bitwise_left_shift(k1 + 1023, 52).view(at::kDouble).view(shape);
  auto p2 = at::bitwise_left_shift(k2 + 1023, 52).view(at::kDouble).view(shape);
  return x * p1 * p2;
}

// The same for one value: x * 2^k1 * 2^k2 with the same split, so the same roundings.
double times_pow2(double x, int64_t k) {
  const int64_t k1 = std::clamp<int64_t>(k >= 0 ? k / 2 : -((-k + 1) / 2), -1022, 1023);
  const int64_t k2 = std::clamp<int64_t>(k - k1, -1022, 1023);
  return x * std::ldexp(1.0, static_cast<int>(k1)) * std::ldexp(1.0, static_cast<int>(k2));
}

// Binary exponent e of each value, with x = f * 2^e, f in [0.5, 1) (0 for x = 0), as int64.
at::Tensor binary_exponent(const at::Tensor& x) {
  return std::get<1>(at::frexp(x)).to(at::kLong);
}

// Upper bound on the Frobenius norm of each matrix of X (B, r, c), float64.
at::Tensor frobenius_upper(const at::Tensor& X) {
  const double entries = static_cast<double>(X.size(1)) * static_cast<double>(X.size(2));
  // sum of squares: relative error gamma(entries) (all terms >= 0), sqrt adds u; underflowing
  // squares lose at most entries * 2^-1074 in the sum.
  auto norm = at::linalg_vector_norm(X, 2, {1, 2});
  return norm * (1.0 + 2.0 * gamma(entries + 4)) + std::sqrt(entries * kTiny) + kTiny;
}

}  // namespace

Flattened flatten_matrices(const at::Tensor& W) {
  Flattened f;
  f.batch_shape = W.sizes().slice(0, W.dim() - 2).vec();
  f.m = W.size(-2);
  f.n = W.size(-1);
  f.B = c10::multiply_integers(f.batch_shape);
  const auto t = W.scalar_type();
  f.compute = (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
  f.W = W.reshape({f.B, f.m, f.n}).to(f.compute).contiguous();
  return f;
}

std::vector<int64_t> with_last(std::vector<int64_t> shape, int64_t last) {
  shape.push_back(last);
  return shape;
}

at::Tensor start_vectors(const char* op, const std::optional<at::Tensor>& v0, const Flattened& f) {
  if (!v0.has_value()) {
    auto v = at::empty({f.B, f.n}, f.W.options());
    // An all-zero start tells lanczos_top to use its fixed default start vector.
    v.zero_();
    return v;
  }
  const auto& v = *v0;
  TORCH_CHECK_VALUE(v.device() == f.W.device(), "lipfast.", op, ": v must be on W's device (", f.W.device(),
                    "), got ", v.device());
  TORCH_CHECK_TYPE(at::isFloatingType(v.scalar_type()), "lipfast.", op, ": v must be floating point, got ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(v.sizes().vec() == with_last(f.batch_shape, f.n), "lipfast.", op,
                    ": v must have shape W.shape[:-2] + (n,) = ", at::IntArrayRef(with_last(f.batch_shape, f.n)),
                    ", got ", v.sizes());
  return v.reshape({f.B, f.n}).to(f.compute, /*non_blocking=*/false, /*copy=*/true).contiguous();
}

void check_matrix_batch(const char* op, const at::Tensor& W) {
  TORCH_CHECK_TYPE(at::isFloatingType(W.scalar_type()), "lipfast.", op,
                   ": W must be a floating-point tensor (float32, float64, float16 or bfloat16), got ",
                   W.scalar_type());
  TORCH_CHECK_VALUE(W.dim() >= 2, "lipfast.", op, ": W must have at least 2 dims (..., m, n), got shape ",
                    W.sizes());
  for (int64_t d = 0; d < W.dim(); ++d) {
    TORCH_CHECK_VALUE(W.size(d) > 0, "lipfast.", op, ": W must not have a zero-size dim, got shape ",
                      W.sizes());
  }
}

std::string format_batch_index(at::IntArrayRef batch_shape, int64_t flat) {
  std::vector<int64_t> index(batch_shape.size());
  for (int64_t d = static_cast<int64_t>(batch_shape.size()) - 1; d >= 0; --d) {
    index[d] = flat % batch_shape[d];
    flat /= batch_shape[d];
  }
  std::ostringstream out;
  out << "[";
  for (size_t d = 0; d < index.size(); ++d) out << (d ? ", " : "") << index[d];
  out << "]";
  return out.str();
}

void raise_if_nonfinite(const char* op, const at::Tensor& W, int64_t first_bad) {
  const auto batch_shape = W.sizes().slice(0, W.dim() - 2);
  const int64_t batch = c10::multiply_integers(batch_shape);
  TORCH_CHECK_VALUE(first_bad >= batch, "lipfast.", op, ": W has a NaN or Inf entry in matrix W",
                    format_batch_index(batch_shape, first_bad), " (batch shape ", batch_shape, ")");
}

double range_scale(double largest, int max_exponent) {
  if (!(largest > 0) || !std::isfinite(largest) || std::abs(std::ilogb(largest)) <= 32) return 1.0;
  return std::ldexp(1.0, std::min(-std::ilogb(largest), max_exponent - 1));
}

at::Tensor certified_rayleigh_lower(const at::Tensor& W, const at::Tensor& v) {
  const int64_t m = W.size(1), n = W.size(2);
  auto Wd = W.to(at::kDouble);
  auto vd = v.to(at::kDouble);
  auto y = at::bmm(Wd, vd.unsqueeze(-1)).squeeze(-1);
  auto norm_y = at::linalg_vector_norm(y, 2, {1});
  auto norm_v = at::linalg_vector_norm(vd, 2, {1});
  auto norm_W = at::linalg_vector_norm(Wd, 2, {1, 2});
  // ‖W v‖ >= ‖fl(W v)‖ - ‖fl(W v) - W v‖ and ‖fl(W v) - W v‖ <= gamma(n) ‖|W| |v|‖ <= gamma(n) ‖W‖_F ‖v‖
  // (plus m n 2^-1074 for underflow).  The computed norms are pushed the safe way by their own error.
  const double dm = static_cast<double>(m), dn = static_cast<double>(n);
  auto product_error = gamma(dn) * norm_W * norm_v * (1.0 + 2.0 * gamma(dm * dn + dn + 8)) + dm * dn * kTiny;
  auto numerator = norm_y * (1.0 - 2.0 * gamma(dm + 4)) - product_error;
  auto lower = numerator / (norm_v * (1.0 + 2.0 * gamma(dn + 4)));
  return at::clamp_min(lower * (1.0 - 8.0 * kUnit), 0.0);
}

at::Tensor gram_upper_bound(const at::Tensor& W, const at::Tensor& target, int64_t max_steps) {
  // G_0 = W (or Wᵀ when W is wide, so that the first product is the smaller Gram matrix), scaled by
  // an exact power of two 2^-k0 to Frobenius norm in [0.5, 1).  Each step forms P_t = fl(G_tᵀ G_t)
  // and G_{t+1} = P_t 2^-k_t, again of Frobenius norm in [0.5, 1).  With E_t = P_t - G_tᵀ G_t,
  //   sigma(G_t)^2 = sigma(G_tᵀ G_t) <= sigma(P_t) + ‖E_t‖_2 <= 2^k_t sigma(G_{t+1}) + e_t,
  //   e_t = gamma(inner) ‖G_t‖_F^2 (+ underflow terms) >= ‖E_t‖_F,
  // and sigma(G_T) <= ‖G_T‖_F.  Running the chain back from T gives U_0 >= sigma(G_0), and
  // sigma(W) <= 2^k0 (U_0 + sqrt(N) 2^-1074), the last term covering underflow in the first scaling.
  // Without rounding, ‖G_T‖_F^(1/2^T) -> sigma(W) quadratically (Delattre et al., ICML 2023).
  TORCH_CHECK(W.dim() == 3, "lipfast: gram_upper_bound expects (B, m, n)");
  const int64_t batch = W.size(0);
  auto G = W.to(at::kDouble);
  if (W.size(1) < W.size(2)) G = G.transpose(1, 2);
  const double entries = static_cast<double>(W.size(1)) * static_cast<double>(W.size(2));

  const auto norm_W = at::linalg_vector_norm(G, 2, {1, 2});
  auto k0 = binary_exponent(norm_W);
  G = times_pow2(G, -k0).contiguous();

  // The chain back from each step runs on the host over scalars (one device-to-host copy per step,
  // in place of O(step) tensor ops per step, which dominated the bracket of a small batch on a GPU);
  // the arithmetic is the same float64 arithmetic, operation for operation.
  const at::Tensor target_host = target.to(at::kCPU, at::kDouble).contiguous();
  const at::Tensor scalars0 = at::stack({norm_W, k0.to(at::kDouble)}).cpu();
  const double* norm_W_host = scalars0.const_data_ptr<double>();
  const double* k0_host = norm_W_host + batch;
  std::vector<std::vector<int64_t>> exponents(batch);  // k_t, per matrix
  std::vector<std::vector<double>> errors(batch);      // e_t, per matrix
  std::vector<double> upper(batch, std::numeric_limits<double>::infinity());
  for (int64_t step = 0; step < max_steps; ++step) {
    const double inner = static_cast<double>(G.size(1));
    const double cols = static_cast<double>(G.size(2));
    const auto fro = frobenius_upper(G);
    const auto P = at::bmm(G.transpose(1, 2), G);
    const auto k = binary_exponent(at::linalg_vector_norm(P, 2, {1, 2}));
    G = times_pow2(P, -k);
    const at::Tensor scalars = at::stack({fro, k.to(at::kDouble), frobenius_upper(G)}).cpu();
    const double* fro_host = scalars.const_data_ptr<double>();
    const double* k_host = fro_host + batch;
    const double* next_fro = k_host + batch;
    bool all_reached = true;
    for (int64_t b = 0; b < batch; ++b) {
      // Underflow: each of the cols^2 entries of P is off by at most inner * 2^-1074 beyond the
      // relative bound, and the scaling below loses at most 2^-1074 per entry (2^k_t <= 1).
      errors[b].push_back(gamma(inner) * fro_host[b] * fro_host[b] * (1.0 + 4.0 * kUnit) + cols * (inner + 1.0) * kTiny);
      exponents[b].push_back(static_cast<int64_t>(k_host[b]));
      double bound = next_fro[b];
      for (int64_t j = step; j >= 0; --j) {
        // 2 * 2^-1074 covers a product that underflows; (1 + 8u) covers the add and the sqrt.
        bound = std::sqrt(times_pow2(bound, exponents[b][j]) + 2.0 * kTiny + errors[b][j]) * (1.0 + 8.0 * kUnit);
      }
      const double candidate =
          times_pow2((bound + std::sqrt(entries) * kTiny) * (1.0 + 4.0 * kUnit), static_cast<int64_t>(k0_host[b])) *
          (1.0 + 4.0 * kUnit);
      upper[b] = std::min(upper[b], norm_W_host[b] > 0 ? candidate : 0.0);  // W = 0: sigma = 0 exactly
      all_reached = all_reached && upper[b] <= target_host.const_data_ptr<double>()[b];
    }
    if (all_reached) break;
  }
  return at::tensor(upper, at::TensorOptions().dtype(at::kDouble)).to(W.device());
}

double bracket_stop_factor(double rtol, at::ScalarType dtype) {
  double eps = 0.0;
  switch (dtype) {
    case at::kFloat: eps = 0x1p-24; break;
    case at::kHalf: eps = 0x1p-11; break;
    case at::kBFloat16: eps = 0x1p-8; break;
    default: break;
  }
  return 4.0 * eps <= rtol / 4.0 ? (1.0 + rtol) * (1.0 - 4.0 * eps) : 1.0 + rtol;
}

at::Tensor round_directed(const at::Tensor& x, at::ScalarType dtype, bool up) {
  TORCH_CHECK(x.scalar_type() == at::kDouble, "lipfast: round_directed expects float64");
  if (dtype == at::kDouble) return x;
  auto y = x.to(dtype);
  auto back = y.to(at::kDouble);
  // For non-negative IEEE values the neighbours of y are its bit pattern plus or minus one.
  auto off = up ? at::lt(back, x) : at::gt(back, x);
  at::ScalarType bits_type;
  switch (c10::elementSize(dtype)) {
    case 2: bits_type = at::kShort; break;
    case 4: bits_type = at::kInt; break;
    default: TORCH_CHECK(false, "lipfast: round_directed: unsupported dtype ", dtype);
  }
  auto bits = y.view(bits_type);
  auto moved = up ? bits + 1 : bits - 1;
  return at::where(off, moved, bits).view(dtype);
}

}  // namespace lipfast

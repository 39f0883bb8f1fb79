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
#include <string>
#include <tuple>
#include <utility>
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

// The two factors 2^k1, 2^k2 (k1 + k2 = k where that is in reach) of times_pow2.
std::pair<double, double> pow2_factors(int64_t k) {
  const int64_t k1 = std::clamp<int64_t>(k >= 0 ? k / 2 : -((-k + 1) / 2), -1022, 1023);
  const int64_t k2 = std::clamp<int64_t>(k - k1, -1022, 1023);
  return {std::ldexp(1.0, static_cast<int>(k1)), std::ldexp(1.0, static_cast<int>(k2))};
}

// The same for one value: x * 2^k1 * 2^k2 with the same split, so the same roundings.
double times_pow2(double x, int64_t k) {
  const auto [p1, p2] = pow2_factors(k);
  return x * p1 * p2;
}

// The same for exponents known on the host, one per matrix of x (B, ...): the factors are built on
// the host and copied to x's device in one transfer.
at::Tensor times_pow2(const at::Tensor& x, const std::vector<int64_t>& k) {
  const int64_t B = static_cast<int64_t>(k.size());
  auto factors = at::empty({2, B}, at::TensorOptions().dtype(at::kDouble));
  double* f = factors.mutable_data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) std::tie(f[b], f[B + b]) = pow2_factors(k[b]);
  factors = factors.to(x.device());
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = B;
  return x * factors[0].view(shape) * factors[1].view(shape);
}

// x times 2^-e per matrix for exponents e (B,) int32 on x's device with |e| <= 1022: one exact factor
// 2^-e, made from its bit pattern.  Used where e is the binary exponent of a norm known to lie in
// [2^-1000, 2], so that the bound on |e| holds by construction.
at::Tensor times_pow2_inverse(const at::Tensor& x, const at::Tensor& e) {
  std::vector<int64_t> shape(x.dim(), 1);
  shape[0] = e.size(0);
  const auto bits = at::bitwise_left_shift(at::rsub(e, 1023).to(at::kLong), 52);
  return x * bits.view(at::kDouble).view(shape);
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

// The same bound from a computed norm on the host (the same operations).
double frobenius_upper(double norm, double entries) {
  return norm * (1.0 + 2.0 * gamma(entries + 4)) + std::sqrt(entries * kTiny) + kTiny;
}

// An upper bound on ‖fl(X 2^-e)‖_F for a matrix X of `entries` entries and computed norm `norm`:
// the scaling is exact but for entries that underflow, each off by at most 2^-1075 (for e >= 0;
// none for e < 0); the last factor covers the rounding of the sum.
double scaled_frobenius_upper(double norm, double entries, int64_t e) {
  return (times_pow2(frobenius_upper(norm, entries), -e) + std::sqrt(entries) * kTiny) * (1.0 + 4.0 * kUnit);
}

// The certified lower bound of certified_rayleigh_lower from its three computed norms: ‖fl(W v)‖,
// ‖v‖ and ‖W‖_F (or any upper bound on it), for W (m, n).
double rayleigh_lower(double norm_y, double norm_v, double norm_W, double m, double n) {
  // ‖W v‖ >= ‖fl(W v)‖ - ‖fl(W v) - W v‖ and ‖fl(W v) - W v‖ <= gamma(n) ‖|W| |v|‖ <= gamma(n) ‖W‖_F ‖v‖
  // (plus m n 2^-1074 for underflow).  The computed norms are pushed the safe way by their own error:
  // relative for the sums, and for squares that underflow (each off by at most 2^-1075) by
  // sqrt(count 2^-1074), count the norm's entries (invisible beside norms of order 1).
  const double v_upper = norm_v + std::sqrt(n * kTiny);
  const double product_error =
      gamma(n) * (norm_W + std::sqrt(m * n * kTiny)) * v_upper * (1.0 + 2.0 * gamma(m * n + n + 8)) + m * n * kTiny;
  const double numerator = norm_y * (1.0 - 2.0 * gamma(m + 4)) - std::sqrt(m * kTiny) - product_error;
  const double lower = numerator / (v_upper * (1.0 + 2.0 * gamma(n + 4)));
  return std::max(lower * (1.0 - 8.0 * kUnit), 0.0);
}

// The certified chain of one matrix's Gram iteration (see gram_upper_bound), on the host: the
// exponent k_t and the error bound e_t of every squaring so far, and the best upper bound yet.
class GramChain {
 public:
  // k0: the exponent of the first scaling, G_0 = W 2^-k0; entries: m n; nonzero: whether W != 0.
  GramChain(int64_t k0, double entries, bool nonzero) : k0_(k0), entries_(entries), nonzero_(nonzero) {}

  // Records squaring t: fro >= ‖G_t‖_F, P_t = fl(G_tᵀ G_t) with inner dimension `inner` and `cols`
  // columns, G_{t+1} = P_t 2^-k, next_fro >= ‖G_{t+1}‖_F; updates the upper bound.
  void add_step(double fro, int64_t k, double inner, double cols, double next_fro) {
    // Underflow: each of the cols^2 entries of P is off by at most inner * 2^-1074 beyond the
    // relative bound, and the scaling loses at most 2^-1074 per entry (2^k_t <= 1).
    errors_.push_back(gamma(inner) * fro * fro * (1.0 + 4.0 * kUnit) + cols * (inner + 1.0) * kTiny);
    exponents_.push_back(k);
    double bound = next_fro;
    for (int64_t j = static_cast<int64_t>(errors_.size()) - 1; j >= 0; --j) {
      // 2 * 2^-1074 covers a product that underflows; (1 + 8u) covers the add and the sqrt.
      bound = std::sqrt(times_pow2(bound, exponents_[j]) + 2.0 * kTiny + errors_[j]) * (1.0 + 8.0 * kUnit);
    }
    // + 2^-1074: where the result is subnormal, the scaling rounds (to nearest) and (1 + 4u) does not help
    const double candidate =
        times_pow2((bound + std::sqrt(entries_) * kTiny) * (1.0 + 4.0 * kUnit), k0_) * (1.0 + 4.0 * kUnit) + kTiny;
    upper_ = std::min(upper_, nonzero_ ? candidate : 0.0);  // W = 0: sigma = 0 exactly
  }

  double upper() const { return upper_; }

 private:
  int64_t k0_;
  double entries_;
  bool nonzero_;
  std::vector<int64_t> exponents_;
  std::vector<double> errors_;
  double upper_ = std::numeric_limits<double>::infinity();
};

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

void check_matrix_batch(const char* op, const at::Tensor& W, const std::string& name) {
  TORCH_CHECK_TYPE(at::isFloatingType(W.scalar_type()), "lipfast.", op, ": ", name,
                   " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ", W.scalar_type());
  TORCH_CHECK_VALUE(W.dim() >= 2, "lipfast.", op, ": ", name, " must have at least 2 dims (..., m, n), got shape ",
                    W.sizes());
  for (int64_t d = 0; d < W.dim(); ++d) {
    TORCH_CHECK_VALUE(W.size(d) > 0, "lipfast.", op, ": ", name, " must not have a zero-size dim, got shape ",
                      W.sizes());
  }
}

std::string format_batch_index(const std::string& name, at::IntArrayRef batch_shape, int64_t flat) {
  if (batch_shape.empty()) return "";  // one matrix: nothing to locate
  std::vector<int64_t> index(batch_shape.size());
  for (int64_t d = static_cast<int64_t>(batch_shape.size()) - 1; d >= 0; --d) {
    index[d] = flat % batch_shape[d];
    flat /= batch_shape[d];
  }
  std::ostringstream out;
  out << " in matrix " << name << "[";
  for (size_t d = 0; d < index.size(); ++d) out << (d ? ", " : "") << index[d];
  out << "] (batch shape " << batch_shape << ")";
  return out.str();
}

void raise_if_nonfinite(const char* op, const at::Tensor& W, int64_t first_bad) {
  const auto batch_shape = W.sizes().slice(0, W.dim() - 2);
  const int64_t batch = c10::multiply_integers(batch_shape);
  TORCH_CHECK_VALUE(first_bad >= batch, "lipfast.", op, ": W has a NaN or Inf entry",
                    format_batch_index("W", batch_shape, first_bad));
}

double range_scale(double largest, int max_exponent) {
  if (!(largest > 0) || !std::isfinite(largest) || std::abs(std::ilogb(largest)) <= 32) return 1.0;
  return std::ldexp(1.0, std::min(-std::ilogb(largest), max_exponent - 1));
}

at::Tensor certified_rayleigh_lower(const at::Tensor& W, const at::Tensor& v) {
  // Each W_b and v_b is first scaled by the power of two that brings its largest |entry| into
  // [0.5, 1): the norms square the entries, and squares of entries beyond about 2^±511 would under-
  // or overflow (torch's vector norm does not rescale).  Scaling v leaves ‖W v‖ / ‖v‖ as it is (for
  // the vector as scaled); scaling W down may lose entries that underflow, each by at most 2^-1075,
  // which moves ‖W v‖ / ‖v‖ by at most ‖dW‖_2 <= sqrt(m n) 2^-1075, taken off.
  const int64_t batch = W.size(0);
  if (W.size(1) == 0 || W.size(2) == 0) return at::zeros({batch}, W.options().dtype(at::kDouble));
  const double m = static_cast<double>(W.size(1)), n = static_cast<double>(W.size(2));
  auto Wd = W.to(at::kDouble);
  auto vd = v.to(at::kDouble);
  const auto k = binary_exponent(Wd.abs().amax({1, 2}));
  Wd = times_pow2(Wd, -k);
  vd = times_pow2(vd, -binary_exponent(vd.abs().amax({1})));
  auto y = at::bmm(Wd, vd.unsqueeze(-1)).squeeze(-1);
  const at::Tensor norms =
      at::stack({at::linalg_vector_norm(y, 2, {1}), at::linalg_vector_norm(vd, 2, {1}),
                 at::linalg_vector_norm(Wd, 2, {1, 2}), k.to(at::kDouble)})
          .cpu();
  const double* norm = norms.const_data_ptr<double>();
  auto lower = at::empty({batch}, at::TensorOptions().dtype(at::kDouble));
  for (int64_t b = 0; b < batch; ++b) {
    const auto k_b = static_cast<int64_t>(norm[3 * batch + b]);
    double scaled = rayleigh_lower(norm[b], norm[batch + b], norm[2 * batch + b], m, n);
    if (k_b > 0) scaled -= std::sqrt(m * n) * kTiny;
    // back in W's units, exactly where normal; a subnormal result rounds to nearest: 2^-1074 off
    lower.mutable_data_ptr<double>()[b] = std::max(times_pow2(scaled, k_b) - kTiny, 0.0);
  }
  return lower.to(W.device());
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
  if (entries == 0) return at::zeros({batch}, W.options().dtype(at::kDouble));  // sigma of an empty matrix: 0

  // k0 from the norm of G times 2^-k_entry (its largest |entry| in [0.5, 1)): torch's vector norm
  // squares the entries as they are, which under- or overflow beyond about 2^±511
  const auto k_entry = binary_exponent(G.abs().amax({1, 2}));
  const auto norm_W = at::linalg_vector_norm(times_pow2(G, -k_entry), 2, {1, 2});
  auto k0 = k_entry + binary_exponent(norm_W);
  G = times_pow2(G, -k0).contiguous();

  // The chain back from each step runs on the host over scalars (one device-to-host copy per step,
  // in place of O(step) tensor ops per step, which dominated the bracket of a small batch on a GPU);
  // the arithmetic is the same float64 arithmetic, operation for operation.
  const at::Tensor target_host = target.to(at::kCPU, at::kDouble).contiguous();
  const at::Tensor scalars0 = at::stack({norm_W, k0.to(at::kDouble)}).cpu();
  const double* norm_W_host = scalars0.const_data_ptr<double>();
  const double* k0_host = norm_W_host + batch;
  std::vector<GramChain> chains;
  for (int64_t b = 0; b < batch; ++b) chains.emplace_back(static_cast<int64_t>(k0_host[b]), entries, norm_W_host[b] > 0);
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
      chains[b].add_step(fro_host[b], static_cast<int64_t>(k_host[b]), inner, cols, next_fro[b]);
      all_reached = all_reached && chains[b].upper() <= target_host.const_data_ptr<double>()[b];
    }
    if (all_reached) break;
  }
  std::vector<double> upper(batch);
  for (int64_t b = 0; b < batch; ++b) upper[b] = chains[b].upper();
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

namespace lipfast {
namespace {

// The matrices of a spectral_norm_bounds_many call with one shape (r, c) on their taller side
// (r >= c), from one or more input tensors, stacked into one batch.
struct ManyBlock {
  int64_t r = 0, c = 0, B = 0;
  int64_t first = 0;          // global index of its first matrix
  at::Tensor G0;              // (B, r, c) float64: each matrix times 2^-k0
  size_t group = 0;           // its group (same c)
  int64_t group_offset = 0;   // and its first matrix's place there
};

// The matrices with one Gram size c, squared together: G (N, c, c) the current iterate, G1 the
// first (fl(G0ᵀ G0) scaled, kept for the Rayleigh-quotient estimates), x the last estimate's
// vectors.
struct ManyGroup {
  int64_t c = 0;
  std::vector<size_t> blocks;
  at::Tensor G, G1, x;
  bool active = true;  // false once every estimate says its brackets are narrow enough
};

// The binary exponent e of each value (x = f 2^e, f in [0.5, 1); 0 for x = 0), int32; and of one
// value on the host (frexp is exact: the same e).
at::Tensor exponent32(const at::Tensor& x) { return std::get<1>(at::frexp(x)); }
int64_t exponent(double x) {
  int e = 0;
  std::frexp(x, &e);
  return e;
}

// x (N, c, 1) = G (G e_j) for the column j of G with the largest diagonal entry (G is a Gram iterate,
// symmetric positive semi-definite up to rounding), and (N, 2): xᵀ G1 x and xᵀ x.  With G ∝
// (G0ᵀ G0)^(2^(t-1)) after t squarings, x is 2^t power steps from e_j, and the quotient of the two,
// times 2^k1, estimates sigma(G0)^2.
at::Tensor rayleigh_estimate(ManyGroup& g) {
  const int64_t N = g.G.size(0), c = g.c;
  const auto j = at::argmax(at::diagonal(g.G, 0, 1, 2), 1, /*keepdim=*/true);  // (N, 1)
  g.x = at::bmm(g.G, at::gather(g.G, 2, j.unsqueeze(1).expand({N, c, 1})));
  return at::bmm(g.x.transpose(1, 2), at::cat({at::bmm(g.G1, g.x), g.x}, 2)).reshape({N, 2});
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> dense_spectral_norm_bounds_many(
    at::TensorList Ws, double rtol, int64_t max_gram_steps) {
  const char* op = "spectral_norm_bounds_many";
  TORCH_CHECK_VALUE(rtol > 0 && std::isfinite(rtol), "lipfast.", op, ": rtol must be positive, got ", rtol);
  TORCH_CHECK_VALUE(max_gram_steps >= 1, "lipfast.", op, ": max_gram_steps must be >= 1, got ", max_gram_steps);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  std::vector<at::Tensor> lowers, uppers;
  if (Ws.empty()) return {lowers, uppers, at::full({}, -1.0, f64)};
  for (size_t i = 0; i < Ws.size(); ++i) {
    check_matrix_batch(op, Ws[i], "Ws[" + std::to_string(i) + "]");
    TORCH_CHECK_VALUE(Ws[i].device() == Ws[0].device(), "lipfast.", op, ": every tensor must be on one device; Ws[0] is on ",
                      Ws[0].device(), ", Ws[", i, "] on ", Ws[i].device());
  }

  // Every matrix in float64 on its taller side, the tensors of one shape stacked into one block.
  std::vector<Flattened> flat;
  std::vector<size_t> block_of(Ws.size());
  std::vector<int64_t> offset_in_block(Ws.size());
  std::vector<ManyBlock> blocks;
  std::vector<std::vector<at::Tensor>> stacked;
  for (size_t i = 0; i < Ws.size(); ++i) {
    flat.push_back(flatten_matrices(Ws[i]));
    const Flattened& f = flat.back();
    at::Tensor A = f.W.to(at::kDouble);
    if (f.m < f.n) A = A.transpose(1, 2);
    size_t k = 0;
    while (k < blocks.size() && !(blocks[k].r == A.size(1) && blocks[k].c == A.size(2))) ++k;
    if (k == blocks.size()) {
      blocks.push_back(ManyBlock{A.size(1), A.size(2)});
      stacked.emplace_back();
    }
    block_of[i] = k;
    offset_in_block[i] = blocks[k].B;
    blocks[k].B += f.B;
    stacked[k].push_back(A);
  }
  int64_t total = 0;
  std::vector<at::Tensor> parts;
  for (size_t k = 0; k < blocks.size(); ++k) {
    blocks[k].first = total;
    total += blocks[k].B;
    blocks[k].G0 = stacked[k].size() == 1 ? stacked[k][0] : at::cat(stacked[k]);
    parts.push_back(blocks[k].G0.abs().amax({1, 2}));
  }
  stacked.clear();
  // Where matrix number a of the global (block) order comes from: tensor index and flat batch index.
  std::vector<std::pair<size_t, int64_t>> origin(total);
  std::vector<double> factor(total);
  for (size_t i = 0; i < Ws.size(); ++i) {
    const int64_t first = blocks[block_of[i]].first + offset_in_block[i];
    for (int64_t b = 0; b < flat[i].B; ++b) origin[first + b] = {i, b};
    std::fill_n(factor.begin() + first, flat[i].B, bracket_stop_factor(rtol, Ws[i].scalar_type()));
  }

  // The largest |entry| of every matrix, read back once: NaN/Inf are rejected before any other work.
  const at::Tensor largest = at::cat(parts).cpu();
  const double* big = largest.const_data_ptr<double>();
  for (int64_t a = 0; a < total; ++a) {
    const auto [i, b] = origin[a];
    TORCH_CHECK_VALUE(std::isfinite(big[a]), "lipfast.", op, ": Ws[", i, "] has a NaN or Inf entry",
                      format_batch_index("Ws[" + std::to_string(i) + "]", flat[i].batch_shape, b));
  }

  // The first squaring, per block.  G0 = A 2^-k0 with Frobenius norm in [0.5, 1), in two exact
  // scalings: by the largest entry's exponent (known here), then by the exponent e of the scaled
  // norm (e >= 0, since the largest entry is then in [0.5, 1)); each entry is off by less than
  // 2^-1074 in all, which GramChain's first term covers.  P = fl(G0ᵀ G0), G1 = P 2^-e1.  The two
  // norms are read back with the first step's estimates.  Blocks of one c form a group.
  std::vector<int64_t> k_entry(total);
  for (int64_t a = 0; a < total; ++a) k_entry[a] = -exponent(big[a]);
  std::vector<ManyGroup> groups;
  parts.clear();
  for (size_t k = 0; k < blocks.size(); ++k) {
    ManyBlock& blk = blocks[k];
    const at::Tensor scaled = times_pow2(
        blk.G0, std::vector<int64_t>(k_entry.begin() + blk.first, k_entry.begin() + blk.first + blk.B));
    const auto norm_scaled = at::linalg_vector_norm(scaled, 2, {1, 2});
    const auto e0 = exponent32(norm_scaled);
    blk.G0 = times_pow2_inverse(scaled, e0);
    const auto P = at::bmm(blk.G0.transpose(1, 2), blk.G0);
    const auto norm_P = at::linalg_vector_norm(P, 2, {1, 2});
    const auto e1 = exponent32(norm_P);
    const auto G1 = times_pow2_inverse(P, e1);
    parts.push_back(at::stack({norm_scaled, norm_P}).view(-1));  // the host takes e0, e1 from these
    size_t g = 0;
    while (g < groups.size() && groups[g].c != blk.c) ++g;
    if (g == groups.size()) groups.push_back(ManyGroup{blk.c});
    blk.group = g;
    blk.group_offset = groups[g].G1.defined() ? groups[g].G1.size(0) : 0;
    groups[g].blocks.push_back(k);
    groups[g].G1 = groups[g].G1.defined() ? at::cat({groups[g].G1, G1}) : G1;
  }
  for (ManyGroup& g : groups) g.G = g.G1;

  std::vector<GramChain> chains;
  std::vector<int64_t> k0(total), k1(total);
  std::vector<double> fro(total), fro0(total), lower(total, 0.0);
  for (int64_t step = 0; step < max_gram_steps; ++step) {
    if (step > 0) {  // one squaring of every active group; ‖P‖_F and e read back below
      for (ManyGroup& g : groups) {
        if (!g.active) continue;
        const auto P = at::bmm(g.G.transpose(1, 2), g.G);
        const auto norm_P = at::linalg_vector_norm(P, 2, {1, 2});
        const auto e = exponent32(norm_P);
        g.G = times_pow2_inverse(P, e);
        parts.push_back(norm_P);  // the host takes e from it
      }
    }
    for (ManyGroup& g : groups) {
      if (g.active) parts.push_back(rayleigh_estimate(g).view(-1));
    }
    const at::Tensor host = at::cat(parts).cpu();  // the one device-to-host transfer of the step
    parts.clear();
    const double* s = host.const_data_ptr<double>();
    if (step == 0) {
      for (const ManyBlock& blk : blocks) {
        const int64_t B = blk.B;
        const double r = static_cast<double>(blk.r), c = static_cast<double>(blk.c);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t a = blk.first + b;
          const int64_t e0 = exponent(s[b]);
          k0[a] = e0 - k_entry[a];
          k1[a] = exponent(s[B + b]);
          fro0[a] = scaled_frobenius_upper(s[b], r * c, e0);  // >= ‖G0‖_F
          fro[a] = scaled_frobenius_upper(s[B + b], c * c, k1[a]);  // >= ‖G1‖_F
          chains.emplace_back(k0[a], r * c, big[a] > 0);
          chains[a].add_step(fro0[a], k1[a], r, c, fro[a]);
        }
        s += 2 * B;
      }
    } else {
      for (const ManyGroup& g : groups) {
        if (!g.active) continue;
        const int64_t N = g.G.size(0);
        const double c = static_cast<double>(g.c);
        for (size_t k : g.blocks) {
          for (int64_t b = 0; b < blocks[k].B; ++b) {
            const int64_t a = blocks[k].first + b, in_group = blocks[k].group_offset + b;
            const int64_t e = exponent(s[in_group]);
            const double next = scaled_frobenius_upper(s[in_group], c * c, e);
            chains[a].add_step(fro[a], e, c, c, next);
            fro[a] = next;
          }
        }
        s += N;
      }
    }
    // The estimates: sigma ~ 2^k0 sqrt(xᵀ G1 x / xᵀ x 2^k1), uncertified.  A group stops squaring
    // once they say that all its brackets are narrow enough; all are certified below once every
    // group has stopped.
    bool estimated = true;
    for (ManyGroup& g : groups) {
      if (!g.active) continue;
      bool narrow = true;
      for (size_t k : g.blocks) {
        for (int64_t b = 0; b < blocks[k].B; ++b) {
          const int64_t a = blocks[k].first + b, in_group = blocks[k].group_offset + b;
          const double quotient = s[2 * in_group] / s[2 * in_group + 1];
          const double estimate = times_pow2(std::sqrt(times_pow2(quotient, k1[a])), k0[a]);
          const double upper = chains[a].upper();
          narrow = narrow && (upper == 0 || upper <= estimate * factor[a]);
        }
      }
      s += 2 * g.G.size(0);
      g.active = !narrow;
      estimated = estimated && narrow;
    }
    if (!estimated && step + 1 < max_gram_steps) continue;
    // The lower ends: ‖G0 x‖ / ‖x‖ in float64 less its rounding margin (fro0 standing in for ‖G0‖_F),
    // times 2^k0 (less 2^-1074, which covers rounding where that product is subnormal); 0 where
    // that is not a number.
    for (const ManyBlock& blk : blocks) {
      const auto x = groups[blk.group].x.narrow(0, blk.group_offset, blk.B);
      parts.push_back(at::stack({at::linalg_vector_norm(at::bmm(blk.G0, x), 2, {1, 2}),
                                 at::linalg_vector_norm(x, 2, {1, 2})}).view(-1));
    }
    const at::Tensor norms = at::cat(parts).cpu();
    parts.clear();
    const double* nrm = norms.const_data_ptr<double>();
    bool certified = true;
    for (const ManyBlock& blk : blocks) {
      for (int64_t b = 0; b < blk.B; ++b) {
        const int64_t a = blk.first + b;
        const double scaled = rayleigh_lower(nrm[b], nrm[blk.B + b], fro0[a], static_cast<double>(blk.r),
                                             static_cast<double>(blk.c));
        const double value = times_pow2(scaled, k0[a]) - kTiny;
        lower[a] = value >= 0 ? value : 0.0;
        const double upper = chains[a].upper();
        if (upper == 0 || upper <= lower[a] * factor[a]) continue;
        certified = false;  // the estimate was optimistic: that group squares on
        groups[blk.group].active = true;
      }
      nrm += 2 * blk.B;
    }
    if (certified) break;
  }

  // Back to the tensors' order, rounded outwards on the host to each dtype present (in order of
  // first appearance), one copy to the device per dtype; and the widest gap upper / lower - 1 over
  // the float32 and float64 brackets (-1 if none), for the caller's warning.
  std::vector<int64_t> position(total);  // of global matrix a in the tensors' order
  {
    std::vector<int64_t> start(Ws.size() + 1, 0);
    for (size_t i = 0; i < Ws.size(); ++i) start[i + 1] = start[i] + flat[i].B;
    for (int64_t a = 0; a < total; ++a) position[a] = start[origin[a].first] + origin[a].second;
  }
  auto lower_all = at::empty({total}, f64), upper_all = at::empty({total}, f64);
  for (int64_t a = 0; a < total; ++a) {
    lower_all.mutable_data_ptr<double>()[position[a]] = lower[a];
    upper_all.mutable_data_ptr<double>()[position[a]] = chains[a].upper();
  }
  std::vector<at::ScalarType> dtypes;
  double widest = -1.0;
  for (const auto& W : Ws) {
    const auto dtype = W.scalar_type();
    if (std::find(dtypes.begin(), dtypes.end(), dtype) != dtypes.end()) continue;
    dtypes.push_back(dtype);
    const auto lo = round_directed(lower_all, dtype, /*up=*/false), up = round_directed(upper_all, dtype, /*up=*/true);
    if (dtype == at::kFloat || dtype == at::kDouble) {
      const auto gap = up.to(at::kDouble) / lo.to(at::kDouble).clamp_min(std::numeric_limits<double>::min()) - 1.0;
      int64_t start = 0;
      for (size_t i = 0; i < Ws.size(); start += flat[i].B, ++i) {
        if (Ws[i].scalar_type() != dtype) continue;
        for (int64_t b = 0; b < flat[i].B; ++b) widest = std::max(widest, gap.const_data_ptr<double>()[start + b]);
      }
    }
    lowers.push_back(lo.to(Ws[0].device(), /*non_blocking=*/false, /*copy=*/true));
    uppers.push_back(up.to(Ws[0].device(), /*non_blocking=*/false, /*copy=*/true));
  }
  return {lowers, uppers, at::full({}, widest, f64)};
}

}  // namespace lipfast

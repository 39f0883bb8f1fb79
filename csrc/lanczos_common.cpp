// Lanczos written with ATen ops (lanczos.h): any device, the operator given as a function.
#include "lanczos.h"

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace lipfast {
namespace {

double norm2(const at::Tensor& x) { return at::linalg_vector_norm(x.to(at::kDouble), 2).item<double>(); }

}  // namespace

at::Tensor default_start_vector(int64_t n, const at::TensorOptions& options) {
  auto v = at::empty({n}, at::TensorOptions().dtype(at::kDouble));
  double* p = v.data_ptr<double>();
  for (int64_t j = 0; j < n; ++j) p[j] = default_start_entry(j);
  return v.to(options);
}

TopRitz lanczos_top_aten(const std::function<at::Tensor(const at::Tensor&)>& gram, at::Tensor v,
                         int64_t max_passes, double rtol, int64_t rank_bound, int64_t max_basis, double upper) {
  const int64_t n = v.numel();
  const double eps = v.scalar_type() == at::kDouble ? DBL_EPSILON : FLT_EPSILON;
  LanczosControl control(n, rank_bound, max_passes, rtol, eps, max_basis);
  control.upper = upper;
  const int64_t cap = control.cap;
  std::vector<double> alpha(cap), beta(cap), s(cap), tri(7 * cap);
  std::vector<unsigned char> swapped(cap);
  const TridiagonalScratch scratch{tri.data(),           tri.data() + cap,     tri.data() + 2 * cap,
                                   tri.data() + 3 * cap, tri.data() + 4 * cap, tri.data() + 5 * cap,
                                   tri.data() + 6 * cap, swapped.data()};

  v = v.reshape({n});
  double start_norm = norm2(v);
  if (!(start_norm > 0) || !std::isfinite(start_norm)) {
    v = default_start_vector(n, v.options());
    start_norm = norm2(v);
  }
  auto Q = at::empty({cap, n}, v.options());
  Q[0].copy_(v / start_norm);
  for (;;) {  // one sweep per (re)start, Q[0] holding the start vector
    control.start_sweep();
    for (int64_t k = 0;; ++k) {
      const auto q = Q[k];
      at::Tensor w = gram(q);
      ++control.passes;
      const double a = at::dot(q.to(at::kDouble), w.to(at::kDouble)).item<double>();
      w = w - a * q;
      if (k > 0) w = w - beta[k - 1] * Q[k - 1];
      const auto basis = Q.narrow(0, 0, k + 1);
      double b = norm2(w);
      for (int round = 0; round < 2; ++round) {  // classical Gram–Schmidt, repeated when it removed much
        const double before = b;
        w = w - at::mv(basis.t(), at::mv(basis, w));
        b = norm2(w);
        if (b > 0.7071 * before) break;
      }
      alpha[k] = a;
      bool done = false;
      if (control.should_solve(k, b)) {
        for (int64_t i = control.checked; i <= k; ++i) s[i] = 0.0;  // the previous eigenvector, padded
        const double theta =
            tridiagonal_top_eigenpair(alpha.data(), beta.data(), k + 1, s.data(), control.checked > 0, scratch);
        done = control.after_solve(k, theta, s[k], b);
      }
      if (done || control.full(k)) {
        const auto coefficients = at::from_blob(s.data(), {k + 1}, at::kDouble).to(v.options());
        const auto ritz = at::mv(basis.t(), coefficients);
        const double norm = norm2(ritz);
        v = norm > 0 ? ritz / norm : Q[0].clone();
        if (done) return {v, control.rel_err};
        break;
      }
      beta[k] = b;
      Q[k + 1].copy_(w / b);
    }
    Q[0].copy_(v);  // restart from the Ritz vector
  }
}

}  // namespace lipfast

// Lanczos on a symmetric positive semi-definite operator (WᵀW, or AᵀA for a convolution A): the
// pieces every kernel shares, whatever runs the products.
//
// - LanczosControl: the stopping rules (residual test, confirmation, skipped eigen-solves), as one
//   scalar state machine; the CPU kernel, the CUDA block-per-matrix kernel and the ATen loop all
//   drive it, so they stop at the same pass on the same numbers.
// - tridiagonal_top_eigenpair: the largest eigenpair of the Lanczos tridiagonal matrix, on raw
//   double arrays, compiled for host and device.
// - default_start_entry: the fixed pseudo-random start vector, entry by entry (so a GPU block can
//   fill it in parallel) and equal on every device.
// - lanczos_top_aten: the loop written with ATen tensor ops on any device, for operators that come
//   as a function (convolutions, and single large matrices on a GPU).
#pragma once

#include <cfloat>
#include <cstdint>
#include <math.h>

#ifdef __CUDACC__
#define LIPFAST_HD __host__ __device__
#else
#define LIPFAST_HD
#endif

namespace lipfast {

// Largest Lanczos basis before an explicit restart from the Ritz vector.
constexpr int64_t kMaxBasis = 256;
// Below this rank bound min(m, n), the residual test is not trusted and the iteration runs until
// the Krylov space is exhausted (at most min(m, n) + 1 cheap steps): in a space of low dimension a
// start vector lies within rtol of the eigenvector of a lower eigenvalue often enough to matter
// (2 x 2 matrices: about 1 in 10^5), and then the residual test passes at the first step.  Larger
// operators are covered by the confirmation steps (LanczosControl), at least kMinConfirmation.
constexpr int64_t kFullKrylovRank = 16;
constexpr int64_t kMinConfirmation = 16;
// Before convergence, the eigen-solve of T may be skipped for up to this many steps, when the rate
// at which the residual falls says convergence is at least twice that far away.
constexpr int64_t kMaxSkippedChecks = 4;

// Entry j of the fixed start vector (splitmix64, uniform in [-1, 1)): deterministic, and with
// probability one not orthogonal to the top singular vector.
LIPFAST_HD inline double default_start_entry(int64_t j) {
  uint64_t z = 0x6c69706661737401ULL + static_cast<uint64_t>(j + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1p-52 - 1.0;
}

// ---------------------------------------------------------------------------------------------
// The largest eigenpair of a symmetric tridiagonal matrix T_K (diagonal a[0..K), off-diagonal
// b[0..K-1)), as Lanczos needs it after every step.  Fast path: Rayleigh quotient iteration from
// the previous step's top eigenvector (padded with a zero), which converges in two or three O(K)
// solves, then one Sturm count to verify that no eigenvalue lies above the one found.  Fallback
// (no guess, tiny K, or a failed verification): bisection on Sturm counts, O(K) per halving, and
// inverse iteration for the eigenvector.  All of it on T / ‖T‖, so that squares of off-diagonal
// entries neither overflow nor underflow whatever the scale of W.

// Scratch for K <= capacity: seven double arrays and one flag array, each of `capacity` entries.
struct TridiagonalScratch {
  double *a, *b, *dl, *d, *du, *du2, *y;
  unsigned char* swapped;
};

// Number of eigenvalues of T_K below x.
LIPFAST_HD inline int64_t eigenvalues_below(const double* a, const double* b, int64_t K, double x, double pivot_min) {
  int64_t count = 0;
  double d = 1.0;
  for (int64_t i = 0; i < K; ++i) {
    d = (a[i] - x) - (i > 0 ? b[i - 1] * b[i - 1] / d : 0.0);
    if (fabs(d) < pivot_min) d = -pivot_min;
    if (d < 0) ++count;
  }
  return count;
}

// LU factorization of T_K - mu I with partial pivoting (LAPACK dgttrf's scheme) into `w`; tiny
// pivots are replaced by pivot_min, as inverse iteration wants.
LIPFAST_HD inline void factor_shifted(const double* a, const double* b, int64_t K, double mu, double pivot_min,
                                      const TridiagonalScratch& w) {
  double *dl = w.dl, *d = w.d, *du = w.du, *du2 = w.du2;
  for (int64_t i = 0; i < K; ++i) d[i] = a[i] - mu;
  for (int64_t i = 0; i + 1 < K; ++i) dl[i] = du[i] = b[i];
  for (int64_t i = 0; i + 1 < K; ++i) {
    du2[i] = 0.0;
    if (fabs(d[i]) >= fabs(dl[i])) {
      w.swapped[i] = 0;
      if (fabs(d[i]) < pivot_min) d[i] = pivot_min;
      const double f = dl[i] / d[i];
      dl[i] = f;
      d[i + 1] -= f * du[i];
    } else {
      w.swapped[i] = 1;
      const double f = d[i] / dl[i];
      d[i] = dl[i];
      dl[i] = f;
      const double t = du[i];
      du[i] = d[i + 1];
      d[i + 1] = t - f * d[i + 1];
      if (i + 2 < K) {
        du2[i] = du[i + 1];
        du[i + 1] = -f * du[i + 1];
      }
    }
  }
  if (fabs(d[K - 1]) < pivot_min) d[K - 1] = pivot_min;
}

// y <- (T_K - mu I)^-1 y with the factors of factor_shifted, then y <- y / ‖y‖.
LIPFAST_HD inline void solve_shifted_normalized(int64_t K, double* y, const TridiagonalScratch& w) {
  const double *dl = w.dl, *d = w.d, *du = w.du, *du2 = w.du2;
  for (int64_t i = 0; i + 1 < K; ++i) {
    if (!w.swapped[i]) {
      y[i + 1] -= dl[i] * y[i];
    } else {
      const double t = y[i] - dl[i] * y[i + 1];
      y[i] = y[i + 1];
      y[i + 1] = t;
    }
  }
  y[K - 1] /= d[K - 1];
  if (K > 1) y[K - 2] = (y[K - 2] - du[K - 2] * y[K - 1]) / d[K - 2];
  for (int64_t i = K - 3; i >= 0; --i) y[i] = (y[i] - du[i] * y[i + 1] - du2[i] * y[i + 2]) / d[i];
  double big = 0.0, sum = 0.0;
  for (int64_t i = 0; i < K; ++i) big = fmax(big, fabs(y[i]));
  for (int64_t i = 0; i < K; ++i) sum += (y[i] / big) * (y[i] / big);
  const double norm = big * sqrt(sum);
  for (int64_t i = 0; i < K; ++i) y[i] /= norm;
}

LIPFAST_HD inline double rayleigh_quotient(const double* a, const double* b, int64_t K, const double* y) {
  double q = 0.0;
  for (int64_t i = 0; i < K; ++i) q += a[i] * y[i] * y[i];
  for (int64_t i = 0; i + 1 < K; ++i) q += 2.0 * b[i] * y[i] * y[i + 1];
  return q;
}

// Returns theta = lambda_max(T_K) and its unit eigenvector in s.  When have_guess, s[0..K-1) holds
// on entry the top eigenvector of T_{K-1}.
LIPFAST_HD inline double tridiagonal_top_eigenpair(const double* a_in, const double* b_in, int64_t K, double* s,
                                                   bool have_guess, const TridiagonalScratch& work) {
  if (K == 1) {
    s[0] = 1.0;
    return a_in[0];
  }
  double norm_T = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    norm_T = fmax(norm_T, fabs(a_in[i]) + (i > 0 ? fabs(b_in[i - 1]) : 0.0) + (i + 1 < K ? fabs(b_in[i]) : 0.0));
  }
  if (!(norm_T > 0)) {  // T = 0
    for (int64_t i = 0; i < K; ++i) s[i] = 0.0;
    s[0] = 1.0;
    return 0.0;
  }
  double* a = work.a;
  double* b = work.b;
  for (int64_t i = 0; i < K; ++i) a[i] = a_in[i] / norm_T;
  for (int64_t i = 0; i + 1 < K; ++i) b[i] = b_in[i] / norm_T;
  const double eps = DBL_EPSILON;
  const double pivot_min = eps + DBL_MIN;  // ‖T‖ = 1 from here on
  double* y = work.y;

  if (have_guess && K > 4) {
    for (int64_t i = 0; i + 1 < K; ++i) y[i] = s[i];
    y[K - 1] = 0.0;
    double mu = rayleigh_quotient(a, b, K, y);
    for (int iter = 0; iter < 6; ++iter) {
      factor_shifted(a, b, K, mu, pivot_min, work);
      solve_shifted_normalized(K, y, work);
      const double next = rayleigh_quotient(a, b, K, y);
      const bool settled = fabs(next - mu) <= 8 * eps;
      mu = next;
      if (settled) break;
    }
    // Accept mu only if no eigenvalue of T lies above it (beyond a relative 1e-10).
    if (eigenvalues_below(a, b, K, mu + 1e-10, pivot_min) == K) {
      for (int64_t i = 0; i < K; ++i) s[i] = y[i];
      return mu * norm_T;
    }
  }

  double lo = HUGE_VAL, hi = -HUGE_VAL;
  for (int64_t i = 0; i < K; ++i) {
    const double r = (i > 0 ? fabs(b[i - 1]) : 0.0) + (i + 1 < K ? fabs(b[i]) : 0.0);
    lo = fmin(lo, a[i] - r);
    hi = fmax(hi, a[i] + r);
  }
  hi += 2 * eps + pivot_min;  // all K eigenvalues now lie strictly below hi
  for (int iter = 0; iter < 200; ++iter) {
    const double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi || hi - lo <= 2 * eps * fmax(fabs(lo), fabs(hi))) break;
    if (eigenvalues_below(a, b, K, mid, pivot_min) == K) hi = mid; else lo = mid;
  }
  const double theta = 0.5 * (lo + hi);
  factor_shifted(a, b, K, theta, pivot_min, work);
  for (int64_t i = 0; i < K; ++i) y[i] = 1.0;
  solve_shifted_normalized(K, y, work);
  solve_shifted_normalized(K, y, work);
  for (int64_t i = 0; i < K; ++i) s[i] = y[i];
  return theta * norm_T;
}

// ---------------------------------------------------------------------------------------------
// The stopping rules of Lanczos with full reorthogonalization and explicit restarts, for an
// operator on n unknowns of rank at most rank_bound.  A driver runs, for each sweep (restart):
//
//   control.start_sweep();
//   for k = 0, 1, ...:
//     w = A q_k; control.passes += 1; alpha_k = q_k·w; orthogonalize w; b = ‖w‖
//     if control.should_solve(k, b):
//       pad s[control.checked .. k] with zeros (the previous eigenvector is the guess)
//       theta = tridiagonal_top_eigenpair(alpha, beta, k + 1, s, control.checked > 0, ...)
//       done = control.after_solve(k, theta, s[k], b)
//     if done or control.full(k): v = Ritz vector; stop if done, else restart from v
//     beta_k = b; q_{k+1} = w / b
//
// Confirmation.  A start vector with a tiny component along the top singular vector lets the Ritz
// value of the SECOND one converge first, with a small residual, before the top one emerges (about
// 1 random 128 x 128 matrix in 10^4 at rtol 1e-5).  The emerging component grows exponentially with
// the number of steps, so once the residual test passes after p passes, the iteration goes on to 2p
// passes, and at least kMinConfirmation more (without the per-step eigen-solve), and accepts theta
// only if it has not grown meanwhile; if it has, the new value is confirmed the same way.
//
// On stopping, rel_err is the residual bound ‖A y - theta y‖ / (2 theta), which bounds the relative
// error of sqrt(theta) as an approximation of the singular value it converged to.
//
// A known upper bound.  A caller that holds a certified upper bound U of sigma_max and wants the
// lower end of the bracket [sigma, U] sets `upper` = U (in the units of sqrt(theta)).  With
// width = U / sqrt(theta) - 1, the iteration then also stops once width <= 8 rtol (the bracket is as
// narrow as asked: rtol is an eighth of the bracket's tolerance, as conv brackets ask of their lower
// end) or once 8 rel_err <= width where the residual test is trusted, after kMinConfirmation passes
// at least (more passes would not narrow it noticeably; before 16 passes, the Ritz value of a small
// operator, 512 channels on 4 x 4, lay 0.3-0.7% below its converged value when that test first
// passed), with no confirmation steps: should the residual test pass on a lower singular value,
// sigma is still a lower bound and the bracket is only wider.  Between eigen-solves it aims at
// max(rtol, width / 8).
struct LanczosControl {
  int64_t n = 0, cap = 0, max_passes = 0;
  double rtol = 0, breakdown = 0;
  double upper = 0;  // a known upper bound of sigma_max, or 0 for none
  bool trust_residual = false;
  // across sweeps
  int64_t confirm_at = -1;  // passes at which to confirm; -1: not confirming
  double claimed = 0.0;     // theta when the residual test first passed
  double rel_err = HUGE_VAL;
  int64_t passes = 0;
  // within a sweep
  int64_t checked = 0;     // size of T at the last eigen-solve (s holds its vector)
  int64_t next_check = 1;  // size of T at which to solve next, before convergence
  double last_theta = 0.0, last_rel_err = HUGE_VAL;

  // eps: the unit roundoff of the dtype the vectors are stored in; max_basis: the basis cap.
  LIPFAST_HD LanczosControl(int64_t n_, int64_t rank_bound, int64_t max_passes_, double rtol_, double eps,
                            int64_t max_basis = kMaxBasis)
      : n(n_), cap(n_ < max_basis ? n_ : max_basis), max_passes(max_passes_), rtol(rtol_) {
    trust_residual = rank_bound > kFullKrylovRank;
    // Breakdown: what is left after reorthogonalization is rounding noise.  When the iteration must
    // run to exhaustion, allow for the noise of a length-n product rather than one rounding.
    breakdown = (trust_residual ? 1.0 : 16.0 * sqrt(static_cast<double>(n))) * eps;
  }

  LIPFAST_HD void start_sweep() {
    checked = 0;
    next_check = 1;
    last_theta = 0.0;
    last_rel_err = HUGE_VAL;
  }

  // Whether step k filled the basis (restart after it).
  LIPFAST_HD bool full(int64_t k) const { return k + 1 == cap; }

  // Whether to solve the tridiagonal problem after step k, whose orthogonalized residual has norm b.
  LIPFAST_HD bool should_solve(int64_t k, double b) const {
    const bool last_step = k + 1 == n || k + 1 == cap || passes >= max_passes;
    const bool confirming = confirm_at >= 0 && passes < confirm_at;
    return last_step || b == 0.0 || b <= breakdown * last_theta || (!confirming && k + 1 >= next_check);
  }

  // The bracket [sqrt(theta), upper]'s relative width (HUGE_VAL without an upper bound).
  LIPFAST_HD double bracket_width(double theta) const {
    return upper > 0 && theta > 0 ? upper / sqrt(theta) - 1.0 : HUGE_VAL;
  }

  // After the solve of step k (theta, last entry s_k of its eigenvector): whether to stop.
  LIPFAST_HD bool after_solve(int64_t k, double theta, double s_k, double b) {
    const int64_t previous = checked;
    checked = k + 1;
    const double residual = b * fabs(s_k);
    rel_err = theta > 0 ? residual / (2.0 * theta) : (residual > 0 ? HUGE_VAL : 0.0);
    const double width = bracket_width(theta);
    const double goal = width < HUGE_VAL ? fmax(rtol, 0.125 * width) : rtol;
    int64_t skip = 0;
    if (previous > 0 && rel_err > goal && rel_err < last_rel_err) {
      const double rate = log(last_rel_err / rel_err) / static_cast<double>(checked - previous);
      const double wanted = 0.5 * log(rel_err / goal) / rate;
      skip = wanted < static_cast<double>(kMaxSkippedChecks) ? static_cast<int64_t>(wanted) : kMaxSkippedChecks;
    }
    next_check = checked + 1 + skip;
    last_theta = theta;
    last_rel_err = rel_err;
    // The Krylov space is invariant (b ~ 0) or is the whole space: theta is exact.
    const bool exhausted = b <= breakdown * theta || b == 0.0 || k + 1 == n;
    const bool settled = trust_residual && passes >= kMinConfirmation && 8.0 * rel_err <= width;
    bool done = width < HUGE_VAL && !exhausted && (width <= 8.0 * rtol || settled);
    if (!done && trust_residual && rel_err <= rtol && !exhausted) {
      if (confirm_at >= 0 && passes >= confirm_at && theta <= claimed * (1.0 + 2.0 * rtol)) {
        done = true;
      } else if (confirm_at < 0 || passes >= confirm_at) {
        confirm_at = passes + (passes > kMinConfirmation ? passes : kMinConfirmation);
        claimed = theta;
      }
    }
    return done || exhausted || passes >= max_passes;
  }
};

}  // namespace lipfast

#include <ATen/core/Tensor.h>

#include <functional>

namespace lipfast {

// Lanczos with LanczosControl's rules, written with ATen ops (any device): `gram(x)` returns A x for
// a vector x of v's dtype and device.  v: the start vector (n,), not necessarily normalized; a zero
// or non-finite v is replaced by the default start.  Returns the unit Ritz vector and rel_err.
struct TopRitz {
  at::Tensor v;
  double rel_err;
};
// upper: a known upper bound of sqrt(lambda_max), or 0 (LanczosControl).
TopRitz lanczos_top_aten(const std::function<at::Tensor(const at::Tensor&)>& gram, at::Tensor v,
                         int64_t max_passes, double rtol, int64_t rank_bound, int64_t max_basis,
                         double upper = 0.0);

// The default start vector (n,) with the given options.
at::Tensor default_start_vector(int64_t n, const at::TensorOptions& options);

}  // namespace lipfast

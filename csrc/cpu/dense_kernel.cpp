// CPU kernels for the dense op family: the largest singular value of each matrix in a batch by
// Lanczos on WᵀW, warm-startable power iteration, and the certified bracket.
//
// Shapes: W (..., m, n) is flattened to B = prod(...) matrices; vectors are (B, n) or (B, m).
// Parallel axis: the batch (at::parallel_for, one matrix per task) when there are at least as many
// matrices as threads or the matrices are small; otherwise the rows of each matrix, with one
// accumulation buffer per thread reduced after each pass.
// Memory: every product with WᵀW is ONE pass over W, row by row (s_i = w_i·x, then y += s_i w_i,
// four rows at a time so that the loads of x and of y are shared), so an iteration reads W once
// instead of twice as W x followed by Wᵀ(W x) would.
// Numerical contract: sigma = ‖W v‖ for the returned unit v, so it never exceeds sigma_max beyond
// rounding; rel_err bounds |sigma - sigma_max| / sigma once the iteration has found the top
// eigenvalue (residual bound for Lanczos); half types are computed in float32.
#include "dense.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace lipfast {
namespace {

// ---------------------------------------------------------------------------------------------
// Vector kernels.  The bodies are templates; the entry points below are non-template overloads so
// that each can carry target_clones.

// acc += sum over `rows` rows w_i of (w_i · x) w_i, and with Store also wx_i = w_i · x: W x and
// Wᵀ(W x) in one read of W.
template <typename T, bool Store>
inline __attribute__((always_inline)) void gram_rows_body(const T* __restrict__ W, int64_t n, int64_t rows,
                                                          const T* __restrict__ x, T* __restrict__ acc,
                                                          T* __restrict__ wx) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {
    const T* __restrict__ w0 = W + i * n;
    const T* __restrict__ w1 = w0 + n;
    const T* __restrict__ w2 = w1 + n;
    const T* __restrict__ w3 = w2 + n;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t j = 0; j < n; ++j) {
      const T xj = x[j];
      s0 += w0[j] * xj;
      s1 += w1[j] * xj;
      s2 += w2[j] * xj;
      s3 += w3[j] * xj;
    }
    if constexpr (Store) {
      wx[i] = s0;
      wx[i + 1] = s1;
      wx[i + 2] = s2;
      wx[i + 3] = s3;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += s0 * w0[j] + s1 * w1[j] + s2 * w2[j] + s3 * w3[j];
  }
  for (; i < rows; ++i) {
    const T* __restrict__ w0 = W + i * n;
    T s0 = 0;
#pragma omp simd reduction(+ : s0)
    for (int64_t j = 0; j < n; ++j) s0 += w0[j] * x[j];
    if constexpr (Store) wx[i] = s0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) acc[j] += s0 * w0[j];
  }
}

// y_i = w_i · x for `rows` rows.
template <typename T>
inline __attribute__((always_inline)) void matvec_rows_body(const T* __restrict__ W, int64_t n, int64_t rows,
                                                            const T* __restrict__ x, T* __restrict__ y) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* __restrict__ w = W + i * n;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += w[j] * x[j];
    y[i] = s;
  }
}

template <typename T>
inline __attribute__((always_inline)) double dot_body(const T* __restrict__ a, const T* __restrict__ b,
                                                      int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return s;
}

// y += a x
template <typename T>
inline __attribute__((always_inline)) void axpy_body(double a, const T* __restrict__ x, T* __restrict__ y,
                                                     int64_t n) {
  const T at = static_cast<T>(a);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += at * x[j];
}

#define LIPFAST_VECTOR_KERNELS(T)                                                                    \
  LIPFAST_SIMD_CLONES void gram_rows(const T* W, int64_t n, int64_t rows, const T* x, T* acc) {     \
    gram_rows_body<T, false>(W, n, rows, x, acc, nullptr);                                          \
  }                                                                                                  \
  LIPFAST_SIMD_CLONES void gram_rows_store(const T* W, int64_t n, int64_t rows, const T* x, T* acc,  \
                                           T* wx) {                                                 \
    gram_rows_body<T, true>(W, n, rows, x, acc, wx);                                                \
  }                                                                                                  \
  LIPFAST_SIMD_CLONES void matvec_rows(const T* W, int64_t n, int64_t rows, const T* x, T* y) {     \
    matvec_rows_body<T>(W, n, rows, x, y);                                                          \
  }                                                                                                  \
  LIPFAST_SIMD_CLONES double dot(const T* a, const T* b, int64_t n) { return dot_body<T>(a, b, n); } \
  LIPFAST_SIMD_CLONES void axpy(double a, const T* x, T* y, int64_t n) { axpy_body<T>(a, x, y, n); }

LIPFAST_VECTOR_KERNELS(float)
LIPFAST_VECTOR_KERNELS(double)
#undef LIPFAST_VECTOR_KERNELS

template <typename T>
double norm(const T* a, int64_t n) {
  return std::sqrt(dot(a, a, n));
}

// a *= c, in double: c may be out of T's range (1 / a norm that is nearly subnormal).
template <typename T>
void scale(T* a, double c, int64_t n) {
  for (int64_t j = 0; j < n; ++j) a[j] = static_cast<T>(static_cast<double>(a[j]) * c);
}

// The fixed pseudo-random start vector (splitmix64, entries uniform in [-1, 1)): deterministic, and
// with probability one not orthogonal to the top singular vector.
template <typename T>
void default_start_vector(T* v, int64_t n) {
  uint64_t state = 0x6c69706661737401ULL;
  for (int64_t j = 0; j < n; ++j) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    v[j] = static_cast<T>(static_cast<double>(z >> 11) * 0x1p-52 - 1.0);
  }
}

// ---------------------------------------------------------------------------------------------
// Applying WᵀW: serially (one matrix per task) or split over the rows of one large matrix.

template <typename T>
struct SerialGram {
  const T* W;
  int64_t m, n;
  void operator()(const T* x, T* y) const {
    std::fill(y, y + n, T(0));
    gram_rows(W, n, m, x, y);
  }
  // y = Wᵀ(W x) and wx = W x, one read of W.
  void operator()(const T* x, T* y, T* wx) const {
    std::fill(y, y + n, T(0));
    gram_rows_store(W, n, m, x, y, wx);
  }
  void matvec(const T* x, T* y) const { matvec_rows(W, n, m, x, y); }
};

template <typename T>
struct RowParallelGram {
  const T* W;
  int64_t m, n;
  int64_t chunks;
  mutable std::vector<T> partial;  // chunks x n accumulators, one per row block

  RowParallelGram(const T* W_, int64_t m_, int64_t n_) : W(W_), m(m_), n(n_) {
    chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), m / 4));
    partial.resize(chunks * n);
  }
  void operator()(const T* x, T* y, T* wx = nullptr) const {
    T* buffers = partial.data();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t r0 = chunk * m / chunks, r1 = (chunk + 1) * m / chunks;
        T* acc = buffers + chunk * n;
        std::fill(acc, acc + n, T(0));
        if (wx != nullptr) {
          gram_rows_store(W + r0 * n, n, r1 - r0, x, acc, wx + r0);
        } else {
          gram_rows(W + r0 * n, n, r1 - r0, x, acc);
        }
      }
    });
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        T s = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) s += buffers[chunk * n + j];
        y[j] = s;
      }
    });
  }
  void matvec(const T* x, T* y) const {
    at::parallel_for(0, m, std::max<int64_t>(1, 65536 / n), [&](int64_t begin, int64_t end) {
      matvec_rows(W + begin * n, n, end - begin, x, y + begin);
    });
  }
};

// ---------------------------------------------------------------------------------------------
// The largest eigenpair of a symmetric tridiagonal matrix T_K (diagonal a[0..K), off-diagonal
// b[0..K-1)), as Lanczos needs it after every step.  Fast path: Rayleigh quotient iteration from
// the previous step's top eigenvector (padded with a zero), which converges in two or three O(K)
// solves, then one Sturm count to verify that no eigenvalue lies above the one found.  Fallback
// (no guess, tiny K, or a failed verification): bisection on Sturm counts, O(K) per halving, and
// inverse iteration for the eigenvector.  All of it on T / ‖T‖, so that squares of off-diagonal
// entries neither overflow nor underflow whatever the scale of W.

struct TridiagonalWork {
  std::vector<double> a, b, dl, d, du, du2, y;
  std::vector<char> swapped;
  void resize(int64_t K) {
    for (auto* v : {&a, &b, &dl, &d, &du, &du2, &y}) v->resize(K);
    swapped.resize(K);
  }
};

// Number of eigenvalues of T_K below x.
int64_t eigenvalues_below(const double* a, const double* b, int64_t K, double x, double pivot_min) {
  int64_t count = 0;
  double d = 1.0;
  for (int64_t i = 0; i < K; ++i) {
    d = (a[i] - x) - (i > 0 ? b[i - 1] * b[i - 1] / d : 0.0);
    if (std::abs(d) < pivot_min) d = -pivot_min;
    if (d < 0) ++count;
  }
  return count;
}

// LU factorization of T_K - mu I with partial pivoting (LAPACK dgttrf's scheme) into `w`; tiny
// pivots are replaced by pivot_min, as inverse iteration wants.
void factor_shifted(const double* a, const double* b, int64_t K, double mu, double pivot_min, TridiagonalWork& w) {
  double *dl = w.dl.data(), *d = w.d.data(), *du = w.du.data(), *du2 = w.du2.data();
  for (int64_t i = 0; i < K; ++i) d[i] = a[i] - mu;
  for (int64_t i = 0; i + 1 < K; ++i) dl[i] = du[i] = b[i];
  for (int64_t i = 0; i + 1 < K; ++i) {
    du2[i] = 0.0;
    if (std::abs(d[i]) >= std::abs(dl[i])) {
      w.swapped[i] = 0;
      if (std::abs(d[i]) < pivot_min) d[i] = pivot_min;
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
  if (std::abs(d[K - 1]) < pivot_min) d[K - 1] = pivot_min;
}

// y <- (T_K - mu I)^-1 y with the factors of factor_shifted, then y <- y / ‖y‖.
void solve_shifted_normalized(int64_t K, double* y, const TridiagonalWork& w) {
  const double *dl = w.dl.data(), *d = w.d.data(), *du = w.du.data(), *du2 = w.du2.data();
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
  for (int64_t i = 0; i < K; ++i) big = std::max(big, std::abs(y[i]));
  for (int64_t i = 0; i < K; ++i) sum += (y[i] / big) * (y[i] / big);
  const double norm = big * std::sqrt(sum);
  for (int64_t i = 0; i < K; ++i) y[i] /= norm;
}

double rayleigh_quotient(const double* a, const double* b, int64_t K, const double* y) {
  double q = 0.0;
  for (int64_t i = 0; i < K; ++i) q += a[i] * y[i] * y[i];
  for (int64_t i = 0; i + 1 < K; ++i) q += 2.0 * b[i] * y[i] * y[i + 1];
  return q;
}

// Returns theta = lambda_max(T_K) and its unit eigenvector in s.  When have_guess, s[0..K-1) holds
// on entry the top eigenvector of T_{K-1}.
double tridiagonal_top_eigenpair(const double* a_in, const double* b_in, int64_t K, double* s, bool have_guess,
                                 TridiagonalWork& work) {
  if (K == 1) {
    s[0] = 1.0;
    return a_in[0];
  }
  double norm_T = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    norm_T = std::max(norm_T, std::abs(a_in[i]) + (i > 0 ? std::abs(b_in[i - 1]) : 0.0) +
                                  (i + 1 < K ? std::abs(b_in[i]) : 0.0));
  }
  if (!(norm_T > 0)) {  // T = 0
    std::fill(s, s + K, 0.0);
    s[0] = 1.0;
    return 0.0;
  }
  double* a = work.a.data();
  double* b = work.b.data();
  for (int64_t i = 0; i < K; ++i) a[i] = a_in[i] / norm_T;
  for (int64_t i = 0; i + 1 < K; ++i) b[i] = b_in[i] / norm_T;
  const double eps = std::numeric_limits<double>::epsilon();
  const double pivot_min = eps + std::numeric_limits<double>::min();  // ‖T‖ = 1 from here on
  double* y = work.y.data();

  if (have_guess && K > 4) {
    std::copy(s, s + K - 1, y);
    y[K - 1] = 0.0;
    double mu = rayleigh_quotient(a, b, K, y);
    for (int iter = 0; iter < 6; ++iter) {
      factor_shifted(a, b, K, mu, pivot_min, work);
      solve_shifted_normalized(K, y, work);
      const double next = rayleigh_quotient(a, b, K, y);
      const bool settled = std::abs(next - mu) <= 8 * eps;
      mu = next;
      if (settled) break;
    }
    // Accept mu only if no eigenvalue of T lies above it (beyond a relative 1e-10).
    if (eigenvalues_below(a, b, K, mu + 1e-10, pivot_min) == K) {
      std::copy(y, y + K, s);
      return mu * norm_T;
    }
  }

  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (int64_t i = 0; i < K; ++i) {
    const double r = (i > 0 ? std::abs(b[i - 1]) : 0.0) + (i + 1 < K ? std::abs(b[i]) : 0.0);
    lo = std::min(lo, a[i] - r);
    hi = std::max(hi, a[i] + r);
  }
  hi += 2 * eps + pivot_min;  // all K eigenvalues now lie strictly below hi
  for (int iter = 0; iter < 200; ++iter) {
    const double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi || hi - lo <= 2 * eps * std::max(std::abs(lo), std::abs(hi))) break;
    if (eigenvalues_below(a, b, K, mid, pivot_min) == K) hi = mid; else lo = mid;
  }
  const double theta = 0.5 * (lo + hi);
  factor_shifted(a, b, K, theta, pivot_min, work);
  for (int64_t i = 0; i < K; ++i) y[i] = 1.0;
  solve_shifted_normalized(K, y, work);
  solve_shifted_normalized(K, y, work);
  std::copy(y, y + K, s);
  return theta * norm_T;
}

// ---------------------------------------------------------------------------------------------
// Lanczos on A = WᵀW with full reorthogonalization (classical Gram–Schmidt, repeated when it
// removed a large part of the vector) and explicit restarts from the Ritz vector when the basis is
// full.  Each step costs one pass over W.  On return v holds the unit Ritz vector of the largest
// Ritz value theta; the return value is the residual bound ‖A y - theta y‖ / (2 theta), which bounds
// the relative error of sqrt(theta) as an approximation of the singular value it converged to.

constexpr int64_t kMaxBasis = 256;
// Below this rank bound min(m, n), the residual test is not trusted and the iteration runs until
// the Krylov space is exhausted (at most min(m, n) + 1 cheap steps): in a space of low dimension a
// start vector lies within rtol of the eigenvector of a lower eigenvalue often enough to matter
// (2 x 2 matrices: about 1 in 10^5), and then the residual test passes at the first step.  Larger
// matrices are covered by the confirmation steps (see lanczos_top), at least kMinConfirmation.
constexpr int64_t kFullKrylovRank = 16;
constexpr int64_t kMinConfirmation = 16;
// Before convergence, the eigen-solve of T may be skipped for up to this many steps, when the rate
// at which the residual falls says convergence is at least twice that far away.
constexpr int64_t kMaxSkippedChecks = 4;

template <typename T>
struct LanczosWork {
  std::vector<T> basis, w, correction;
  std::vector<double> alpha, beta, s;
  TridiagonalWork tri;
};

template <typename T, typename Gram>
double lanczos_top(const Gram& gram, int64_t n, T* v, int64_t max_passes, double rtol, LanczosWork<T>& work) {
  const int64_t cap = std::min<int64_t>(kMaxBasis, n);
  // The basis grows as the iteration needs it: a matrix of rank r breaks down after r + 1 steps,
  // so a wide or low-rank matrix never pays for cap vectors of length n.
  if (work.basis.size() < static_cast<size_t>(2 * n)) work.basis.resize(2 * n);
  work.w.resize(n);
  work.correction.resize(n);
  work.alpha.resize(cap); work.beta.resize(cap); work.s.resize(cap);
  work.tri.resize(cap);
  T* Q = work.basis.data();
  T* w = work.w.data();
  T* correction = work.correction.data();
  double* alpha = work.alpha.data();
  double* beta = work.beta.data();
  double* s = work.s.data();
  const double eps = std::numeric_limits<T>::epsilon();
  const bool trust_residual = std::min(gram.m, n) > kFullKrylovRank;
  // Breakdown: what is left after reorthogonalization is rounding noise.  When the iteration must
  // run to exhaustion, allow for the noise of a length-n product rather than one rounding.
  const double breakdown = (trust_residual ? 1.0 : 16.0 * std::sqrt(static_cast<double>(n))) * eps;

  double start_norm = norm(v, n);
  if (!(start_norm > 0) || !std::isfinite(start_norm)) {
    default_start_vector(v, n);
    start_norm = norm(v, n);
  }
  std::copy(v, v + n, Q);
  scale(Q, 1.0 / start_norm, n);

  // Confirmation.  A start vector with a tiny component along the top singular vector lets the
  // Ritz value of the SECOND one converge first, with a small residual, before the top one emerges
  // (about 1 random 128 x 128 matrix in 10^4 at rtol 1e-5).  The emerging component grows
  // exponentially with the number of steps, so once the residual test passes after p passes, the
  // iteration goes on to 2p passes, and at least kMinConfirmation more (without the per-step
  // eigen-solve), and accepts theta only if it has not grown meanwhile; if it has, the new value is
  // confirmed the same way.
  int64_t confirm_at = -1;  // passes at which to confirm; -1: not confirming
  double claimed = 0.0;     // theta when the residual test first passed
  double rel_err = INFINITY;
  int64_t passes = 0;
  for (;;) {  // one sweep per (re)start, Q[0] holding the start vector
    int64_t checked = 0;     // size of T at the last eigen-solve of this sweep (s holds its vector)
    int64_t next_check = 1;  // size of T at which to solve next, before convergence
    double last_theta = 0.0, last_rel_err = INFINITY;
    for (int64_t k = 0;; ++k) {
      const T* q = Q + k * n;
      gram(q, w);
      ++passes;
      const double a = dot(q, w, n);
      axpy(-a, q, w, n);
      if (k > 0) axpy(-beta[k - 1], Q + (k - 1) * n, w, n);
      double b = norm(w, n);
      for (int round = 0; round < 2; ++round) {
        // Classical Gram–Schmidt against the whole basis: w -= Qᵀ (Q w), which is the fused Gram
        // pass again, over the k + 1 basis vectors instead of the rows of W.
        const double before = b;
        std::fill(correction, correction + n, T(0));
        gram_rows(Q, n, k + 1, w, correction);
        axpy(-1.0, correction, w, n);
        b = norm(w, n);
        if (b > 0.7071 * before) break;  // little was removed: w is orthogonal to working accuracy
      }
      alpha[k] = a;
      const bool last_step = k + 1 == n || k + 1 == cap || passes >= max_passes;
      const bool confirming = confirm_at >= 0 && passes < confirm_at;
      const bool solve = last_step || b == 0.0 || b <= breakdown * last_theta || (!confirming && k + 1 >= next_check);
      bool done = false;
      if (solve) {
        std::fill(s + checked, s + k + 1, 0.0);  // the previous eigenvector, padded: the RQI guess
        const double theta = tridiagonal_top_eigenpair(alpha, beta, k + 1, s, /*have_guess=*/checked > 0, work.tri);
        const int64_t previous = checked;
        checked = k + 1;
        const double residual = b * std::abs(s[k]);
        rel_err = theta > 0 ? residual / (2.0 * theta) : (residual > 0 ? INFINITY : 0.0);
        int64_t skip = 0;
        if (previous > 0 && rel_err > rtol && rel_err < last_rel_err) {
          const double rate = std::log(last_rel_err / rel_err) / static_cast<double>(checked - previous);
          skip = std::min<int64_t>(kMaxSkippedChecks, static_cast<int64_t>(0.5 * std::log(rel_err / rtol) / rate));
        }
        next_check = checked + 1 + skip;
        last_theta = theta;
        last_rel_err = rel_err;
        // The Krylov space is invariant (b ~ 0) or is the whole space: theta is exact.
        const bool exhausted = b <= breakdown * theta || b == 0.0 || k + 1 == n;
        if (trust_residual && rel_err <= rtol && !exhausted) {
          if (confirm_at >= 0 && passes >= confirm_at && theta <= claimed * (1.0 + 2.0 * rtol)) {
            done = true;
          } else if (confirm_at < 0 || passes >= confirm_at) {
            confirm_at = passes + std::max(passes, kMinConfirmation);
            claimed = theta;
          }
        }
        done = done || exhausted || passes >= max_passes;
      }
      if (done || k + 1 == cap) {
        std::fill(v, v + n, T(0));
        for (int64_t j = 0; j <= k; ++j) axpy(s[j], Q + j * n, v, n);
        const double nv = norm(v, n);
        scale(v, 1.0 / nv, n);
        if (done) return rel_err;
        break;
      }
      beta[k] = b;
      if (work.basis.size() < static_cast<size_t>((k + 2) * n)) {
        work.basis.resize(std::min<int64_t>(2 * (k + 2), cap + 1) * n);
        Q = work.basis.data();
      }
      std::copy(w, w + n, Q + (k + 1) * n);
      scale(Q + (k + 1) * n, 1.0 / b, n);
    }
    std::copy(v, v + n, Q);  // restart from the Ritz vector
  }
}

// u = W v / ‖W v‖ (zero when W v = 0); returns ‖W v‖ for the unit vector v.
template <typename T, typename Gram>
double left_vector(const Gram& gram, int64_t m, const T* v, T* u) {
  gram.matvec(v, u);
  const double sigma = norm(u, m);
  if (sigma > 0) scale(u, 1.0 / sigma, m); else std::fill(u, u + m, T(0));
  return sigma;
}

// Runs `solve(gram, matrix index, work)` for every matrix, choosing the parallel axis; `work` is
// scratch space reused by the matrices of one task.
template <typename T, typename Solve>
void for_each_matrix(const T* W, int64_t B, int64_t m, int64_t n, const Solve& solve) {
  const bool split_rows = B < at::get_num_threads() && m * n >= (int64_t(1) << 16) && m >= 8;
  if (split_rows) {
    LanczosWork<T> work;
    for (int64_t b = 0; b < B; ++b) solve(RowParallelGram<T>(W + b * m * n, m, n), b, work);
  } else {
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      LanczosWork<T> work;
      for (int64_t b = begin; b < end; ++b) solve(SerialGram<T>{W + b * m * n, m, n}, b, work);
    });
  }
}

// One read of every matrix: returns the flat index of the first matrix holding a NaN or Inf (B when
// all are finite), and fills scales[b] with 1, or, where max|W_b| lies outside [2^-32, 2^32], with
// the power of two that brings it into [1, 2): the iterations form WᵀW x, whose entries are of the
// order of sigma^2, and that must neither underflow nor overflow.
template <typename T>
int64_t scan_matrices(const T* data, int64_t B, int64_t m, int64_t n, T* scales) {
  std::atomic<int64_t> first{B};
  std::vector<T> row_max(B * m);
  at::parallel_for(0, B * m, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = data + r * n;
      T probe = 0, big = 0;  // x * 0 is NaN exactly when x is NaN or Inf
#pragma omp simd reduction(+ : probe) reduction(max : big)
      for (int64_t j = 0; j < n; ++j) {
        probe += row[j] * T(0);
        big = std::max(big, std::abs(row[j]));
      }
      row_max[r] = big;
      if (probe != probe) {
        int64_t b = r / m, seen = first.load();
        while (b < seen && !first.compare_exchange_weak(seen, b)) {
        }
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) {
    const T big = *std::max_element(row_max.begin() + b * m, row_max.begin() + (b + 1) * m);
    scales[b] = T(1);
    if (big > 0 && std::isfinite(big) && std::abs(std::ilogb(big)) > 32) {
      // (capped so that the factor itself stays finite when every entry is subnormal)
      const int exponent = std::min(-std::ilogb(big), std::numeric_limits<T>::max_exponent - 1);
      scales[b] = std::ldexp(T(1), exponent);
    }
  }
  return first.load();
}

// ---------------------------------------------------------------------------------------------
// Op entry points.


// Raises ValueError on NaN/Inf entries.  Returns the matrices to iterate on: f.W itself, or, when
// some matrix is extremely large or small, a copy with matrix b multiplied by scales[b], an exact
// power of two (scales: (B,), the compute dtype; all ones when no copy was needed).
std::pair<at::Tensor, at::Tensor> scan_and_check(const char* op, const at::Tensor& W, const Flattened& f) {
  auto scales = at::empty({f.B}, f.W.options());
  int64_t first_bad = f.B;
  AT_DISPATCH_FLOATING_TYPES(f.compute, "lipfast_scan_matrices", [&] {
    first_bad = scan_matrices(f.W.data_ptr<scalar_t>(), f.B, f.m, f.n, scales.data_ptr<scalar_t>());
  });
  raise_if_nonfinite(op, W, first_bad);
  if (at::ne(scales, 1).any().item<bool>()) return {f.W * scales.view({-1, 1, 1}), scales};
  return {f.W, scales};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_spectral_norm_cpu(
    const at::Tensor& W, const std::optional<at::Tensor>& v0, int64_t max_iters, double rtol) {
  check_matrix_batch("spectral_norm", W);
  TORCH_CHECK_VALUE(max_iters >= 1, "lipfast.spectral_norm: max_iters must be >= 1, got ", max_iters);
  TORCH_CHECK_VALUE(rtol > 0 && std::isfinite(rtol), "lipfast.spectral_norm: rtol must be positive, got ", rtol);
  const Flattened f = flatten_matrices(W);
  auto v = start_vectors("spectral_norm", v0, f);
  const auto scanned = scan_and_check("spectral_norm", W, f);
  const at::Tensor& Wk = scanned.first;
  auto u = at::empty({f.B, f.m}, f.W.options());
  auto sigma = at::empty({f.B}, f.W.options());
  auto rel_err = at::empty({f.B}, f.W.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(f.compute, "lipfast_dense_spectral_norm", [&] {
    scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* sp = sigma.data_ptr<scalar_t>();
    double* ep = rel_err.data_ptr<double>();
    for_each_matrix(Wk.data_ptr<scalar_t>(), f.B, f.m, f.n, [&](const auto& gram, int64_t b, LanczosWork<scalar_t>& work) {
      ep[b] = lanczos_top(gram, f.n, vp + b * f.n, max_iters, rtol, work);
      sp[b] = static_cast<scalar_t>(left_vector(gram, f.m, vp + b * f.n, up + b * f.m));
    });
  });
  sigma.div_(scanned.second);  // exact: powers of two
  const auto dtype = W.scalar_type();
  return {sigma.to(dtype).reshape(f.batch_shape), u.to(dtype).reshape(with_last(f.batch_shape, f.m)),
          v.to(dtype).reshape(with_last(f.batch_shape, f.n)), rel_err.reshape(f.batch_shape)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_power_iteration_cpu(const at::Tensor& W, const at::Tensor& v0,
                                                                         int64_t iters) {
  check_matrix_batch("power_iteration", W);
  TORCH_CHECK_VALUE(iters >= 0, "lipfast.power_iteration: iters must be >= 0, got ", iters);
  const Flattened f = flatten_matrices(W);
  auto v = start_vectors("power_iteration", v0, f);
  auto u = at::empty({f.B, f.m}, f.W.options());
  auto sigma = at::empty({f.B}, f.W.options());
  AT_DISPATCH_FLOATING_TYPES(f.compute, "lipfast_dense_power_iteration", [&] {
    scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* sp = sigma.data_ptr<scalar_t>();
    // No scan here (it would be a second read of W per step): sigma^2 must be in the dtype's range.
    for_each_matrix(f.W.data_ptr<scalar_t>(), f.B, f.m, f.n, [&](const auto& gram, int64_t b, LanczosWork<scalar_t>& work) {
      scalar_t* x = vp + b * f.n;
      auto& y = work.w;
      y.resize(f.n);
      double nx = norm(x, f.n);
      if (nx > 0) scale(x, 1.0 / nx, f.n);
      for (int64_t it = 0; it < iters && nx > 0; ++it) {
        gram(x, y.data());
        nx = norm(y.data(), f.n);
        if (nx > 0) {  // WᵀW x = 0: x is in the null space; keep it
          std::copy(y.begin(), y.end(), x);
          scale(x, 1.0 / nx, f.n);
        }
      }
      sp[b] = static_cast<scalar_t>(left_vector(gram, f.m, x, up + b * f.m));
    });
  });
  const auto dtype = W.scalar_type();
  return {sigma.to(dtype).reshape(f.batch_shape), u.to(dtype).reshape(with_last(f.batch_shape, f.m)),
          v.to(dtype).reshape(with_last(f.batch_shape, f.n))};
}

// torch.nn.utils.parametrizations.spectral_norm's power method, fused: each step reads W once for
// t = W v and z = Wᵀ t, then u = t / max(‖t‖, eps), v = (z / a) / max(‖z / a‖, eps) with a =
// max(‖t‖, eps): exactly torch's normalize(W v) and normalize(Wᵀ u).  sigma = uᵀ W v for the final
// pair, which is ‖z / a‖^2 / max(‖z / a‖, eps) without another read; with iters = 0 it is uᵀ W v for
// the given pair (one matvec).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spectral_norm_step_cpu(const at::Tensor& W, const at::Tensor& u0,
                                                                      const at::Tensor& v0, int64_t iters,
                                                                      double eps) {
  check_matrix_batch("spectral_norm_step", W);
  TORCH_CHECK_VALUE(iters >= 0, "lipfast.spectral_norm_step: iters must be >= 0, got ", iters);
  const Flattened f = flatten_matrices(W);
  TORCH_CHECK_VALUE(u0.numel() == f.B * f.m && v0.numel() == f.B * f.n,
                    "lipfast.spectral_norm_step: u and v must have W.shape[:-1] and W.shape[:-2] + (n,) entries");
  auto u = u0.detach().reshape({f.B, f.m}).to(f.compute).clone();
  auto v = v0.detach().reshape({f.B, f.n}).to(f.compute).clone();
  auto sigma = at::empty({f.B}, f.W.options());
  AT_DISPATCH_FLOATING_TYPES(f.compute, "lipfast_spectral_norm_step", [&] {
    scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* up = u.data_ptr<scalar_t>();
    scalar_t* sp = sigma.data_ptr<scalar_t>();
    for_each_matrix(f.W.data_ptr<scalar_t>(), f.B, f.m, f.n, [&](const auto& gram, int64_t b, LanczosWork<scalar_t>& work) {
      scalar_t* x = vp + b * f.n;
      scalar_t* t = up + b * f.m;
      if (iters == 0) {
        auto& wx = work.w;
        wx.resize(f.m);
        gram.matvec(x, wx.data());
        sp[b] = static_cast<scalar_t>(dot(t, wx.data(), f.m));
        return;
      }
      auto& z = work.w;
      z.resize(f.n);
      double s = 0;
      for (int64_t it = 0; it < iters; ++it) {
        gram(x, z.data(), t);
        const double a = std::max(norm(t, f.m), eps);
        scale(t, 1.0 / a, f.m);
        const double nz = norm(z.data(), f.n) / a;
        const double c = std::max(nz, eps);
        for (int64_t j = 0; j < f.n; ++j) x[j] = static_cast<scalar_t>(static_cast<double>(z[j]) / a / c);
        s = nz * nz / c;
      }
      sp[b] = static_cast<scalar_t>(s);
    });
  });
  const auto dtype = W.scalar_type();
  return {sigma.to(dtype).reshape(f.batch_shape), u.to(dtype).reshape(with_last(f.batch_shape, f.m)),
          v.to(dtype).reshape(with_last(f.batch_shape, f.n))};
}

std::tuple<at::Tensor, at::Tensor> dense_spectral_norm_bounds_cpu(const at::Tensor& W, double rtol, int64_t max_iters,
                                                                  int64_t max_gram_steps) {
  check_matrix_batch("spectral_norm_bounds", W);
  TORCH_CHECK_VALUE(rtol > 0 && std::isfinite(rtol), "lipfast.spectral_norm_bounds: rtol must be positive, got ", rtol);
  TORCH_CHECK_VALUE(max_iters >= 1, "lipfast.spectral_norm_bounds: max_iters must be >= 1, got ", max_iters);
  TORCH_CHECK_VALUE(max_gram_steps >= 1, "lipfast.spectral_norm_bounds: max_gram_steps must be >= 1, got ",
                    max_gram_steps);
  const Flattened f = flatten_matrices(W);
  const at::Tensor Wk = scan_and_check("spectral_norm_bounds", W, f).first;  // only v is taken from it
  // Lower end: a Rayleigh quotient at a Lanczos vector converged well inside the requested gap.
  auto v = start_vectors("spectral_norm_bounds", std::nullopt, f);
  AT_DISPATCH_FLOATING_TYPES(f.compute, "lipfast_dense_spectral_norm_bounds", [&] {
    scalar_t* vp = v.data_ptr<scalar_t>();
    for_each_matrix(Wk.data_ptr<scalar_t>(), f.B, f.m, f.n, [&](const auto& gram, int64_t b, LanczosWork<scalar_t>& work) {
      lanczos_top(gram, f.n, vp + b * f.n, max_iters, rtol / 8, work);
    });
  });
  auto lower = certified_rayleigh_lower(f.W, v);
  auto upper = gram_upper_bound(f.W, lower * bracket_stop_factor(rtol, W.scalar_type()), max_gram_steps);
  const auto dtype = W.scalar_type();
  return {round_directed(lower, dtype, /*up=*/false).reshape(f.batch_shape),
          round_directed(upper, dtype, /*up=*/true).reshape(f.batch_shape)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("dense_spectral_norm", &dense_spectral_norm_cpu);
  m.impl("dense_spectral_norm_bounds", &dense_spectral_norm_bounds_cpu);
  m.impl("dense_power_iteration", &dense_power_iteration_cpu);
  m.impl("spectral_norm_step", &spectral_norm_step_cpu);
}

}  // namespace lipfast

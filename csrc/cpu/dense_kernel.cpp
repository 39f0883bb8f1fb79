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
#include "lanczos.h"
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

// The fixed default start vector (lanczos.h), entry by entry.
template <typename T>
void default_start_vector(T* v, int64_t n) {
  for (int64_t j = 0; j < n; ++j) v[j] = static_cast<T>(default_start_entry(j));
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
// Lanczos on A = WᵀW with full reorthogonalization (classical Gram–Schmidt, repeated when it
// removed a large part of the vector) and explicit restarts from the Ritz vector when the basis is
// full, under LanczosControl's stopping rules (lanczos.h).  Each step costs one pass over W.  On
// return v holds the unit Ritz vector of the largest Ritz value; the return value is the residual
// bound on its relative error.

template <typename T>
struct LanczosWork {
  std::vector<T> basis, w, correction;
  std::vector<double> alpha, beta, s, tri;
  std::vector<unsigned char> swapped;
};

template <typename T, typename Gram>
double lanczos_top(const Gram& gram, int64_t n, T* v, int64_t max_passes, double rtol, LanczosWork<T>& work) {
  LanczosControl control(n, std::min(gram.m, n), max_passes, rtol, std::numeric_limits<T>::epsilon());
  const int64_t cap = control.cap;
  // The basis grows as the iteration needs it: a matrix of rank r breaks down after r + 1 steps,
  // so a wide or low-rank matrix never pays for cap vectors of length n.
  if (work.basis.size() < static_cast<size_t>(2 * n)) work.basis.resize(2 * n);
  work.w.resize(n);
  work.correction.resize(n);
  work.alpha.resize(cap); work.beta.resize(cap); work.s.resize(cap);
  work.tri.resize(7 * cap); work.swapped.resize(cap);
  T* Q = work.basis.data();
  T* w = work.w.data();
  T* correction = work.correction.data();
  double* alpha = work.alpha.data();
  double* beta = work.beta.data();
  double* s = work.s.data();
  double* tri = work.tri.data();
  const TridiagonalScratch scratch{tri, tri + cap, tri + 2 * cap, tri + 3 * cap, tri + 4 * cap, tri + 5 * cap,
                                   tri + 6 * cap, work.swapped.data()};

  double start_norm = norm(v, n);
  if (!(start_norm > 0) || !std::isfinite(start_norm)) {
    default_start_vector(v, n);
    start_norm = norm(v, n);
  }
  std::copy(v, v + n, Q);
  scale(Q, 1.0 / start_norm, n);

  for (;;) {  // one sweep per (re)start, Q[0] holding the start vector
    control.start_sweep();
    for (int64_t k = 0;; ++k) {
      const T* q = Q + k * n;
      gram(q, w);
      ++control.passes;
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
      bool done = false;
      if (control.should_solve(k, b)) {
        std::fill(s + control.checked, s + k + 1, 0.0);  // the previous eigenvector, padded: the guess
        const double theta = tridiagonal_top_eigenpair(alpha, beta, k + 1, s, control.checked > 0, scratch);
        done = control.after_solve(k, theta, s[k], b);
      }
      if (done || control.full(k)) {
        std::fill(v, v + n, T(0));
        for (int64_t j = 0; j <= k; ++j) axpy(s[j], Q + j * n, v, n);
        const double nv = norm(v, n);
        scale(v, 1.0 / nv, n);
        if (done) return control.rel_err;
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
// all are finite), and fills scales[b] with range_scale(max|W_b|) (dense.h).
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
    scales[b] = static_cast<T>(range_scale(big, std::numeric_limits<T>::max_exponent));
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
  m.impl("dense_spectral_norm_bounds_many", &lipfast::dense_spectral_norm_bounds_many);
  m.impl("dense_power_iteration", &dense_power_iteration_cpu);
  m.impl("spectral_norm_step", &spectral_norm_step_cpu);
}

}  // namespace lipfast

// CPU kernels of the batched Hermitian ops (csrc/hermitian.h), one matrix per task.
//
// hermitian_gram: H = KᴴK from K = A + i B stacked as [A; B], the lower triangles by the blocked
// Hermitian rank-k update of herk.h (4 p q^2 flops where the real form of the complex product,
// AᵀA + BᵀB and AᵀB - BᵀA in full, takes 6 p q^2), then mirrored: re exactly symmetric, im exactly
// antisymmetric.
//
// hermitian_cholesky_test: the Cholesky factorization of M = re + i im + diag(shift), held as two
// real arrays (no complex copy, no LAPACK call per small matrix, no factor written back), right-
// looking in panels of 16 or 32 columns: each panel is factored column by column in a column-major
// copy, and the trailing matrix then takes W -= L Lᴴ for the whole panel in one blocked pass of
// herk.h.  It answers whether every pivot was positive; each entry of the factor is the usual
// (M_ij - a sum of products, in some order) / L_jj, so the usual backward-error bound of Cholesky
// holds for it (the caller's certificate rests on that bound).  Memory: 2 q^2 scratch values per
// task (re and im), and the panel.
//
// hermitian_power_gain: `steps` power steps y = H x, x = y / ‖y‖ from one start for every matrix,
// all steps while the matrix is in cache (the batched ATen form reads every matrix once per step).
#include "hermitian.h"
#include "herk.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace lipfast {
namespace {

// One later column of a panel: for i < n, d_i -= L_i conj(L_l) with L_i = (lr[i], li[i]) and L_l = (a, b):
//   dr[i] -= lr[i] a + li[i] b,   di[i] -= li[i] a - lr[i] b.
template <typename T>
inline __attribute__((always_inline)) void panel_column_body(T* __restrict__ dr, T* __restrict__ di,
                                                            const T* __restrict__ lr, const T* __restrict__ li, T a,
                                                            T b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    dr[i] -= lr[i] * a + li[i] * b;
    di[i] -= li[i] * a - lr[i] * b;
  }
}

// The same for a real panel: d_i -= l_i a.
template <typename T>
inline __attribute__((always_inline)) void panel_column_real_body(T* __restrict__ d, const T* __restrict__ l, T a,
                                                                 int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] -= l[i] * a;
}

// (yr, yi) = H x for one matrix (rows of re and im, length q).
template <typename T>
inline __attribute__((always_inline)) void hermitian_matvec_body(const T* __restrict__ re, const T* __restrict__ im,
                                                                const T* __restrict__ xr, const T* __restrict__ xi,
                                                                T* __restrict__ yr, T* __restrict__ yi, int64_t q) {
  for (int64_t i = 0; i < q; ++i) {
    const T* __restrict__ r = re + i * q;
    const T* __restrict__ m = im + i * q;
    T sr = 0, si = 0;
#pragma omp simd reduction(+ : sr, si)
    for (int64_t l = 0; l < q; ++l) {
      sr += r[l] * xr[l] - m[l] * xi[l];
      si += m[l] * xr[l] + r[l] * xi[l];
    }
    yr[i] = sr;
    yi[i] = si;
  }
}

#define LIPFAST_HERMITIAN_KERNELS(T)                                                                        \
  LIPFAST_SIMD_CLONES void panel_column(T* dr, T* di, const T* lr, const T* li, T a, T b, int64_t n) {         \
    panel_column_body<T>(dr, di, lr, li, a, b, n);                                                          \
  }                                                                                                          \
  LIPFAST_SIMD_CLONES void panel_column_real(T* d, const T* l, T a, int64_t n) {                              \
    panel_column_real_body<T>(d, l, a, n);                                                                   \
  }                                                                                                          \
  LIPFAST_SIMD_CLONES void hermitian_matvec(const T* re, const T* im, const T* xr, const T* xi, T* yr, T* yi, \
                                            int64_t q) {                                                     \
    hermitian_matvec_body<T>(re, im, xr, xi, yr, yi, q);                                                     \
  }

LIPFAST_HERMITIAN_KERNELS(float)
LIPFAST_HERMITIAN_KERNELS(double)

// Runs body(b, work) once for every b in [0, B), on the intra-op threads, each with its own scratch
// vector of `workspace` values.  The matrices are handed out one at a time as threads come free, not
// in fixed ranges: a batch mixes real matrices (a quarter of the work) with complex ones, and fixed
// ranges left one thread with most of the complex ones (on a 4x4 grid's 10 frequencies, 5 units of
// work against 2).
template <typename T, typename Body>
void for_each_matrix(int64_t B, int64_t workspace, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t tasks = std::min<int64_t>(B, at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    std::vector<T> work(workspace);
    for (int64_t b = next.fetch_add(1); b < B; b = next.fetch_add(1)) body(b, work.data());
  });
}

// Completes a Hermitian matrix from its lower triangle: re symmetric and im antisymmetric exactly,
// im's diagonal zero (its exact value; the computed one is a difference of equal products).  In
// blocks, so that neither side of the copy walks a whole column.
template <typename T>
void mirror_lower(T* re, T* im, int64_t q) {
  constexpr int64_t kSide = 16;
  for (int64_t i0 = 0; i0 < q; i0 += kSide) {
    for (int64_t j0 = 0; j0 <= i0; j0 += kSide) {
      for (int64_t i = i0; i < std::min(i0 + kSide, q); ++i) {
        for (int64_t j = j0; j < std::min(j0 + kSide, i); ++j) {
          re[j * q + i] = re[i * q + j];
          im[j * q + i] = -im[i * q + j];
        }
      }
    }
    for (int64_t i = i0; i < std::min(i0 + kSide, q); ++i) im[i * q + i] = T(0);
  }
}

// Panel width of the blocked factorization: the trailing matrix is swept once per panel, and the
// panel's own columns are updated one by one (q width^2 / 2 of the work, in plain vector loops), so
// narrower panels for smaller matrices (measured: q = 128, 16 columns 1.7x faster than 32; q = 512,
// 32 columns).
constexpr int64_t kBlock = 32;
inline int64_t panel_width(int64_t q) { return q <= 256 ? kBlock / 2 : kBlock; }

// Values of workspace cholesky_completes needs.
template <typename T>
int64_t cholesky_workspace(int64_t q) {
  return 2 * q * q + 2 * kBlock * q + herk::workspace<T>(q);
}

// Whether the Cholesky factorization of re + i im + shift I (lower triangles read) completes.
// Right-looking in panels of panel_width(q) columns: the panel is copied out column-major, factored column
// by column (its later columns updated as it goes, one contiguous loop per column), and the trailing
// matrix then takes the panel's update W -= L Lᴴ in one blocked pass (herk_lower, with X the panel's
// conjugated columns).  Every factor entry is (M_ij - a sum of products in some order) / L_jj.
template <typename T>
bool cholesky_completes(const T* re, const T* im, T shift, int64_t q, T* work) {
  T* wr = work;
  T* wi = wr + q * q;
  T* pr = wi + q * q;        // the panel's columns (real parts), column t at pr + t q, rows >= its start
  T* pi = pr + kBlock * q;   // imaginary parts
  T* packed = pi + kBlock * q;
  bool real = true;  // im zero below the diagonal: a real factorization (a quarter of the work)
  for (int64_t i = 0; i < q; ++i) {  // lower triangles in, zeros above (read by tiles, never used)
    std::copy(re + i * q, re + i * q + i + 1, wr + i * q);
    std::copy(im + i * q, im + i * q + i + 1, wi + i * q);
    std::fill(wr + i * q + i + 1, wr + (i + 1) * q, T(0));
    std::fill(wi + i * q + i + 1, wi + (i + 1) * q, T(0));
    wr[i * q + i] += shift;
    for (int64_t j = 0; j < i; ++j) real = real && wi[i * q + j] == T(0);
  }
  const int64_t block = panel_width(q);
  for (int64_t j0 = 0; j0 < q; j0 += block) {
    const int64_t width = std::min(block, q - j0);
    for (int64_t i = j0; i < q; ++i) {
      for (int64_t t = 0; t < width; ++t) {
        pr[t * q + i] = wr[i * q + j0 + t];
        pi[t * q + i] = wi[i * q + j0 + t];
      }
    }
    for (int64_t t = 0; t < width; ++t) {
      const int64_t j = j0 + t;
      T* cr = pr + t * q;
      T* ci = pi + t * q;
      const T pivot = cr[j];
      if (!(pivot > T(0))) return false;  // NaN fails too
      const T diag = std::sqrt(pivot);
      for (int64_t i = j + 1; i < q; ++i) {
        cr[i] /= diag;
        ci[i] /= diag;  // zeros stay zeros when real
      }
      for (int64_t u = t + 1; u < width; ++u) {  // the panel's later columns l = j0 + u, rows i >= l
        const int64_t l = j0 + u;
        if (real) {
          panel_column_real(pr + u * q + l, cr + l, cr[l], q - l);
        } else {
          panel_column(pr + u * q + l, pi + u * q + l, cr + l, ci + l, cr[l], ci[l], q - l);
        }
      }
    }
    const int64_t next = j0 + width;
    if (next == q) break;
    for (int64_t t = 0; t < width && !real; ++t) {  // X_ti = conj(L_i,j0+t), so that Xᴴ X = L Lᴴ
      for (int64_t i = next; i < q; ++i) pi[t * q + i] = -pi[t * q + i];
    }
    herk::herk_lower(pr + next, real ? nullptr : pi + next, q, width, q - next, true, wr + next * q + next,
                     wi + next * q + next, q, packed);
  }
  return true;
}

at::Tensor hermitian_cholesky_test_cpu(const at::Tensor& re_in, const at::Tensor& im_in, const at::Tensor& shift_in) {
  check_hermitian_args("hermitian_cholesky_test", re_in, im_in, shift_in, false);
  const at::Tensor re = re_in.contiguous(), im = im_in.contiguous(), shift = shift_in.contiguous();
  const int64_t B = re.size(0), q = re.size(1);
  at::Tensor ok = at::zeros({B}, re.options().dtype(at::kBool));
  bool* out = ok.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(re.scalar_type(), "lipfast_hermitian_cholesky_test", [&] {
    const scalar_t* r = re.const_data_ptr<scalar_t>();
    const scalar_t* m = im.const_data_ptr<scalar_t>();
    const scalar_t* s = shift.const_data_ptr<scalar_t>();
    for_each_matrix<scalar_t>(B, cholesky_workspace<scalar_t>(q), [&](int64_t b, scalar_t* work) {
      out[b] = cholesky_completes<scalar_t>(r + b * q * q, m + b * q * q, s[b], q, work);
    });
  });
  return ok;
}

std::tuple<at::Tensor, at::Tensor> hermitian_gram_cpu(const at::Tensor& S_in, int64_t p, bool negate) {
  check_gram_args("hermitian_gram", S_in, p);
  const at::Tensor S = S_in.contiguous();
  const int64_t B = S.size(0), q = S.size(2);
  at::Tensor re = at::empty({B, q, q}, S.options()), im = at::empty({B, q, q}, S.options());
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "lipfast_hermitian_gram", [&] {
    const scalar_t* s = S.const_data_ptr<scalar_t>();
    scalar_t* out_r = re.data_ptr<scalar_t>();
    scalar_t* out_i = im.data_ptr<scalar_t>();
    for_each_matrix<scalar_t>(B, herk::workspace<scalar_t>(q), [&](int64_t b, scalar_t* work) {
      const scalar_t* x = s + b * 2 * p * q;
      scalar_t* cr = out_r + b * q * q;
      scalar_t* ci = out_i + b * q * q;
      std::fill(cr, cr + q * q, scalar_t(0));
      std::fill(ci, ci + q * q, scalar_t(0));
      const bool real = std::all_of(x + p * q, x + 2 * p * q, [](scalar_t v) { return v == scalar_t(0); });
      herk::herk_lower(x, real ? nullptr : x + p * q, q, p, q, negate, cr, ci, q, work);
      mirror_lower(cr, ci, q);
    });
  });
  return {re, im};
}

at::Tensor hermitian_power_gain_cpu(const at::Tensor& re_in, const at::Tensor& im_in, const at::Tensor& start_in,
                                    int64_t steps) {
  check_hermitian_args("hermitian_power_gain", re_in, im_in, start_in, true);
  TORCH_CHECK_VALUE(steps >= 1, "hermitian_power_gain: steps must be >= 1, got ", steps);
  const at::Tensor re = re_in.contiguous(), im = im_in.contiguous(), start = start_in.contiguous();
  const int64_t B = re.size(0), q = re.size(1);
  at::Tensor gain = at::empty({B}, re.options());
  AT_DISPATCH_FLOATING_TYPES(re.scalar_type(), "lipfast_hermitian_power_gain", [&] {
    const scalar_t* r = re.const_data_ptr<scalar_t>();
    const scalar_t* m = im.const_data_ptr<scalar_t>();
    const scalar_t* x0 = start.const_data_ptr<scalar_t>();
    scalar_t* g = gain.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> work(4 * q);
      scalar_t *xr = work.data(), *xi = xr + q, *yr = xi + q, *yi = yr + q;
      for (int64_t b = begin; b < end; ++b) {
        std::copy(x0, x0 + 2 * q, xr);  // xr then xi
        scalar_t norm = 0;
        for (int64_t s = 0; s < steps; ++s) {
          hermitian_matvec(r + b * q * q, m + b * q * q, xr, xi, yr, yi, q);
          scalar_t sq = 0;
          for (int64_t i = 0; i < q; ++i) sq += yr[i] * yr[i] + yi[i] * yi[i];
          norm = std::sqrt(sq);
          const scalar_t scale = std::max(norm, std::numeric_limits<scalar_t>::min());
          for (int64_t i = 0; i < q; ++i) {
            xr[i] = yr[i] / scale;
            xi[i] = yi[i] / scale;
          }
        }
        g[b] = norm;
      }
    });
  });
  return gain;
}

}  // namespace
}  // namespace lipfast

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("hermitian_cholesky_test", &lipfast::hermitian_cholesky_test_cpu);
  m.impl("hermitian_power_gain", &lipfast::hermitian_power_gain_cpu);
  m.impl("hermitian_gram", &lipfast::hermitian_gram_cpu);
}

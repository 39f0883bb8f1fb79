// CPU kernels of the batched Hermitian ops (csrc/hermitian.h), one matrix per task.
//
// hermitian_cholesky_test: the Cholesky factorization of M = re + i im + diag(shift), held as two
// real arrays (no complex copy, no LAPACK call per small matrix, no factor written back), right-
// looking in panels of four columns: every later row i takes M_il -= sum over the panel's j of
// L_ij conj(L_lj) for l in its trailing part, one contiguous loop over l with the four L_ij broadcast
// (one sweep over the trailing matrix per four columns).  It answers whether every pivot was positive; each
// entry of the factor is the usual (M_ij - a sum of products, in some order) / L_jj, so the usual
// backward-error bound of Cholesky holds for it (the caller's certificate rests on that bound).
// Memory: 2 q^2 scratch values per task (re and im of the lower triangle), in cache up to q ~ 256.
//
// hermitian_power_gain: `steps` power steps y = H x, x = y / ‖y‖ from one start for every matrix,
// all steps while the matrix is in cache (the batched ATen form reads every matrix once per step).
#include "hermitian.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace lipfast {
namespace {

// Panel width of the factorization: the trailing update applies this many columns per sweep.
constexpr int64_t kPanel = 4;

// Row i of the trailing update by one panel: for l < n,
//   dr[l] -= sum_t a_t pr_t[l] + b_t pi_t[l],   di[l] -= sum_t b_t pr_t[l] - a_t pi_t[l]
// with (a_t, b_t) = L_it and pr_t = pr + t * stride (likewise pi) the panel's scaled columns.
template <typename T>
inline __attribute__((always_inline)) void panel_row_body(T* __restrict__ dr, T* __restrict__ di,
                                                         const T* __restrict__ pr, const T* __restrict__ pi,
                                                         int64_t stride, const T* __restrict__ a,
                                                         const T* __restrict__ b, int64_t n) {
  const T a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
  const T b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
  const T* __restrict__ r0 = pr;
  const T* __restrict__ r1 = pr + stride;
  const T* __restrict__ r2 = pr + 2 * stride;
  const T* __restrict__ r3 = pr + 3 * stride;
  const T* __restrict__ i0 = pi;
  const T* __restrict__ i1 = pi + stride;
  const T* __restrict__ i2 = pi + 2 * stride;
  const T* __restrict__ i3 = pi + 3 * stride;
#pragma omp simd
  for (int64_t l = 0; l < n; ++l) {
    dr[l] -= (a0 * r0[l] + b0 * i0[l]) + (a1 * r1[l] + b1 * i1[l]) + (a2 * r2[l] + b2 * i2[l]) +
             (a3 * r3[l] + b3 * i3[l]);
    di[l] -= (b0 * r0[l] - a0 * i0[l]) + (b1 * r1[l] - a1 * i1[l]) + (b2 * r2[l] - a2 * i2[l]) +
             (b3 * r3[l] - a3 * i3[l]);
  }
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
  LIPFAST_SIMD_CLONES void panel_row(T* dr, T* di, const T* pr, const T* pi, int64_t stride, const T* a,      \
                                     const T* b, int64_t n) {                                                \
    panel_row_body<T>(dr, di, pr, pi, stride, a, b, n);                                                     \
  }                                                                                                          \
  LIPFAST_SIMD_CLONES void hermitian_matvec(const T* re, const T* im, const T* xr, const T* xi, T* yr, T* yi, \
                                            int64_t q) {                                                     \
    hermitian_matvec_body<T>(re, im, xr, xi, yr, yi, q);                                                     \
  }

LIPFAST_HERMITIAN_KERNELS(float)
LIPFAST_HERMITIAN_KERNELS(double)

// Whether the Cholesky factorization of re + i im + shift I (lower triangles read) completes.
// work: 2 q^2 + 2 kPanel q values.  Right-looking in panels of kPanel columns: each panel is
// factored column by column (its later columns updated as it goes), then every later row takes the
// panel's update in one sweep.
template <typename T>
bool cholesky_completes(const T* re, const T* im, T shift, int64_t q, T* work) {
  T* wr = work;
  T* wi = wr + q * q;
  T* pr = wi + q * q;       // the panel's scaled columns L_ij (real parts), column t at pr + t q
  T* pi = pr + kPanel * q;  // imaginary parts
  for (int64_t i = 0; i < q; ++i) {
    std::copy(re + i * q, re + i * q + i + 1, wr + i * q);
    std::copy(im + i * q, im + i * q + i + 1, wi + i * q);
    wr[i * q + i] += shift;
  }
  T a[kPanel], b[kPanel];
  for (int64_t j0 = 0; j0 < q; j0 += kPanel) {
    const int64_t width = std::min(kPanel, q - j0);
    std::fill(pr, pr + 2 * kPanel * q, T(0));  // a narrow last panel contributes exact zeros
    for (int64_t t = 0; t < width; ++t) {
      const int64_t j = j0 + t;
      const T pivot = wr[j * q + j];
      if (!(pivot > T(0))) return false;  // NaN fails too
      const T diag = std::sqrt(pivot);
      T* cr = pr + t * q;
      T* ci = pi + t * q;
      for (int64_t i = j + 1; i < q; ++i) {
        cr[i] = wr[i * q + j] / diag;
        ci[i] = wi[i * q + j] / diag;
      }
      for (int64_t l = j + 1; l < j0 + width; ++l) {  // the panel's later columns, rows i >= l
        for (int64_t i = l; i < q; ++i) {
          wr[i * q + l] -= cr[i] * cr[l] + ci[i] * ci[l];
          wi[i * q + l] -= ci[i] * cr[l] - cr[i] * ci[l];
        }
      }
    }
    const int64_t next = j0 + width;
    for (int64_t i = next; i < q; ++i) {
      for (int64_t t = 0; t < kPanel; ++t) {
        a[t] = pr[t * q + i];
        b[t] = pi[t * q + i];
      }
      panel_row(wr + i * q + next, wi + i * q + next, pr + next, pi + next, q, a, b, i - next + 1);
    }
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
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> work(2 * q * q + 2 * kPanel * q);
      for (int64_t b = begin; b < end; ++b) {
        out[b] = cholesky_completes<scalar_t>(r + b * q * q, m + b * q * q, s[b], q, work.data());
      }
    });
  });
  return ok;
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
}

// CPU kernels of the batched Hermitian ops (csrc/hermitian.h), one matrix per task.
//
// hermitian_gram: H = KᴴK from K = A + i B stacked as [A; B], the lower triangles by the blocked
// Hermitian rank-k update of herk.h (4 p q^2 flops where the real form of the complex product,
// AᵀA + BᵀB and AᵀB - BᵀA in full, takes 6 p q^2), then mirrored: re exactly symmetric, im exactly
// antisymmetric.
//
// hermitian_cholesky_test: the Cholesky factorization of M = re + i im + diag(shift), held as two
// real arrays (no complex copy, no LAPACK call per small matrix, no factor written back), left-
// looking on the rows of U = Lᴴ: each panel of 32 rows first takes the update from all rows above
// it in one blocked pass of herk.h, then is factored in steps of 8 rows, each updated from the
// panel's rows above it by the same kernel.  It answers whether every pivot was positive; each
// entry of the factor is the usual (M_ij - a sum of products, in some order) / L_jj, so the usual
// backward-error bound of Cholesky holds for it (the caller's certificate rests on that bound).
// Memory: 2 q ld scratch values per task (re and im; ld = q rounded up to 8, plus 8), and a packed
// slab.
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

// One later row of a step (U = Lᴴ, rows contiguous): for i < n, d_i -= conj(u_l) u_i with
// u_i = (lr[i], li[i]) and u_l = (a, b):
//   dr[i] -= lr[i] a + li[i] b,   di[i] -= li[i] a - lr[i] b.
template <typename T>
inline __attribute__((always_inline)) void row_update_body(T* __restrict__ dr, T* __restrict__ di,
                                                          const T* __restrict__ lr, const T* __restrict__ li, T a,
                                                          T b, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    dr[i] -= lr[i] * a + li[i] * b;
    di[i] -= li[i] * a - lr[i] * b;
  }
}

// The same for a real matrix: d_i -= l_i a.
template <typename T>
inline __attribute__((always_inline)) void row_update_real_body(T* __restrict__ d, const T* __restrict__ l, T a,
                                                               int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] -= l[i] * a;
}

// (yr, yi) = H x for one matrix (rows of re and im, length q), four rows at a time: each row's two
// sums are chains of dependent multiply-adds, and one row alone left the multiply-adds waiting on
// those chains (one vector accumulator per sum); four rows keep eight chains in flight and load x
// once for all four.
template <typename T>
inline __attribute__((always_inline)) void hermitian_matvec_body(const T* __restrict__ re, const T* __restrict__ im,
                                                                const T* __restrict__ xr, const T* __restrict__ xi,
                                                                T* __restrict__ yr, T* __restrict__ yi, int64_t q) {
  int64_t i = 0;
  for (; i + 4 <= q; i += 4) {
    const T* __restrict__ r0 = re + i * q;
    const T* __restrict__ r1 = r0 + q;
    const T* __restrict__ r2 = r1 + q;
    const T* __restrict__ r3 = r2 + q;
    const T* __restrict__ m0 = im + i * q;
    const T* __restrict__ m1 = m0 + q;
    const T* __restrict__ m2 = m1 + q;
    const T* __restrict__ m3 = m2 + q;
    T sr0 = 0, si0 = 0, sr1 = 0, si1 = 0, sr2 = 0, si2 = 0, sr3 = 0, si3 = 0;
#pragma omp simd reduction(+ : sr0, si0, sr1, si1, sr2, si2, sr3, si3)
    for (int64_t l = 0; l < q; ++l) {
      const T a = xr[l], b = xi[l];
      sr0 += r0[l] * a - m0[l] * b;
      si0 += m0[l] * a + r0[l] * b;
      sr1 += r1[l] * a - m1[l] * b;
      si1 += m1[l] * a + r1[l] * b;
      sr2 += r2[l] * a - m2[l] * b;
      si2 += m2[l] * a + r2[l] * b;
      sr3 += r3[l] * a - m3[l] * b;
      si3 += m3[l] * a + r3[l] * b;
    }
    yr[i] = sr0, yi[i] = si0, yr[i + 1] = sr1, yi[i + 1] = si1;
    yr[i + 2] = sr2, yi[i + 2] = si2, yr[i + 3] = sr3, yi[i + 3] = si3;
  }
  for (; i < q; ++i) {
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

#define LIPFAST_HERMITIAN_KERNELS(T)                                                                         \
  LIPFAST_SIMD_CLONES void row_update(T* dr, T* di, const T* lr, const T* li, T a, T b, int64_t n) {         \
    row_update_body<T>(dr, di, lr, li, a, b, n);                                                             \
  }                                                                                                          \
  LIPFAST_SIMD_CLONES void row_update_real(T* d, const T* l, T a, int64_t n) {                               \
    row_update_real_body<T>(d, l, a, n);                                                                     \
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

// The factorization runs in panels of kPanel rows of U = Lᴴ, each in steps of kStep rows: every
// row's update from the rows above its panel comes in one long rank-k pass per panel (k = the
// panel's first row: one pass of the tiles over a long k, where a right-looking update sweeps the
// whole trailing matrix once per panel with k = the panel width), and from the rows above it in its
// own panel in short passes per step; only within a step are rows updated one by one (row
// operations, kStep^2 / 2 per column where a panel of 32 made that 512).  Measured on one core at
// q = 64 / 256 / 512 (complex): 1.3x / 1.45x / 1.35x the right-looking form in panels of 16 or 32;
// a panel of 64 or steps of 4 or 16 were no faster.
constexpr int64_t kPanel = 32;
constexpr int64_t kStep = 8;

// Row stride of the factorization's scratch: q rounded up to whole 64-byte lines, plus one line, so
// that no two rows lie a multiple of 4 KiB apart (at q = 512 the rows of an unpadded copy all map
// to one set of the L1 cache, and a row update's loads alias its stores: 1.2x slower overall).
inline int64_t scratch_stride(int64_t q) { return (q + 7) / 8 * 8 + 8; }

// Values of workspace cholesky_completes needs.
template <typename T>
int64_t cholesky_workspace(int64_t q) {
  return 2 * q * scratch_stride(q) + herk::workspace<T>(q);
}

// Whether the Cholesky factorization of re + i im + shift I (lower triangles read) completes.
// Computes U = Lᴴ row by row (row j of U: the conjugate of column j of L, contiguous), left-looking:
// the scratch starts as the upper triangle of M (U_ji holds conj(M_ij), i >= j); before row j is
// factored, U_ji -= sum over r < j of conj(U_rj) U_ri for all i >= j (herk_upper_rows, per panel and
// per step as above, then row by row within the step), then U_jj = sqrt(U_jj) (the pivot: false
// unless positive) and U_ji /= U_jj.  So every factor entry is (M_ij - a sum of products in some
// order) / L_jj, as in any order of the Cholesky factorization, and the usual backward-error bound
// holds for it (the caller's certificate rests on that bound).  Real matrices (im zero below the
// diagonal) take the real kernels, a quarter of the work.
template <typename T>
bool cholesky_completes(const T* re, const T* im, T shift, int64_t q, T* work) {
  const int64_t ld = scratch_stride(q);
  T* ur = work;
  T* ui = ur + q * ld;
  T* packed = ui + q * ld;
  bool real = true;
  constexpr int64_t kSide = 16;  // the transposing copy in tiles: rows of both sides stay in cache
  for (int64_t j0 = 0; j0 < q; j0 += kSide) {
    for (int64_t i0 = j0; i0 < q; i0 += kSide) {
      for (int64_t i = i0; i < std::min(i0 + kSide, q); ++i) {
        const int64_t j1 = std::min(j0 + kSide, i + 1);
        for (int64_t j = j0; j < j1; ++j) {
          ur[j * ld + i] = re[i * q + j];
          ui[j * ld + i] = -im[i * q + j];
          real = real && (j == i || im[i * q + j] == T(0));  // the diagonal's im is never read
        }
      }
    }
  }
  for (int64_t j = 0; j < q; ++j) ur[j * ld + j] += shift;
  for (int64_t p0 = 0; p0 < q; p0 += kPanel) {
    const int64_t p1 = std::min(p0 + kPanel, q);
    // rows [p0, p1) from every row above the panel: X = U's rows [0, p0), columns [p0, q)
    herk::herk_upper_rows(ur + p0, real ? nullptr : ui + p0, ld, p0, q - p0, p1 - p0, true, ur + p0 * ld + p0,
                          ui + p0 * ld + p0, ld, packed);
    for (int64_t s0 = p0; s0 < p1; s0 += kStep) {
      const int64_t s1 = std::min(s0 + kStep, p1);
      // rows [s0, s1) from the panel's rows above them
      herk::herk_upper_rows(ur + p0 * ld + s0, real ? nullptr : ui + p0 * ld + s0, ld, s0 - p0, q - s0, s1 - s0,
                            true, ur + s0 * ld + s0, ui + s0 * ld + s0, ld, packed);
      for (int64_t j = s0; j < s1; ++j) {
        T* rr = ur + j * ld;
        T* ri = ui + j * ld;
        const T pivot = rr[j];
        if (!(pivot > T(0))) return false;  // NaN fails too
        const T diag = std::sqrt(pivot);
        rr[j] = diag;
        for (int64_t i = j + 1; i < q; ++i) {
          rr[i] /= diag;
          ri[i] /= diag;  // zeros stay zeros when real
        }
        for (int64_t l = j + 1; l < s1; ++l) {  // the step's later rows l, columns i >= l
          if (real) {
            row_update_real(ur + l * ld + l, rr + l, rr[l], q - l);
          } else {
            row_update(ur + l * ld + l, ui + l * ld + l, rr + l, ri + l, rr[l], ri[l], q - l);
          }
        }
      }
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

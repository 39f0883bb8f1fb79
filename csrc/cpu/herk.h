// A blocked Hermitian rank-k update on split real arrays: the inner loop of the batched Hermitian
// kernels (hermitian_kernel.cpp), where the Gram matrices KᴴK of the circulant bound are formed and
// where their Cholesky test spends its time.
//
//   C += sign * Xᴴ X   on the lower triangle of C (herk_lower), or on the first rows of its upper
//                      triangle (herk_upper_rows: the Cholesky test's left-looking update),
//
// X (k x n complex) held as two real arrays (xr, xi) with row r at xr + r ldx, C (n x n) as two real
// row-major arrays (cr, ci) with leading dimension ldc.  Entry (i, j) gains sign * sum_r conj(X_ri) X_rj:
//   re: xr_ri xr_rj + xi_ri xi_rj,   im: xr_ri xi_rj - xi_ri xr_rj,
// each a sum of 2k products accumulated with fused multiply-adds in some order, then added to C_ij
// (so C_ij - sum is C_ij minus the 2k products summed in some order: the error analyses of Gram
// products and Cholesky that allow any summation order cover it).  Tiles that straddle the diagonal
// also update some entries above it, with their own exact values of the same product; nothing
// further above the diagonal is touched.
//
// Blocking: k in slabs of kSlab rows, each slab packed into panels of NR columns ([panel][row][NR],
// zero-padded), so the register tile (kTileRows rows x NR columns, re and im: 4 kTileRows vector
// accumulators of NR / 2 lanes) reads two vectors and 2 kTileRows scalars per row of X for 8
// kTileRows vector fused multiply-adds, all from a packed panel that stays in L1 (kSlab NR re and im
// values: 32 KiB).  Real X: tiles of 2 kTileRows rows (re only, the same 16 accumulators) and slabs
// of 2 kSlab rows (the same room in L1).  The row scalars are broadcast loads, which the multiply-
// adds' port never sees.  The tile is written with GCC vector extensions; the x86-64 build compiles
// it for 512-bit vectors (x86-64-v4), 256-bit (x86-64-v3) and 128-bit (baseline) and picks by CPU at
// run time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace lipfast {
namespace herk {

constexpr int64_t kTileRows = 4;
constexpr int64_t kSlab = 128;

// Values of workspace herk_lower needs for n columns (the packed slab, re and im, at the widest
// vector width).
template <typename T>
constexpr int64_t workspace(int64_t n) {
  constexpr int64_t widest = 2 * 64 / static_cast<int64_t>(sizeof(T));
  return 2 * kSlab * ((n + widest - 1) / widest) * widest;
}

template <typename T, int kBytes>
struct Tiles {
  static constexpr int64_t kLanes = kBytes / static_cast<int64_t>(sizeof(T));
  static constexpr int64_t kCols = 2 * kLanes;  // NR: a tile's columns, two vectors
  // A tile's rows: kTileRows for complex X (4 kTileRows accumulators); twice that for real X, whose
  // tile has only re (2 rows' worth of accumulators per row), so that it too keeps 16 of them in
  // flight (8 would leave the multiply-adds waiting on their own latency).  At most kCols, so that a
  // tile's rows never straddle two packed panels.
  template <bool kReal>
  static constexpr int64_t kRows = std::min<int64_t>(kReal ? 2 * kTileRows : kTileRows, kCols);
  typedef T Vec __attribute__((vector_size(kBytes)));

  static inline __attribute__((always_inline)) Vec load(const T* p) {
    Vec v;
    __builtin_memcpy(&v, p, sizeof(Vec));
    return v;
  }

  static inline __attribute__((always_inline)) void store(T* p, Vec v) { __builtin_memcpy(p, &v, sizeof(Vec)); }

  // *p in every lane.  On x86 with 256- or 512-bit vectors, one broadcast load (a load-port uop):
  // written out, GCC merges the tile's four neighbouring scalars into one vector load and spreads it
  // with two shuffles per lane-fill, which compete with the multiply-adds for their port.
  static inline __attribute__((always_inline)) Vec splat(const T* p) {
    Vec v;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    if constexpr (kBytes >= 32) {
      if constexpr (sizeof(T) == 8) {
        asm("vbroadcastsd %1, %0" : "=v"(v) : "m"(*p));
      } else {
        asm("vbroadcastss %1, %0" : "=v"(v) : "m"(*p));
      }
      return v;
    }
#endif
#pragma GCC unroll 16
    for (int64_t l = 0; l < kLanes; ++l) v[l] = *p;  // `Vec{} + x` would add a zero: -0 + 0 is +0
    return v;
  }

  // Packs rows [0, kc) of X (columns [0, n)) as [panel][row][kCols], zero beyond column n.
  static inline __attribute__((always_inline)) void pack(const T* __restrict__ x, int64_t ldx, int64_t kc,
                                                         int64_t n, T* __restrict__ out) {
    const int64_t panels = (n + kCols - 1) / kCols;
    for (int64_t pb = 0; pb < panels; ++pb) {
      const int64_t c0 = pb * kCols, width = std::min(kCols, n - c0);
      T* dst = out + pb * kc * kCols;
      for (int64_t r = 0; r < kc; ++r) {
        const T* src = x + r * ldx + c0;
        for (int64_t c = 0; c < width; ++c) dst[r * kCols + c] = src[c];
        for (int64_t c = width; c < kCols; ++c) dst[r * kCols + c] = T(0);
      }
    }
  }

  // One tile: rows i0 .. i0 + kRows - 1 (packed at ir/ii, offset within their panel), columns of
  // the panel at jr/ji; sum over kc rows, then C += sign * sum on the entries inside [0, n)^2.
  template <bool kReal>
  static inline __attribute__((always_inline)) void tile(const T* __restrict__ jr, const T* __restrict__ ji,
                                                         const T* __restrict__ ir, const T* __restrict__ ii,
                                                         int64_t kc, bool subtract, T* __restrict__ cr,
                                                         T* __restrict__ ci, int64_t ldc, int64_t rows,
                                                         int64_t cols) {
    constexpr int64_t R = kRows<kReal>;
    Vec re[R][2], im[R][2];
#pragma GCC unroll 8
    for (int64_t m = 0; m < R; ++m) {
      re[m][0] = re[m][1] = im[m][0] = im[m][1] = Vec{};
    }
    for (int64_t r = 0; r < kc; ++r) {
      const Vec ar0 = load(jr + r * kCols), ar1 = load(jr + r * kCols + kLanes);
      if (kReal) {  // X real: re only, im stays zero
#pragma GCC unroll 8
        for (int64_t m = 0; m < R; ++m) {
          const Vec br = splat(ir + r * kCols + m);
          re[m][0] += br * ar0;
          re[m][1] += br * ar1;
        }
        continue;
      }
      const Vec ai0 = load(ji + r * kCols), ai1 = load(ji + r * kCols + kLanes);
#pragma GCC unroll 8
      for (int64_t m = 0; m < R; ++m) {
        const Vec br = splat(ir + r * kCols + m);
        const Vec bi = splat(ii + r * kCols + m);
        re[m][0] += br * ar0;
        re[m][0] += bi * ai0;
        re[m][1] += br * ar1;
        re[m][1] += bi * ai1;
        im[m][0] += br * ai0;
        im[m][0] -= bi * ar0;
        im[m][1] += br * ai1;
        im[m][1] -= bi * ar1;
      }
    }
    if (rows == R && cols == kCols) {
#pragma GCC unroll 8
      for (int64_t m = 0; m < R; ++m) {
#pragma GCC unroll 2
        for (int64_t h = 0; h < 2; ++h) {
          T* dr = cr + m * ldc + h * kLanes;
          T* di = ci + m * ldc + h * kLanes;
          store(dr, subtract ? load(dr) - re[m][h] : load(dr) + re[m][h]);
          if (!kReal) store(di, subtract ? load(di) - im[m][h] : load(di) + im[m][h]);
        }
      }
      return;
    }
    T sr[R][kCols], si[R][kCols];
    __builtin_memcpy(sr, re, sizeof(sr));
    __builtin_memcpy(si, im, sizeof(si));
    for (int64_t m = 0; m < rows; ++m) {
      T* __restrict__ dr = cr + m * ldc;
      T* __restrict__ di = ci + m * ldc;
      for (int64_t c = 0; c < cols; ++c) {
        dr[c] = subtract ? dr[c] - sr[m][c] : dr[c] + sr[m][c];
        if (!kReal) di[c] = subtract ? di[c] - si[m][c] : di[c] + si[m][c];
      }
    }
  }

  // xi == nullptr: X real (C's im untouched, half the work).  upper_rows: rows [0, rows) of C,
  // by whole tiles that reach the diagonal or lie above it (a tile straddling the diagonal also
  // writes some entries below it, with their own exact values of the product); otherwise the lower
  // triangle (rows is n).
  static inline __attribute__((always_inline)) void run(const T* xr, const T* xi, int64_t ldx, int64_t k,
                                                        int64_t n, int64_t rows, bool upper_rows, bool subtract,
                                                        T* cr, T* ci, int64_t ldc, T* work) {
    if (xi == nullptr) return run_as<true>(xr, xr, ldx, k, n, rows, upper_rows, subtract, cr, ci, ldc, work);
    run_as<false>(xr, xi, ldx, k, n, rows, upper_rows, subtract, cr, ci, ldc, work);
  }

  template <bool kReal>
  static inline __attribute__((always_inline)) void run_as(const T* xr, const T* xi, int64_t ldx, int64_t k,
                                                           int64_t n, int64_t rows, bool upper_rows, bool subtract,
                                                           T* cr, T* ci, int64_t ldc, T* work) {
    // a real slab has twice the rows: its packed panel holds no imaginary parts, so it takes the
    // same room in L1, and C (read and written once per slab) is swept half as often
    constexpr int64_t slab = kReal ? 2 * kSlab : kSlab;
    const int64_t panels = (n + kCols - 1) / kCols;
    for (int64_t r0 = 0; r0 < k; r0 += slab) {
      const int64_t kc = std::min(slab, k - r0);
      T* pr = work;
      T* pi = work + panels * kc * kCols;
      pack(xr + r0 * ldx, ldx, kc, n, pr);
      if (!kReal) pack(xi + r0 * ldx, ldx, kc, n, pi);
      for (int64_t pb = 0; pb < panels; ++pb) {
        const int64_t j0 = pb * kCols, cols = std::min(kCols, n - j0);
        const T* jr = pr + pb * kc * kCols;
        const T* ji = pi + pb * kc * kCols;
        // tiles on or below the diagonal (lower), or on or above it (upper_rows)
        const int64_t first = upper_rows ? 0 : j0, last = upper_rows ? std::min(rows, j0 + cols) : n;
        for (int64_t i0 = first; i0 < last; i0 += kRows<kReal>) {
          const int64_t ib = i0 / kCols, offset = i0 - ib * kCols;
          tile<kReal>(jr, ji, pr + ib * kc * kCols + offset, pi + ib * kc * kCols + offset, kc, subtract,
                      cr + i0 * ldc + j0, ci + i0 * ldc + j0, ldc, std::min(kRows<kReal>, rows - i0), cols);
        }
      }
    }
  }
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
template <typename T>
__attribute__((target("arch=x86-64-v4"))) void run_v4(const T* xr, const T* xi, int64_t ldx, int64_t k, int64_t n,
                                                      int64_t rows, bool upper_rows, bool subtract, T* cr, T* ci,
                                                      int64_t ldc, T* work) {
  Tiles<T, 64>::run(xr, xi, ldx, k, n, rows, upper_rows, subtract, cr, ci, ldc, work);
}
template <typename T>
__attribute__((target("arch=x86-64-v3"))) void run_v3(const T* xr, const T* xi, int64_t ldx, int64_t k, int64_t n,
                                                      int64_t rows, bool upper_rows, bool subtract, T* cr, T* ci,
                                                      int64_t ldc, T* work) {
  Tiles<T, 32>::run(xr, xi, ldx, k, n, rows, upper_rows, subtract, cr, ci, ldc, work);
}

// The vector width this CPU runs: 4 (512-bit, x86-64-v4), 3 (256-bit, x86-64-v3) or 1 (128-bit).
inline int vector_level() {
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")
                               ? 4
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 3
                                                                                             : 1;
  return level;
}
#endif

// The widest vector code this CPU runs: run_v4 (512-bit), run_v3 (256-bit), or the baseline.
template <typename T>
void dispatch(const T* xr, const T* xi, int64_t ldx, int64_t k, int64_t n, int64_t rows, bool upper_rows,
              bool subtract, T* cr, T* ci, int64_t ldc, T* work) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  const int level = vector_level();
  if (level == 4) return run_v4<T>(xr, xi, ldx, k, n, rows, upper_rows, subtract, cr, ci, ldc, work);
  if (level == 3) return run_v3<T>(xr, xi, ldx, k, n, rows, upper_rows, subtract, cr, ci, ldc, work);
#endif
  Tiles<T, 16>::run(xr, xi, ldx, k, n, rows, upper_rows, subtract, cr, ci, ldc, work);
}

// C += (subtract ? -1 : 1) Xᴴ X on the lower triangle; work: workspace<T>(n) values.  xi == nullptr
// means X is real: only C's real part is updated (X's products have no imaginary part), with a
// quarter of the multiply-adds.
template <typename T>
void herk_lower(const T* xr, const T* xi, int64_t ldx, int64_t k, int64_t n, bool subtract, T* cr, T* ci,
                int64_t ldc, T* work) {
  if (k <= 0 || n <= 0) return;
  dispatch(xr, xi, ldx, k, n, n, false, subtract, cr, ci, ldc, work);
}

// C_ij += (subtract ? -1 : 1) sum_r conj(X_ri) X_rj for rows i in [0, rows) and columns j in [i, n):
// the first rows of the upper triangle of Xᴴ X (some entries just below the diagonal are written
// too, never read by the Cholesky test); work: workspace<T>(n) values.  xi == nullptr: X real.
template <typename T>
void herk_upper_rows(const T* xr, const T* xi, int64_t ldx, int64_t k, int64_t n, int64_t rows, bool subtract, T* cr,
                     T* ci, int64_t ldc, T* work) {
  if (k <= 0 || n <= 0 || rows <= 0) return;
  dispatch(xr, xi, ldx, k, n, std::min(rows, n), true, subtract, cr, ci, ldc, work);
}

}  // namespace herk
}  // namespace lipfast

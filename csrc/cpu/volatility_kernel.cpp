// CPU kernel for k-volatility over all pairs of n representations (knowledge continuity, Sun, Ma,
// Ge and Vosoughi, NeurIPS 2024).
//
// Shapes: hidden (n, d) (float32, float64, float16, bfloat16), losses (n,) float64, delta optional.
// For every unordered pair {i, j}: d_ij = ‖h_i − h_j‖₂, valid when 0 < d_ij <= delta, ratio
// r_ij = |l_i − l_j| / d_ij.  Returns score (0-dim float64: the mean ratio over valid pairs, NaN if
// none), per_sample (n,) float64 (the mean over the valid pairs that contain i, NaN if none) and
// counts (3,) int64: valid pairs, pairs at distance 0, and those of them with l_i != l_j.
//
// Method; memory O(n d + T²), never n × n:
//   1. Rows are grouped by exact equality (a hash, then comparison), so that d_ij = 0 is decided exactly.
//   2. C = (h − column mean) · 2^−e in the compute type (float32; float64 for float64 input), e chosen
//      so that max |c| lies in [1/2, 1); a_i = ‖c_i‖² in float64.
//   3. For each tile pair (I, J), J >= I, of T rows each: G = C_I C_Jᵀ is one BLAS product (ATen's
//      threads), then a fused epilogue, at::parallel_for over the rows of I, forms
//      d²_ij = a_i + a_j − 2 g_ij and adds each ratio to its row's and its column's sums.  Pairs with
//      d²_ij <= f (a_i + a_j) (f = near_fraction, volatility.h), where cancellation could make the
//      product's rounding error large, are set aside and redone exactly: rows of one group are at
//      distance 0; the others get d_ij from the input rows in float64 (long double for float64
//      input), which is never 0 for distinct rows.
// Numerical contract: zero distances and discontinuities are exact; any other d_ij has relative
// error below about γ_d / f (in practice near u √d); all sums are float64.  Each thread adds into
// its own per-sample buffers, merged in thread order, so results are deterministic for a given
// number of threads.
#include "simd.h"
#include "volatility.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace lipfast {
namespace {

// Rows per tile: the only pairwise buffer is T × T in the compute type (4 MiB in float32).
constexpr int64_t kTile = 1024;

// Accumulation type of the preparation passes and of the exact distances: long double for float64
// input, so that column sums, centred values and squared differences can neither overflow nor
// underflow to zero.
template <typename T>
struct Wide {
  using type = double;
};
template <>
struct Wide<double> {
  using type = long double;
};

// ---------------------------------------------------------------------------------------------
// Exact equality groups.

template <typename T>
inline uint64_t canonical_bits(T x) {
  // + 0 turns −0 into +0, so that the two zeros (which compare equal) hash alike.
  if constexpr (std::is_same_v<T, double>) {
    const double v = x + 0.0;
    uint64_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  } else {
    const float v = static_cast<float>(x) + 0.0f;
    uint32_t b;
    std::memcpy(&b, &v, sizeof b);
    return b;
  }
}

inline uint64_t mix(uint64_t h, uint64_t x) {  // splitmix64's finalizer over the running hash and x
  uint64_t z = (h ^ x) + 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

template <typename T>
bool rows_equal(const T* x, const T* y, int64_t d) {
  for (int64_t k = 0; k < d; ++k) {
    if (!(static_cast<float>(x[k]) == static_cast<float>(y[k]))) return false;
  }
  return true;
}

template <>
bool rows_equal<double>(const double* x, const double* y, int64_t d) {
  for (int64_t k = 0; k < d; ++k) {
    if (!(x[k] == y[k])) return false;
  }
  return true;
}

// group[i] = the smallest index of a row equal to row i (entrywise ==).
template <typename T>
std::vector<int64_t> group_rows(const T* h, int64_t n, int64_t d) {
  std::vector<uint64_t> hash(n);
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint64_t x = 0x243f6a8885a308d3ULL;
      for (int64_t k = 0; k < d; ++k) x = mix(x, canonical_bits(h[i * d + k]));
      hash[i] = x;
    }
  });
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return hash[x] != hash[y] ? hash[x] < hash[y] : x < y;
  });
  std::vector<int64_t> group(n);
  std::vector<int64_t> representatives;
  for (int64_t start = 0; start < n;) {
    int64_t stop = start;
    while (stop < n && hash[order[stop]] == hash[order[start]]) ++stop;
    representatives.clear();  // one per distinct row among this run of equal hashes
    for (int64_t p = start; p < stop; ++p) {
      const int64_t i = order[p];
      group[i] = i;
      for (int64_t r : representatives) {
        if (rows_equal(h + r * d, h + i * d, d)) {
          group[i] = r;
          break;
        }
      }
      if (group[i] == i) representatives.push_back(i);
    }
    start = stop;
  }
  return group;
}

// ---------------------------------------------------------------------------------------------
// Centring and scaling.

// c = (h − column mean) · 2^−e in C, a_i = ‖c_i‖² (float64); returns 2^e.
template <typename T, typename C>
double centre_rows(const T* h, int64_t n, int64_t d, C* c, double* a) {
  using W = typename Wide<T>::type;
  const int threads = at::get_num_threads();
  std::vector<W> column_sums(static_cast<size_t>(threads) * d, W(0));
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    W* s = column_sums.data() + static_cast<size_t>(at::get_thread_num()) * d;
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k = 0; k < d; ++k) s[k] += static_cast<W>(h[i * d + k]);
    }
  });
  std::vector<W> mean(d, W(0));
  for (int t = 0; t < threads; ++t) {
    for (int64_t k = 0; k < d; ++k) mean[k] += column_sums[static_cast<size_t>(t) * d + k];
  }
  for (int64_t k = 0; k < d; ++k) mean[k] /= static_cast<W>(n);

  std::vector<W> thread_max(threads, W(0));
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    W m = 0;
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k = 0; k < d; ++k) m = std::max(m, std::abs(static_cast<W>(h[i * d + k]) - mean[k]));
    }
    W& slot = thread_max[at::get_thread_num()];
    slot = std::max(slot, m);
  });
  const W max_abs = *std::max_element(thread_max.begin(), thread_max.end());
  int e = 0;
  if (max_abs > 0) std::frexp(max_abs, &e);
  e = std::clamp(e, -1022, 1023);  // keeps 2^e and 2^−e finite doubles
  const W inverse = std::ldexp(W(1), -e);

  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) {
        const C v = static_cast<C>((static_cast<W>(h[i * d + k]) - mean[k]) * inverse);
        c[i * d + k] = v;
        s += static_cast<double>(v) * static_cast<double>(v);
      }
      a[i] = s;
    }
  });
  return std::ldexp(1.0, e);
}

// ‖x − y‖₂ from the input rows, never 0 for distinct rows (see Wide).  Clustered representations
// send many pairs here (pairs inside a tight cluster are near), so the double version vectorizes.
template <typename T>
inline __attribute__((always_inline)) double exact_distance_body(const T* __restrict__ x, const T* __restrict__ y,
                                                                 int64_t d) {
  using W = typename Wide<T>::type;
  W s = 0;
  if constexpr (std::is_same_v<W, double>) {
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < d; ++k) {
      const double t = static_cast<double>(x[k]) - static_cast<double>(y[k]);
      s += t * t;
    }
  } else {
    for (int64_t k = 0; k < d; ++k) {
      const W t = static_cast<W>(x[k]) - static_cast<W>(y[k]);
      s += t * t;
    }
  }
  return static_cast<double>(std::sqrt(s));
}

LIPFAST_SIMD_CLONES double exact_distance(const float* x, const float* y, int64_t d) {
  return exact_distance_body(x, y, d);
}
double exact_distance(const double* x, const double* y, int64_t d) { return exact_distance_body(x, y, d); }
double exact_distance(const c10::Half* x, const c10::Half* y, int64_t d) { return exact_distance_body(x, y, d); }
double exact_distance(const c10::BFloat16* x, const c10::BFloat16* y, int64_t d) {
  return exact_distance_body(x, y, d);
}

// ---------------------------------------------------------------------------------------------
// The fused epilogue: one row i of a tile against `cols` columns.

struct RowSums {
  double sum;
  int64_t count;
  int64_t any_near;  // how many pairs were set aside
};

template <typename G>
inline __attribute__((always_inline)) RowSums row_pass_body(
    const G* __restrict__ g, const double* __restrict__ a, const double* __restrict__ l, double a_i, double l_i,
    double fraction, double scale, double delta, int64_t cols, double* __restrict__ col_sum,
    int64_t* __restrict__ col_count, uint8_t* __restrict__ near) {
  // Branch-free, so that it vectorizes: a near pair's distance is a placeholder (scale, never 0) and
  // its ratio is masked out.
  double sum = 0;
  int64_t count = 0;
  int64_t any_near = 0;
#pragma omp simd reduction(+ : sum, count, any_near)
  for (int64_t j = 0; j < cols; ++j) {
    const double s = a_i + a[j];
    const double d2 = s - 2.0 * static_cast<double>(g[j]);
    const bool is_near = d2 <= fraction * s;
    const double dist = std::sqrt(is_near ? 1.0 : d2) * scale;
    const bool ok = !is_near && dist <= delta;
    const double ratio = std::fabs(l_i - l[j]) / dist;
    const double r = ok ? ratio : 0.0;
    sum += r;
    count += ok;
    any_near += is_near;
    col_sum[j] += r;
    col_count[j] += ok;
    near[j] = is_near;
  }
  return {sum, count, any_near};
}

#define LIPFAST_ROW_PASS(G)                                                                               \
  LIPFAST_SIMD_CLONES RowSums row_pass(const G* g, const double* a, const double* l, double a_i, double l_i, \
                                       double fraction, double scale, double delta, int64_t cols,         \
                                       double* col_sum, int64_t* col_count, uint8_t* near) {              \
    return row_pass_body<G>(g, a, l, a_i, l_i, fraction, scale, delta, cols, col_sum, col_count, near);   \
  }
LIPFAST_ROW_PASS(float)
LIPFAST_ROW_PASS(double)
#undef LIPFAST_ROW_PASS

struct alignas(64) ThreadTotals {  // one cache line per thread
  double sum = 0;
  int64_t valid = 0;
  int64_t zero = 0;
  int64_t discontinuities = 0;
};

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> volatility_impl(const at::Tensor& hidden, const at::Tensor& losses,
                                                               double delta) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t n = hidden.size(0);
  const int64_t d = hidden.size(1);
  const T* h = hidden.const_data_ptr<T>();
  const double* l = losses.const_data_ptr<double>();

  const std::vector<int64_t> group = group_rows(h, n, d);
  at::Tensor centred = at::empty({n, d}, hidden.options().dtype(c10::CppTypeToScalarType<C>::value));
  std::vector<double> a(n);
  const double scale = centre_rows<T, C>(h, n, d, centred.mutable_data_ptr<C>(), a.data());
  const double fraction = near_fraction(d, std::numeric_limits<C>::epsilon() / 2);

  const int threads = at::get_num_threads();
  std::vector<double> sums(static_cast<size_t>(threads) * n, 0.0);
  std::vector<int64_t> counts(static_cast<size_t>(threads) * n, 0);
  std::vector<ThreadTotals> totals(threads);
  std::vector<uint8_t> near(static_cast<size_t>(threads) * kTile);
  at::Tensor tile = at::empty({kTile * kTile}, centred.options());

  for_each_tile_product(centred, kTile, tile, [&](int64_t i0, int64_t ti, int64_t j0, int64_t tj, const at::Tensor& g) {
    const C* gp = g.const_data_ptr<C>();
    const bool diagonal = i0 == j0;
    at::parallel_for(0, ti, 1, [&](int64_t begin, int64_t end) {
      const int t = at::get_thread_num();
      double* sum_t = sums.data() + static_cast<size_t>(t) * n;
      int64_t* count_t = counts.data() + static_cast<size_t>(t) * n;
      uint8_t* near_t = near.data() + static_cast<size_t>(t) * kTile;
      ThreadTotals& total = totals[t];
      for (int64_t ii = begin; ii < end; ++ii) {
        const int64_t i = i0 + ii;
        const int64_t first = j0 + (diagonal ? ii + 1 : 0);  // first column (global index)
        const int64_t cols = j0 + tj - first;
        if (cols <= 0) continue;
        RowSums row = row_pass(gp + ii * tj + (first - j0), a.data() + first, l + first, a[i], l[i], fraction,
                               scale, delta, cols, sum_t + first, count_t + first, near_t);
        if (row.any_near) {
          for (int64_t jj = 0; jj < cols; ++jj) {
            if (!near_t[jj]) continue;
            const int64_t j = first + jj;
            if (group[i] == group[j]) {
              ++total.zero;
              total.discontinuities += l[i] != l[j];
              continue;
            }
            const double dist = exact_distance(h + i * d, h + j * d, d);
            if (!(dist <= delta)) continue;
            const double r = std::fabs(l[i] - l[j]) / dist;
            row.sum += r;
            ++row.count;
            sum_t[j] += r;
            ++count_t[j];
          }
        }
        sum_t[i] += row.sum;
        count_t[i] += row.count;
        total.sum += row.sum;
        total.valid += row.count;
      }
    });
  });

  at::Tensor per_sample = at::empty({n}, losses.options());
  double* per = per_sample.mutable_data_ptr<double>();
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double s = 0;
      int64_t c = 0;
      for (int t = 0; t < threads; ++t) {
        s += sums[static_cast<size_t>(t) * n + i];
        c += counts[static_cast<size_t>(t) * n + i];
      }
      per[i] = c > 0 ? s / static_cast<double>(c) : std::numeric_limits<double>::quiet_NaN();
    }
  });
  ThreadTotals all;
  for (const ThreadTotals& t : totals) {
    all.sum += t.sum;
    all.valid += t.valid;
    all.zero += t.zero;
    all.discontinuities += t.discontinuities;
  }
  const double score = all.valid > 0 ? all.sum / static_cast<double>(all.valid) : std::numeric_limits<double>::quiet_NaN();
  at::Tensor stats = at::empty({3}, losses.options().dtype(at::kLong));
  int64_t* st = stats.mutable_data_ptr<int64_t>();
  st[0] = all.valid;
  st[1] = all.zero;
  st[2] = all.discontinuities;
  return {at::scalar_tensor(score, losses.options()), per_sample, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_volatility_cpu(const at::Tensor& hidden,
                                                                       const at::Tensor& losses,
                                                                       std::optional<double> delta) {
  check_volatility_args(hidden, losses, delta);
  const at::Tensor h = hidden.contiguous();
  const at::Tensor l = losses.contiguous();
  const double limit = delta.value_or(std::numeric_limits<double>::infinity());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "pairwise_volatility",
                                         [&] { return volatility_impl<scalar_t>(h, l, limit); });
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("pairwise_volatility", &pairwise_volatility_cpu);
}

}  // namespace lipfast

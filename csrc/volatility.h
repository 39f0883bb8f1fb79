// Shared declarations for the k-volatility op family (knowledge continuity, Sun et al. 2024).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>

namespace lipfast {

// Pairs {i, j} whose squared distance estimate d²_ij from the tile products is at most
// kNearFraction · (a_i + a_j) (a_i = ‖c_i‖², c the centred rows) are recomputed directly from the
// input rows: there the product's cancellation could make its rounding error large next to d²_ij.
// Everywhere else the relative error of d²_ij is below about 2 γ_d / kNearFraction (γ_d = d u / (1 − d u),
// u the compute type's unit roundoff); kernels with a larger γ_d raise the fraction (near_fraction).
constexpr double kNearFraction = 1.0 / 16.0;

// The fraction used for rows of length d in a compute type with unit roundoff `unit`:
// max(kNearFraction, 8 γ_d), capped at 1 (then every pair is recomputed).
double near_fraction(int64_t d, double unit);

// Checks hidden (n, d) floating, losses (n,) float64 on the same device, delta > 0 when given; throws
// ValueError / TypeError naming the argument.
void check_volatility_args(const at::Tensor& hidden, const at::Tensor& losses, std::optional<double> delta);

// Calls f(i0, ti, j0, tj, g) for every pair of row tiles I = [i0, i0 + ti), J = [j0, j0 + tj) of C
// (n, d) with J >= I, T rows each, where g = C_I C_Jᵀ (ti, tj) is one ATen product (BLAS or cuBLAS)
// written into `buffer` (at least T · T entries of C's dtype): the only pairwise storage.
template <typename F>
void for_each_tile_product(const at::Tensor& C, int64_t T, const at::Tensor& buffer, F&& f) {
  const int64_t n = C.size(0);
  for (int64_t i0 = 0; i0 < n; i0 += T) {
    const int64_t ti = std::min(T, n - i0);
    const at::Tensor rows = C.narrow(0, i0, ti);
    for (int64_t j0 = i0; j0 < n; j0 += T) {
      const int64_t tj = std::min(T, n - j0);
      at::Tensor g = buffer.narrow(0, 0, ti * tj).view({ti, tj});
      at::mm_out(g, rows, C.narrow(0, j0, tj).t());
      f(i0, ti, j0, tj, g);
    }
  }
}

}  // namespace lipfast

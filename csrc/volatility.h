// Shared declarations for the k-volatility op family (knowledge continuity, Sun et al. 2024).
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace lipfast

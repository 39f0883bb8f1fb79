// Shared declarations for the dense (matrix) op family: argument checks and the device-agnostic
// pieces of the certified bracket, used by the CPU and CUDA kernels alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ATen_fwd.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace lipfast {

// A batch W (..., m, n) as B = prod(...) matrices (B, m, n), contiguous, in the compute dtype (float32
// for the half types; a copy only when needed).
struct Flattened {
  std::vector<int64_t> batch_shape;
  int64_t B, m, n;
  at::ScalarType compute;
  at::Tensor W;
};
Flattened flatten_matrices(const at::Tensor& W);

// shape + [last]
std::vector<int64_t> with_last(std::vector<int64_t> shape, int64_t last);

// Start vectors (B, n) in the compute dtype, always a fresh buffer a kernel may overwrite: a copy of
// v0 (checked: W's device, floating, shape W.shape[:-2] + (n,)), or zeros when v0 is None (which
// tells the Lanczos kernels to use their fixed default start).
at::Tensor start_vectors(const char* op, const std::optional<at::Tensor>& v0, const Flattened& f);

// Checks the shape and dtype of a (..., m, n) batch of matrices for op `op`; throws the errors the
// Python layer documents (TypeError for a non-floating dtype, ValueError for a bad shape).
// `name` is how the message names the tensor.
void check_matrix_batch(const char* op, const at::Tensor& W, const std::string& name = "W");

// " in matrix W[i, j] (batch shape [m, n])" for flat matrix number `flat` of a batch of shape
// W.shape[:-2] (`name` is W); "" when there is no batch, so one matrix is not given an index.
std::string format_batch_index(const std::string& name, at::IntArrayRef batch_shape, int64_t flat);

// Throws ValueError naming the first matrix (by batch index) that holds a NaN or Inf entry.
// `first_bad` is the flat index of that matrix, or a value >= the batch size when all are finite.
void raise_if_nonfinite(const char* op, const at::Tensor& W, int64_t first_bad);

// The factor by which a matrix whose largest |entry| is `largest` is iterated on: 1, or, where
// `largest` lies outside [2^-32, 2^32], the power of two that brings it into [1, 2) (the iterations
// form WᵀW x, whose entries are of the order of sigma^2, and that must neither underflow nor
// overflow), capped at 2^(max_exponent - 1) so that it stays finite in a dtype of that exponent
// range.  0 and non-finite values give 1.
double range_scale(double largest, int max_exponent);

// Certified lower bound on sigma_max(W) for each matrix of W (B, m, n) from vectors v (B, n):
// ‖W v‖ / ‖v‖ evaluated in float64 and decreased by a bound on its rounding error.  Returns (B,) float64.
at::Tensor certified_rayleigh_lower(const at::Tensor& W, const at::Tensor& v);

// Certified upper bound on sigma_max(W) for each matrix of W (B, m, n) by Gram iteration in float64
// (Delattre et al., ICML 2023), with every rounding error of every step bounded and carried through.
// Stops once every matrix has upper <= target (B,) float64, or after max_steps squarings.  Returns
// (B,) float64; never below the true sigma_max of the matrix as stored.
at::Tensor gram_upper_bound(const at::Tensor& W, const at::Tensor& target, int64_t max_steps);

// Gram iteration stops once upper <= lower * this factor: 1 + rtol, shrunk by the outward rounding
// of both ends to `dtype` where that rounding is small against rtol (float32), so that the
// returned bracket still has upper / lower - 1 <= rtol.
double bracket_stop_factor(double rtol, at::ScalarType dtype);

// Rounds non-negative float64 values to `dtype`, upwards (up=true) or downwards, so that the rounded
// value still bounds the float64 one on the same side.
at::Tensor round_directed(const at::Tensor& x, at::ScalarType dtype, bool up);

// Certified brackets of every matrix of every tensor in Ws (each (..., m, n), any dtype, all on one
// device) by Gram iteration alone, the tensors with the same min(m, n) squared together in one
// batched product per step (ATen operators; the CPU and CUDA kernels both register it):
//   lower: ‖W x‖ / ‖x‖ in float64 less its rounding margin, x = G_t (G_t e_j) for the Gram iterate
//          G_t and its column j of largest diagonal entry (2^t power steps from e_j; no Lanczos),
//   upper: the Gram-iteration bound of gram_upper_bound.
// Stops once every bracket has upper <= lower * bracket_stop_factor, or after max_gram_steps
// squarings.  Returns (lowers, uppers, widest): for each dtype among Ws, in order of first
// appearance, every matrix's bound (in the order of Ws and their batches, flattened) rounded
// outwards to that dtype; and a 0-dim float64 CPU tensor, the largest upper / lower - 1 over the
// float32 and float64 brackets (-1 when there are none).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> dense_spectral_norm_bounds_many(
    at::TensorList Ws, double rtol, int64_t max_gram_steps);

}  // namespace lipfast

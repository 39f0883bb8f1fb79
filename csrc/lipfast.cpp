// lipfast's operator library: every op's schema, and the stub that makes `import lipfast._C` load
// this shared object (which runs the TORCH_LIBRARY registrations below and in the kernel files).
#include <Python.h>

#include <torch/library.h>

extern "C" {
// An empty module: Python only needs to load the library; the ops are reached via torch.ops.lipfast.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "lipfast's compiled kernels, registered as torch.ops.lipfast.*",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lipfast, m) {
  // Largest singular value of each matrix W[..., :, :] by Lanczos on WᵀW (full reorthogonalization,
  // explicit restarts), to relative accuracy rtol or max_iters passes over W.  v0 (..., n) is the
  // start vector (None: a fixed pseudo-random one).  Returns sigma (...), the top singular vectors
  // u (..., m) and v (..., n) with sigma = ‖W v‖, and rel_err (...), float64: the accuracy reached.
  m.def(
      "dense_spectral_norm(Tensor W, Tensor? v0, int max_iters, float rtol) "
      "-> (Tensor sigma, Tensor u, Tensor v, Tensor rel_err)");
  // Certified bracket lower <= sigma_max(W) <= upper for each matrix, rounded outwards to W's dtype:
  // lower is a Rayleigh quotient with a rounding margin, upper comes from Gram iteration in float64
  // with every rounding error bounded.  Stops when upper <= lower * (1 + rtol) or after
  // max_gram_steps squarings.
  m.def(
      "dense_spectral_norm_bounds(Tensor W, float rtol, int max_iters, int max_gram_steps) "
      "-> (Tensor lower, Tensor upper)");
  // Certified brackets of every matrix of every tensor in Ws (any shapes, one device) by Gram
  // iteration alone, tensors with the same min(m, n) iterated together; lower ends from the Gram
  // iterates' own columns.  Returns lower[d], upper[d] for the d-th dtype among Ws (in order of first
  // appearance): every matrix's bound, flattened in the order of Ws, rounded outwards to that dtype;
  // and widest_gap (0-dim float64, on the CPU): the largest upper / lower - 1 over the float32 and
  // float64 brackets, -1 when there are none.
  m.def(
      "dense_spectral_norm_bounds_many(Tensor[] Ws, float rtol, int max_gram_steps) "
      "-> (Tensor[] lower, Tensor[] upper, Tensor widest_gap)");
  // `iters` steps of power iteration on WᵀW from v (..., n), each one fused pass over W.  Returns
  // sigma = ‖W v‖ (...), u = W v / sigma (..., m) and the new unit iterate v (..., n).
  m.def("dense_power_iteration(Tensor W, Tensor v, int iters) -> (Tensor sigma, Tensor u, Tensor v)");
  // torch.nn.utils.parametrizations.spectral_norm's power method, `iters` steps from (u, v), each
  // one fused pass over W: u = normalize(W v, eps), v = normalize(Wᵀ u, eps); returns sigma = uᵀ W v
  // (...) for the final pair (for iters = 0, of the given pair) and the new u (..., m), v (..., n).
  m.def("spectral_norm_step(Tensor W, Tensor u, Tensor v, int iters, float eps) -> (Tensor sigma, Tensor u, Tensor v)");
  // Largest singular value of a convolution layer's operator, in the canonical form of csrc/conv.h
  // (x (C_in, *input_size) -> crop(conv(pad(x)))), by Lanczos on AᵀA with A and Aᵀ applied as ATen
  // convolutions.  weight is (C_out, C_in/groups, *k); v0 (C_in, *input_size) or None (a fixed
  // pseudo-random start).  Returns sigma (0-dim), u (C_out, *output_size), v (C_in, *input_size)
  // with sigma = ‖A v‖, and rel_err (0-dim, float64).  upper, if given, is a known upper bound of
  // sigma_max (>= 0): the loop then also stops, with no confirmation steps, once upper / sigma - 1 is
  // at most 8 rtol or at least 8 rel_err (the lower end of a bracket; csrc/lanczos.h).
  m.def(
      "conv_spectral_norm(Tensor weight, Tensor? v0, int[] input_size, int[] stride, int[] pad_lo, "
      "int[] pad_hi, int[] dilation, int groups, str padding_mode, int[] output_size, int max_iters, "
      "float rtol, float? upper=None) -> (Tensor sigma, Tensor u, Tensor v, Tensor rel_err)");
  // Whether the Cholesky factorization of the Hermitian M = re + i im + diag(shift) completes (every
  // pivot positive), for each matrix of re, im (B, q, q) (lower triangles read; re symmetric, im
  // antisymmetric) and shift (B,).  Returns bool (B,).  The circulant bound's certificate: the usual
  // backward-error bound of Cholesky holds for the factorization tried.
  m.def("hermitian_cholesky_test(Tensor re, Tensor im, Tensor shift) -> Tensor");
  // ‖H x‖ after `steps` power steps x <- H x / ‖H x‖ on each H = re + i im (B, q, q), from the unit
  // start x = start[0] + i start[1] (start (2, q)) for every matrix.  Returns gain (B,): lower
  // estimates of the largest eigenvalue magnitudes, for ranking.
  m.def("hermitian_power_gain(Tensor re, Tensor im, Tensor start, int steps) -> Tensor");
  // The Gram matrices H = KᴴK of complex matrices K = A + i B stacked as S (B, 2p, q) = [A; B]:
  // re + i im = H (or -H when negate), re exactly symmetric and im exactly antisymmetric.  Each entry
  // is a sum of 2p products, accumulated in some order.
  m.def("hermitian_gram(Tensor S, int p, bool negate=False) -> (Tensor re, Tensor im)");
  // k-volatility over all unordered pairs {i, j} of the rows of hidden (n, d), with losses (n,) float64:
  // d_ij = ‖h_i − h_j‖₂, a pair is valid when 0 < d_ij <= delta (no upper limit when delta is None),
  // r_ij = |l_i − l_j| / d_ij.  Returns score (0-dim float64, mean r over valid pairs, NaN if none),
  // per_sample (n,) float64 (mean r over the valid pairs that contain i, NaN if none) and counts (3,)
  // int64: valid pairs, pairs with d_ij = 0, and those of them with l_i != l_j.  Tiled and fused:
  // memory O(n d), never n × n.
  m.def(
      "pairwise_volatility(Tensor hidden, Tensor losses, float? delta) "
      "-> (Tensor score, Tensor per_sample, Tensor counts)");
  // One Björck–Bowie step on Q (m, n), float32 or float64: out = Q ((1 + beta) I - beta G) =
  // (1 + beta) Q - beta Q G with G = QᵀQ (n, n), returned too (the backward formula uses it).  For a
  // wide matrix, pass its transpose: the Gram is taken over the columns.
  m.def("bjorck_step(Tensor Q, float beta) -> (Tensor out, Tensor gram)");
}


// CUDA kernels for the dense op family's power iterations: dense_power_iteration and
// spectral_norm_step, with the same contracts as csrc/cpu/dense_kernel.cpp.
//
// Shapes: W (..., m, n) is flattened to B matrices (B, m, n) in the compute dtype (float32 for the
// half types, as on the CPU); vectors are (B, n) and (B, m).
// Parallel axis: one thread block per matrix, running the whole iteration loop inside one launch
// (no launch per iteration).  Each step is W x (one warp per row, lanes over the row, a shuffle
// reduction) then Wᵀ y (threads over columns, coalesced); norms and dot products accumulate in
// float64 through a fixed warp-shuffle and shared-memory tree, so results are deterministic.  The
// iterates live in a global scratch buffer (B, m + n), which stays in L1/L2 for the matrices of a
// network.  Launched on the current stream of W's device, after a device guard.
//
// NOT YET RUN ON A GPU: compiled and registered, but until benchmarks/gpu_check.sh has run them, the
// Python layer uses them only when LIPFAST_CUDA_UNVERIFIED=1 (lipfast/_ext.py); otherwise CUDA tensors
// take the pure-PyTorch form.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>

#include "dense.h"

namespace {

constexpr int kThreads = 256;  // 8 warps per block
constexpr unsigned kFull = 0xffffffffu;

// Sum of one double per thread over the block, returned to every thread (fixed order).
__device__ double block_sum(double v, double* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFull, v, o);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // the previous call's readers are done with shared[0]
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double t = lane < static_cast<int>(blockDim.x >> 5) ? shared[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(kFull, t, o);
    if (lane == 0) shared[0] = t;
  }
  __syncthreads();
  return shared[0];
}

template <typename T>
__device__ double block_dot(const T* x, const T* y, int64_t n, double* shared) {
  double s = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += static_cast<double>(x[j]) * static_cast<double>(y[j]);
  return block_sum(s, shared);
}

// x *= c for the block's vector, in float64 (c may be out of T's range).
template <typename T>
__device__ void block_scale(T* x, double c, int64_t n) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) x[j] = static_cast<T>(static_cast<double>(x[j]) * c);
  __syncthreads();
}

// y = W x (W: m × n, row-major): one warp per row.
template <typename T>
__device__ void block_matvec(const T* __restrict__ W, int64_t m, int64_t n, const T* x, T* y) {
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  for (int64_t i = threadIdx.x >> 5; i < m; i += warps) {
    const T* w = W + i * n;
    T s = 0;
    for (int64_t j = lane; j < n; j += 32) s += w[j] * x[j];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(kFull, s, o);
    if (lane == 0) y[i] = s;
  }
  __syncthreads();
}

// z = Wᵀ y: one thread per column, reading W row by row (coalesced across the threads).
template <typename T>
__device__ void block_rmatvec(const T* __restrict__ W, int64_t m, int64_t n, const T* y, T* z) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    T s = 0;
    for (int64_t i = 0; i < m; ++i) s += W[i * n + j] * y[i];
    z[j] = s;
  }
  __syncthreads();
}

// `iters` steps of power iteration on WᵀW from v (normalized first); then sigma = ‖W v‖ and
// u = W v / sigma (0 when sigma = 0).  A step whose WᵀW v is 0 keeps v (it is in the null space).
template <typename T>
__global__ void power_iteration_kernel(const T* __restrict__ W, int64_t m, int64_t n, int64_t iters, T* v, T* u,
                                       T* sigma, T* scratch) {
  __shared__ double shared[32];
  const int64_t b = blockIdx.x;
  const T* Wb = W + b * m * n;
  T* x = v + b * n;
  T* ub = u + b * m;
  T* y = scratch + b * (m + n);
  T* z = y + m;
  double nx = sqrt(block_dot(x, x, n, shared));
  if (nx > 0) block_scale(x, 1.0 / nx, n);
  for (int64_t it = 0; it < iters && nx > 0; ++it) {  // nx is the same in every thread
    block_matvec(Wb, m, n, x, y);
    block_rmatvec(Wb, m, n, y, z);
    nx = sqrt(block_dot(z, z, n, shared));
    if (nx > 0) {
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) x[j] = static_cast<T>(static_cast<double>(z[j]) / nx);
      __syncthreads();
    }
  }
  block_matvec(Wb, m, n, x, ub);
  const double s = sqrt(block_dot(ub, ub, m, shared));
  block_scale(ub, s > 0 ? 1.0 / s : 0.0, m);
  if (threadIdx.x == 0) sigma[b] = static_cast<T>(s);
}

// torch's spectral-norm power method: per step u = normalize(W v, eps), v = normalize(Wᵀ u, eps);
// sigma = uᵀ W v for the final pair (for iters = 0, of the given pair).
template <typename T>
__global__ void spectral_norm_step_kernel(const T* __restrict__ W, int64_t m, int64_t n, int64_t iters, double eps,
                                          T* u, T* v, T* sigma, T* scratch) {
  __shared__ double shared[32];
  const int64_t b = blockIdx.x;
  const T* Wb = W + b * m * n;
  T* x = v + b * n;
  T* t = u + b * m;
  T* y = scratch + b * (m + n);
  T* z = y + m;
  if (iters == 0) {
    block_matvec(Wb, m, n, x, y);
    const double s = block_dot(t, y, m, shared);
    if (threadIdx.x == 0) sigma[b] = static_cast<T>(s);
    return;
  }
  double s = 0;
  for (int64_t it = 0; it < iters; ++it) {
    block_matvec(Wb, m, n, x, t);   // t = W v
    block_rmatvec(Wb, m, n, t, z);  // z = Wᵀ W v (from the unnormalized t, as the CPU's fused pass)
    const double a = fmax(sqrt(block_dot(t, t, m, shared)), eps);
    block_scale(t, 1.0 / a, m);
    const double nz = sqrt(block_dot(z, z, n, shared)) / a;
    const double c = fmax(nz, eps);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) x[j] = static_cast<T>(static_cast<double>(z[j]) / a / c);
    __syncthreads();
    s = nz * nz / c;
  }
  if (threadIdx.x == 0) sigma[b] = static_cast<T>(s);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_power_iteration_cuda(const at::Tensor& W, const at::Tensor& v0,
                                                                          int64_t iters) {
  lipfast::check_matrix_batch("power_iteration", W);
  TORCH_CHECK_VALUE(iters >= 0, "lipfast.power_iteration: iters must be >= 0, got ", iters);
  const c10::cuda::CUDAGuard guard(W.device());
  const lipfast::Flattened f = lipfast::flatten_matrices(W);
  at::Tensor v = lipfast::start_vectors("power_iteration", v0, f);
  at::Tensor u = at::empty({f.B, f.m}, f.W.options());
  at::Tensor sigma = at::empty({f.B}, f.W.options());
  if (f.B > 0) {
    at::Tensor scratch = at::empty({f.B * (f.m + f.n)}, f.W.options());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(f.compute, "lipfast_dense_power_iteration_cuda", [&] {
      power_iteration_kernel<scalar_t><<<f.B, kThreads, 0, stream>>>(
          f.W.const_data_ptr<scalar_t>(), f.m, f.n, iters, v.mutable_data_ptr<scalar_t>(),
          u.mutable_data_ptr<scalar_t>(), sigma.mutable_data_ptr<scalar_t>(), scratch.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dtype = W.scalar_type();
  return {sigma.to(dtype).reshape(f.batch_shape), u.to(dtype).reshape(lipfast::with_last(f.batch_shape, f.m)),
          v.to(dtype).reshape(lipfast::with_last(f.batch_shape, f.n))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spectral_norm_step_cuda(const at::Tensor& W, const at::Tensor& u0,
                                                                       const at::Tensor& v0, int64_t iters,
                                                                       double eps) {
  lipfast::check_matrix_batch("spectral_norm_step", W);
  TORCH_CHECK_VALUE(iters >= 0, "lipfast.spectral_norm_step: iters must be >= 0, got ", iters);
  const c10::cuda::CUDAGuard guard(W.device());
  const lipfast::Flattened f = lipfast::flatten_matrices(W);
  TORCH_CHECK_VALUE(u0.numel() == f.B * f.m && v0.numel() == f.B * f.n,
                    "lipfast.spectral_norm_step: u and v must have W.shape[:-1] and W.shape[:-2] + (n,) entries");
  TORCH_CHECK_VALUE(u0.device() == W.device() && v0.device() == W.device(),
                    "lipfast.spectral_norm_step: u and v must be on W's device (", W.device(), ")");
  at::Tensor u = u0.detach().reshape({f.B, f.m}).to(f.compute).clone();
  at::Tensor v = v0.detach().reshape({f.B, f.n}).to(f.compute).clone();
  at::Tensor sigma = at::empty({f.B}, f.W.options());
  if (f.B > 0) {
    at::Tensor scratch = at::empty({f.B * (f.m + f.n)}, f.W.options());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(f.compute, "lipfast_spectral_norm_step_cuda", [&] {
      spectral_norm_step_kernel<scalar_t><<<f.B, kThreads, 0, stream>>>(
          f.W.const_data_ptr<scalar_t>(), f.m, f.n, iters, eps, u.mutable_data_ptr<scalar_t>(),
          v.mutable_data_ptr<scalar_t>(), sigma.mutable_data_ptr<scalar_t>(), scratch.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto dtype = W.scalar_type();
  return {sigma.to(dtype).reshape(f.batch_shape), u.to(dtype).reshape(lipfast::with_last(f.batch_shape, f.m)),
          v.to(dtype).reshape(lipfast::with_last(f.batch_shape, f.n))};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CUDA, m) {
  m.impl("dense_power_iteration", &dense_power_iteration_cuda);
  m.impl("spectral_norm_step", &spectral_norm_step_cuda);
}

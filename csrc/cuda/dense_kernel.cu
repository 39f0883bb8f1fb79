// CUDA kernels for the dense op family: dense_spectral_norm and its certified bracket (Lanczos),
// dense_power_iteration and spectral_norm_step, with the same contracts as csrc/cpu/dense_kernel.cpp.
//
// Shapes: W (..., m, n) is flattened to B matrices (B, m, n) in the compute dtype (float32 for the
// half types, as on the CPU); vectors are (B, n) and (B, m).
// Parallel axis, many matrices: one thread block per matrix, running the whole iteration loop inside
// one launch (no launch per iteration).  Each step is W x (one warp per row, lanes over the row, a
// shuffle reduction) then Wᵀ y (threads over columns, coalesced); norms and dot products accumulate
// in float64 through a fixed warp-shuffle and shared-memory tree, so results are deterministic.
// A few large matrices: the fused multi-block pass WᵀW x (one read of W, 16-byte loads, partial sums
// per block reduced in a fixed order), launched from the host step by step; Lanczos then advances
// each matrix's state on the device between passes, and the host looks at the done flags every 8
// steps.  Launched on the current stream of W's device, after a device guard.
//
// Run on an H200 (benchmarks/gpu_check.sh, BENCHMARKS.md).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <functional>
#include <optional>

#include "dense.h"
#include "lanczos.h"

namespace {

using lipfast::default_start_entry;
using lipfast::LanczosControl;
using lipfast::TridiagonalScratch;
using lipfast::tridiagonal_top_eigenpair;

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

// ---------------------------------------------------------------------------------------------
// One large matrix: the fused pass y = Wᵀ(W x) (and W x) that reads W once, spread over many blocks.
//
// Stage 1, grid (chunks, B): block c takes a slice of rows of matrix b.  Thread t owns the 16-byte
// column vectors t, t + 256, ... (Q of them: n <= 256 Q K, K = 16 / sizeof(T) entries each), holds
// x and its accumulator for them in registers, and for each group of R rows loads the rows with
// 16-byte loads (the next group's loads issued before this group's barrier), forms s_i = w_i·x with
// a block reduction (one barrier per group: the partial sums alternate between two shared
// buffers), and adds s_i w_i to its accumulator from the registers it loaded, so each row is read
// from memory once.  It writes its accumulator to partial (B, chunks, n).
// Stage 2, grid (tiles of 32 columns, B): y_j = sum over chunks of partial, eight threads per column
// each summing every eighth chunk, then the eight sums in order (deterministic); with many short
// sums in flight at once (a thread summing all chunks alone waits on one load after another).
// Bytes: m n T for W, plus chunks n T written and read for the partials (about 2 x SMs rows' worth,
// 3% of an 8192 x 8192 W).

template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  using type = float4;
  __device__ static float dot(const float4& a, const float4& b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
  __device__ static void axpy(float s, const float4& a, float4& y) {
    y.x += s * a.x; y.y += s * a.y; y.z += s * a.z; y.w += s * a.w;
  }
  // a /= d, each entry divided in float64 (as normalize_kernel does)
  __device__ static void divide(float4& a, double d) {
    a.x = static_cast<float>(a.x / d); a.y = static_cast<float>(a.y / d);
    a.z = static_cast<float>(a.z / d); a.w = static_cast<float>(a.w / d);
  }
};
template <>
struct Vec16<double> {
  using type = double2;
  __device__ static double dot(const double2& a, const double2& b) { return a.x * b.x + a.y * b.y; }
  __device__ static void axpy(double s, const double2& a, double2& y) { y.x += s * a.x; y.y += s * a.y; }
  __device__ static void divide(double2& a, double d) { a.x /= d; a.y /= d; }
};

constexpr int kMaxVectorsPerThread = 8;
constexpr int kTileColumns = 32;                        // columns per block of stage 2: one warp wide
constexpr int kChunkGroups = kThreads / kTileColumns;  // threads per column in stage 2

// Stage 2's tiles for rows of n entries.
__host__ __device__ int64_t tiles(int64_t n) { return (n + kTileColumns - 1) / kTileColumns; }

// ‖y‖ from the `tiles` sums of squares of one matrix's y, summed by the whole block in a fixed order
// (deterministic); every thread gets it.  Every thread of the block must call it.
__device__ double tile_norm(const double* tile_sq, int64_t tiles, double* shared) {
  double s = 0;
  for (int64_t t = threadIdx.x; t < tiles; t += blockDim.x) s += tile_sq[t];
  return sqrt(block_sum(s, shared));
}

// The input vector of a fused pass: x itself, or (power iteration) x = y / ‖y‖ formed on the fly
// from the previous pass's y and its tile sums of squares (x kept where y = 0, which is in the null
// space); the first block of each matrix then stores the new x.
template <typename T>
struct GramInput {
  T* x;
  const T* y = nullptr;
  const double* tile_sq = nullptr;
  int64_t tiles = 0;
};

template <typename T, int Q, int R, int Threads>
__global__ void __launch_bounds__(Threads) gram_pass_kernel(const T* __restrict__ W_all, int64_t m, int64_t n,
                                                             int64_t rows_per_chunk, GramInput<T> in,
                                                             T* __restrict__ partial, T* __restrict__ wx_all) {
  using V = typename Vec16<T>::type;
  constexpr int K = sizeof(V) / sizeof(T);
  __shared__ T sums[2][R][Threads / 32];
  __shared__ double shared[32];
  const int64_t b = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
  const int64_t nv = n / K;  // 16-byte vectors per row
  const V* W = reinterpret_cast<const V*>(W_all + b * m * n);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = chunk * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < m ? r0 + rows_per_chunk : m;
  // The loads of the next group are issued before this group's barrier, so the memory system stays
  // busy while the block reduces.
  V w[R][Q], next[R][Q];
  auto load = [&](int64_t i, V (&rows)[R][Q]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        const int64_t c = threadIdx.x + q * Threads;
        rows[r][q] = (i + r < r1 && c < nv) ? W[(i + r) * nv + c] : V{};
      }
    }
  };
  load(r0, w);
  // ‖y‖ of the previous y, when x is formed from it (the same in every thread: in.y is uniform)
  const double norm = in.y != nullptr ? tile_norm(in.tile_sq + b * in.tiles, in.tiles, shared) : 0.0;
  V* x = reinterpret_cast<V*>(in.x + b * n);
  const V* source = norm > 0 ? reinterpret_cast<const V*>(in.y + b * n) : x;
  V xr[Q], acc[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int64_t c = threadIdx.x + q * Threads;
    xr[q] = c < nv ? source[c] : V{};
    if (norm > 0) {
      Vec16<T>::divide(xr[q], norm);
      if (chunk == 0 && c < nv) x[c] = xr[q];
    }
    acc[q] = V{};
  }
  int parity = 0;
  for (int64_t i = r0; i < r1; i += R, parity ^= 1) {
    if (i + R < r1) load(i + R, next);
    T dots[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      dots[r] = 0;
#pragma unroll
      for (int q = 0; q < Q; ++q) dots[r] += Vec16<T>::dot(w[r][q], xr[q]);
      for (int o = 16; o > 0; o >>= 1) dots[r] += __shfl_down_sync(kFull, dots[r], o);
      if (lane == 0) sums[parity][r][warp] = dots[r];
    }
    __syncthreads();  // with two buffers, one barrier per group suffices
#pragma unroll
    for (int r = 0; r < R; ++r) {
      T si = 0;
#pragma unroll
      for (int k = 0; k < Threads / 32; ++k) si += sums[parity][r][k];
      if (wx_all != nullptr && threadIdx.x == 0 && i + r < r1) wx_all[b * m + i + r] = si;
#pragma unroll
      for (int q = 0; q < Q; ++q) Vec16<T>::axpy(si, w[r][q], acc[q]);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int q = 0; q < Q; ++q) w[r][q] = next[r][q];
    }
  }
  V* out = reinterpret_cast<V*>(partial + (b * chunks + chunk) * n);
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int64_t c = threadIdx.x + q * Threads;
    if (c < nv) out[c] = acc[q];
  }
}

// Stage 2: y = the sum of the partials (see above); with tile_sq, also the sum of y_j² over the
// block's 32 columns (float64), for tile_norm.  Grid (tiles(n), B), kThreads threads.
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const T* __restrict__ partial, int64_t chunks,
                                                                int64_t n, T* __restrict__ y,
                                                                double* __restrict__ tile_sq) {
  __shared__ T sums[kChunkGroups][kTileColumns];
  const int64_t b = blockIdx.y;
  const int column = threadIdx.x % kTileColumns, group = threadIdx.x / kTileColumns;
  const int64_t j = blockIdx.x * static_cast<int64_t>(kTileColumns) + column;
  T total = 0;
  if (j < n) {
    const T* p = partial + b * chunks * n + j;
#pragma unroll 4
    for (int64_t c = group; c < chunks; c += kChunkGroups) total += p[c * n];
  }
  sums[group][column] = total;
  __syncthreads();
  if (group == 0) {  // the first warp: each column's eight sums in order, then the tile's squares
    T yj = 0;
#pragma unroll
    for (int g = 0; g < kChunkGroups; ++g) yj += sums[g][column];
    if (j < n) y[b * n + j] = yj;
    if (tile_sq != nullptr) {
      double sq = static_cast<double>(yj) * static_cast<double>(yj);  // 0 past the last column
      for (int o = 16; o > 0; o >>= 1) sq += __shfl_down_sync(kFull, sq, o);
      if (column == 0) tile_sq[b * gridDim.x + blockIdx.x] = sq;
    }
  }
}

// x = y / ‖y‖ for each matrix, ‖y‖ from the tile sums of squares by tile_norm; x is kept where
// y = 0 (it is in the null space).  Grid (ceil(n / kThreads), B), kThreads threads.
template <typename T>
__global__ void normalize_kernel(const T* __restrict__ y_all, const double* __restrict__ tile_sq, int64_t n,
                                 int64_t tiles, T* __restrict__ x_all) {
  __shared__ double shared[32];
  const int64_t b = blockIdx.y;
  const double norm = tile_norm(tile_sq + b * tiles, tiles, shared);
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (norm > 0 && j < n) x_all[b * n + j] = static_cast<T>(static_cast<double>(y_all[b * n + j]) / norm);
}

// Launch plan of the fused multi-block pass for W (B, m, n), or chunks = 0 when it does not apply
// (then the one-block-per-matrix kernels are used).
struct GramPassPlan {
  int64_t chunks = 0, rows_per_chunk = 0;
  int vectors = 0;  // 16-byte vectors per thread at 256 threads
};

// Threads per block of the fused pass: 256, or 512 for the longest rows (vectors = 8 16-byte vectors
// per thread at 256), which then take 4 per thread: fewer registers per thread (one 512-thread block
// fits a multiprocessor) and twice the bytes in flight per block.
int gram_pass_threads(int vectors) { return vectors > 4 ? 2 * kThreads : kThreads; }

// The kernel for `vectors` 16-byte vectors per thread at 256 threads, as a function pointer.
template <typename T>
void* gram_pass_function(int vectors) {
  switch (vectors) {
    case 1: return reinterpret_cast<void*>(&gram_pass_kernel<T, 1, 8, kThreads>);
    case 2: return reinterpret_cast<void*>(&gram_pass_kernel<T, 2, 4, kThreads>);
    case 4: return reinterpret_cast<void*>(&gram_pass_kernel<T, 4, 2, kThreads>);
    default: return reinterpret_cast<void*>(&gram_pass_kernel<T, 4, 2, 2 * kThreads>);
  }
}

GramPassPlan plan_gram_pass(const at::Tensor& W) {
  GramPassPlan plan;
  const int64_t B = W.size(0), m = W.size(1), n = W.size(2);
  const int64_t K = 16 / W.element_size();
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, W.get_device()));
  const bool aligned = reinterpret_cast<uintptr_t>(W.const_data_ptr()) % 16 == 0;
  if (B >= multiprocessors || m < 64 || n % K != 0 || n > kThreads * K * kMaxVectorsPerThread || !aligned) return plan;
  plan.vectors = 1;
  while (plan.vectors * kThreads * K < n) plan.vectors *= 2;
  // One wave: as many blocks as fit on the device at once, shared out over the matrices.
  int resident = 1;
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "lipfast_gram_pass_plan", [&] {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &resident, gram_pass_function<scalar_t>(plan.vectors), gram_pass_threads(plan.vectors), 0));
  });
  const int64_t want = (std::max(resident, 1) * static_cast<int64_t>(multiprocessors) + B - 1) / B;
  plan.chunks = std::max<int64_t>(1, std::min<int64_t>(want, m / 16));
  plan.rows_per_chunk = (m + plan.chunks - 1) / plan.chunks;
  plan.chunks = (m + plan.rows_per_chunk - 1) / plan.rows_per_chunk;
  return plan;
}

// y (B, n) = Wᵀ(W x) for W (B, m, n) and the input x (B, n) of `in`, contiguous, with wx (B, m) =
// W x when wx is given; partial: scratch of at least B chunks n entries; tile_sq: null, or
// (B, tiles(n)) float64 for normalize_kernel or the next pass's GramInput.

template <typename T>
void gram_pass(const at::Tensor& W, const GramPassPlan& plan, GramInput<T> in, T* y, T* wx, T* partial,
               double* tile_sq, cudaStream_t stream) {
  int64_t B = W.size(0), m = W.size(1), n = W.size(2), rows = plan.rows_per_chunk;
  const T* Wp = W.const_data_ptr<T>();
  void* args[] = {&Wp, &m, &n, &rows, &in, &partial, &wx};
  C10_CUDA_CHECK(cudaLaunchKernel(gram_pass_function<T>(plan.vectors), dim3(plan.chunks, B),
                                  dim3(gram_pass_threads(plan.vectors)), args, 0, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sum_partials_kernel<T><<<dim3(tiles(n), B), kThreads, 0, stream>>>(partial, plan.chunks, n, y, tile_sq);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x = y / ‖y‖ per matrix after gram_pass wrote y and tile_sq (x kept where y = 0).
template <typename T>
void normalize(const T* y, const double* tile_sq, int64_t B, int64_t n, T* x, cudaStream_t stream) {
  normalize_kernel<T><<<dim3((n + kThreads - 1) / kThreads, B), kThreads, 0, stream>>>(y, tile_sq, n, tiles(n), x);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// After a fused pass from v with t = W v and z = Wᵀ t: torch's spectral-norm update (see the CPU
// kernel): a = max(‖t‖, eps), u = t / a, v = z / a / max(‖z‖ / a, eps), sigma = (‖z‖/a)² / max(‖z‖/a, eps).
template <typename T>
__global__ void spectral_step_normalize_kernel(const T* __restrict__ t_all, const T* __restrict__ z_all, int64_t m,
                                               int64_t n, double eps, T* __restrict__ u_all, T* __restrict__ v_all,
                                               T* __restrict__ sigma) {
  __shared__ double shared[32];
  const int64_t b = blockIdx.x;
  const T* t = t_all + b * m;
  const T* z = z_all + b * n;
  const double a = fmax(sqrt(block_dot(t, t, m, shared)), eps);
  const double nz = sqrt(block_dot(z, z, n, shared)) / a;
  const double c = fmax(nz, eps);
  for (int64_t i = threadIdx.x; i < m; i += blockDim.x) u_all[b * m + i] = static_cast<T>(static_cast<double>(t[i]) / a);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) v_all[b * n + j] = static_cast<T>(static_cast<double>(z[j]) / a / c);
  if (threadIdx.x == 0) sigma[b] = static_cast<T>(nz * nz / c);
}

// u = W v / ‖W v‖ (0 where W v = 0) and sigma = ‖W v‖ for every matrix, through cuBLAS matrix-vector
// products (the path for large matrices; no TF32).
void left_vectors(const at::Tensor& W, const at::Tensor& v, at::Tensor& u, at::Tensor& sigma) {
  for (int64_t b = 0; b < W.size(0); ++b) {
    const at::Tensor y = at::mv(W[b], v[b]).to(at::kDouble);
    const at::Tensor norm = at::linalg_vector_norm(y, 2);
    u[b].copy_(at::where(norm > 0, y / norm, at::zeros_like(y)));
    sigma[b].copy_(norm);
  }
}

// The fused pass as a function x (n,) -> Wᵀ(W x) for one matrix W1 (1, m, n), for the ATen Lanczos
// loop; falls back to two cuBLAS products when the plan does not apply.
std::function<at::Tensor(const at::Tensor&)> gram_function(const at::Tensor& W1, at::Tensor& partial) {
  const GramPassPlan plan = plan_gram_pass(W1);
  const at::Tensor Wb = W1[0];
  if (plan.chunks == 0) return [Wb](const at::Tensor& x) { return at::mv(Wb.t(), at::mv(Wb, x)); };
  partial = at::empty({plan.chunks * W1.size(2)}, W1.options());
  return [W1, plan, partial](const at::Tensor& x) {
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty_like(xc);
    AT_DISPATCH_FLOATING_TYPES(W1.scalar_type(), "lipfast_gram_pass", [&] {
      gram_pass<scalar_t>(W1, plan, {const_cast<scalar_t*>(xc.const_data_ptr<scalar_t>())}, y.mutable_data_ptr<scalar_t>(), nullptr,
                          partial.mutable_data_ptr<scalar_t>(), nullptr, c10::cuda::getCurrentCUDAStream());
    });
    return y;
  };
}

// Scratch of one matrix for the Lanczos kernels, in two buffers: T entries (the basis Q, cap x n; w,
// n; y, max(m, cap)) and doubles (alpha, beta and s, cap each; the tridiagonal solver's seven arrays
// and its flags, 8 cap).
struct LanczosLayout {
  int64_t m, n, cap;
  __host__ __device__ int64_t t_entries() const { return cap * n + n + (m > cap ? m : cap); }
  __host__ __device__ int64_t d_entries() const { return 11 * cap; }
};

// One matrix's Lanczos workspace, as a block sees it.
template <typename T>
struct LanczosBlock {
  int64_t n, cap;
  T *Q, *w, *y;  // basis (cap x n), the product A q_k, scratch (>= cap)
  double *alpha, *beta, *s;
  TridiagonalScratch scratch;

  __device__ LanczosBlock(const LanczosLayout& layout, T* t_scratch, double* d_scratch, int64_t b)
      : n(layout.n), cap(layout.cap) {
    Q = t_scratch + b * layout.t_entries();
    w = Q + cap * n;
    y = w + n;
    alpha = d_scratch + b * layout.d_entries();
    beta = alpha + cap;
    s = beta + cap;
    double* tri = s + cap;
    scratch = TridiagonalScratch{tri,           tri + cap,     tri + 2 * cap, tri + 3 * cap, tri + 4 * cap,
                                 tri + 5 * cap, tri + 6 * cap, reinterpret_cast<unsigned char*>(tri + 7 * cap)};
  }

  // Q[0] = v / ‖v‖, v replaced by the default start vector first when it is zero or not finite.
  __device__ void start(T* v, double* shared) {
    double start_norm = sqrt(block_dot(v, v, n, shared));
    if (!(start_norm > 0) || !isfinite(start_norm)) {
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) v[j] = static_cast<T>(default_start_entry(j));
      __syncthreads();
      start_norm = sqrt(block_dot(v, v, n, shared));
    }
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) Q[j] = static_cast<T>(static_cast<double>(v[j]) / start_norm);
    __syncthreads();
  }

  enum Outcome { kNext, kRestarted, kDone };

  // Step k of a sweep, w holding A q_k: orthogonalize, maybe solve and stop, else append q_{k+1}.
  // On kDone v holds the unit Ritz vector; on kRestarted Q[0] does (and the sweep restarts).
  __device__ Outcome advance(LanczosControl& control, int64_t k, T* v, double* shared, double* broadcast) {
    const T* q = Q + k * n;
    const double a = block_dot(q, w, n, shared);
    const double previous_beta = k > 0 ? beta[k - 1] : 0.0;  // written by thread 0 before a barrier
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      double x = static_cast<double>(w[j]) - a * static_cast<double>(q[j]);
      if (k > 0) x -= previous_beta * static_cast<double>(Q[(k - 1) * n + j]);
      w[j] = static_cast<T>(x);
    }
    __syncthreads();
    double bnorm = sqrt(block_dot(w, w, n, shared));
    for (int round = 0; round < 2; ++round) {
      // Classical Gram–Schmidt against the whole basis: c = Q w, then w -= Qᵀ c.
      const double before = bnorm;
      block_matvec(Q, k + 1, n, w, y);
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        T correction = 0;
        for (int64_t i = 0; i <= k; ++i) correction += Q[i * n + j] * y[i];
        w[j] -= correction;
      }
      __syncthreads();
      bnorm = sqrt(block_dot(w, w, n, shared));
      if (bnorm > 0.7071 * before) break;  // little was removed: orthogonal to working accuracy
    }
    if (threadIdx.x == 0) alpha[k] = a;
    bool done = false;
    if (control.should_solve(k, bnorm)) {
      if (threadIdx.x == 0) {
        for (int64_t i = control.checked; i <= k; ++i) s[i] = 0.0;  // the previous eigenvector, padded
        broadcast[0] = tridiagonal_top_eigenpair(alpha, beta, k + 1, s, control.checked > 0, scratch);
        broadcast[1] = s[k];
      }
      __syncthreads();
      const double theta = broadcast[0], s_k = broadcast[1];
      __syncthreads();  // everyone has read broadcast before it is written again
      done = control.after_solve(k, theta, s_k, bnorm);
    }
    if (done || control.full(k)) {
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        double x = 0;
        for (int64_t i = 0; i <= k; ++i) x += s[i] * static_cast<double>(Q[i * n + j]);
        v[j] = static_cast<T>(x);
      }
      __syncthreads();
      const double nv = sqrt(block_dot(v, v, n, shared));
      block_scale(v, 1.0 / nv, n);
      if (done) return kDone;
      for (int64_t j = threadIdx.x; j < n; j += blockDim.x) Q[j] = v[j];  // restart from the Ritz vector
      __syncthreads();
      control.start_sweep();
      return kRestarted;
    }
    if (threadIdx.x == 0) beta[k] = bnorm;
    T* next = Q + (k + 1) * n;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) next[j] = static_cast<T>(static_cast<double>(w[j]) / bnorm);
    __syncthreads();
    return kNext;
  }
};

// Lanczos on WᵀW for one matrix per block, under LanczosControl's rules (lanczos.h), the whole loop
// in one launch; then u = W v / ‖W v‖, sigma = ‖W v‖.  W is read from shared memory when the
// launch staged it there, else from global memory (L1/L2).  Every thread keeps its own copy of the
// control state, updated from block-wide values (dot products from block_sum, theta and s_k from
// thread 0's eigen-solve through shared memory), so every branch is uniform across the block.
// v: start vectors in, unit Ritz vectors out.
template <typename T>
__global__ void lanczos_kernel(const T* __restrict__ W_all, LanczosLayout layout, int64_t rank_bound,
                               int64_t max_passes, double rtol, double eps, T* v_all, T* u_all, T* sigma_all,
                               double* rel_err_all, T* t_scratch, double* d_scratch, bool staged) {
  extern __shared__ __align__(16) unsigned char staged_bytes[];
  __shared__ double shared[32];
  __shared__ double broadcast[2];
  const int64_t b = blockIdx.x;
  const int64_t m = layout.m, n = layout.n;
  const T* W = W_all + b * m * n;
  if (staged) {
    T* Ws = reinterpret_cast<T*>(staged_bytes);
    for (int64_t i = threadIdx.x; i < m * n; i += blockDim.x) Ws[i] = W[i];
    W = Ws;
    __syncthreads();
  }
  T* v = v_all + b * n;
  LanczosBlock<T> work(layout, t_scratch, d_scratch, b);
  LanczosControl control(n, rank_bound, max_passes, rtol, eps);
  work.start(v, shared);
  control.start_sweep();
  for (int64_t k = 0;;) {
    block_matvec(W, m, n, work.Q + k * n, work.y);  // w = Wᵀ (W q_k)
    block_rmatvec(W, m, n, work.y, work.w);
    ++control.passes;
    const auto outcome = work.advance(control, k, v, shared, broadcast);
    if (outcome == LanczosBlock<T>::kDone) break;
    k = outcome == LanczosBlock<T>::kRestarted ? 0 : k + 1;
  }
  T* u = u_all + b * m;
  block_matvec(W, m, n, v, u);
  const double sigma = sqrt(block_dot(u, u, m, shared));
  block_scale(u, sigma > 0 ? 1.0 / sigma : 0.0, m);
  if (threadIdx.x == 0) {
    sigma_all[b] = static_cast<T>(sigma);
    rel_err_all[b] = control.rel_err;
  }
}

// ---------------------------------------------------------------------------------------------
// Lanczos for a few large matrices, driven from the host without waiting on the device: each step
// is the fused multi-block pass (w = WᵀW q) and then lanczos_step_kernel, one block per matrix,
// which takes up the matrix's state from global memory, advances it (LanczosBlock::advance) and
// writes the next q to q_cur for the next pass.  The host looks at the done flags every few steps.

struct LanczosState {
  LanczosControl control;
  int64_t k;
  int done;
};

template <typename T>
__global__ void lanczos_start_kernel(LanczosLayout layout, int64_t rank_bound, int64_t max_passes, double rtol,
                                     double eps, T* v_all, T* q_cur, T* t_scratch, double* d_scratch,
                                     LanczosState* states) {
  __shared__ double shared[32];
  const int64_t b = blockIdx.x, n = layout.n;
  LanczosBlock<T> work(layout, t_scratch, d_scratch, b);
  work.start(v_all + b * n, shared);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) q_cur[b * n + j] = work.Q[j];
  if (threadIdx.x == 0) {
    LanczosState state{LanczosControl(n, rank_bound, max_passes, rtol, eps), 0, 0};
    state.control.start_sweep();
    states[b] = state;
  }
}

// w_all: (B, n) the products WᵀW q_cur of the pass just made.
template <typename T>
__global__ void lanczos_step_kernel(LanczosLayout layout, const T* __restrict__ w_all, T* v_all, T* q_cur,
                                    T* t_scratch, double* d_scratch, LanczosState* states, double* rel_err_all) {
  __shared__ double shared[32];
  __shared__ double broadcast[2];
  const int64_t b = blockIdx.x, n = layout.n;
  LanczosState state = states[b];  // every thread its own copy
  if (state.done) return;
  LanczosBlock<T> work(layout, t_scratch, d_scratch, b);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) work.w[j] = w_all[b * n + j];
  __syncthreads();
  ++state.control.passes;
  const auto outcome = work.advance(state.control, state.k, v_all + b * n, shared, broadcast);
  state.k = outcome == LanczosBlock<T>::kNext ? state.k + 1 : 0;
  state.done = outcome == LanczosBlock<T>::kDone;
  if (!state.done) {
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) q_cur[b * n + j] = work.Q[state.k * n + j];
  }
  if (threadIdx.x == 0) {
    states[b] = state;
    if (state.done) rel_err_all[b] = state.control.rel_err;
  }
}

// Raises ValueError on NaN/Inf entries (naming the first bad matrix).  Returns the matrices to
// iterate on, and the power-of-two factor of each (lipfast::range_scale, as on the CPU): f.W itself
// when every factor is 1, else a copy with matrix b multiplied by its factor.
std::pair<at::Tensor, at::Tensor> scan_and_check(const char* op, const at::Tensor& W, const lipfast::Flattened& f) {
  const at::Tensor largest = f.W.abs().amax({1, 2}).to(at::kDouble).cpu();  // NaN propagates
  const double* big = largest.const_data_ptr<double>();
  auto scales = at::ones({f.B}, at::TensorOptions().dtype(at::kDouble));
  double* scale = scales.mutable_data_ptr<double>();
  int64_t first_bad = f.B;
  bool any_scaled = false;
  const int max_exponent = f.compute == at::kDouble ? DBL_MAX_EXP : FLT_MAX_EXP;
  for (int64_t b = 0; b < f.B; ++b) {
    if (!std::isfinite(big[b])) first_bad = std::min(first_bad, b);
    scale[b] = lipfast::range_scale(big[b], max_exponent);
    any_scaled = any_scaled || scale[b] != 1.0;
  }
  lipfast::raise_if_nonfinite(op, W, first_bad);
  scales = scales.to(f.W.options());
  if (any_scaled) return {f.W * scales.view({-1, 1, 1}), scales};
  return {f.W, scales};
}

// Threads per block for a Lanczos kernel whose vectors have `length` entries and whose matrix has
// `rows` rows: as many as the longer side needs, 64 to 256.  The kernels take about 134 registers
// per thread, so 64-thread blocks let seven small matrices share a multiprocessor instead of one.
int lanczos_threads(int64_t rows, int64_t length) {
  int threads = 64;
  while (threads < kThreads && threads < std::max(rows, length)) threads *= 2;
  return threads;
}

// Lanczos on AᵀA for every matrix of A (B, m, n), driven from the host (see lanczos_step_kernel):
// x (B, n) start vectors in, unit Ritz vectors out; rel_err (B,) float64 filled.  The host waits on
// the device every 8 steps only, to see whether every matrix is done.
template <typename T>
void device_driven_lanczos(const at::Tensor& A, const GramPassPlan& plan, at::Tensor& x, at::Tensor& rel_err,
                           int64_t max_passes, double rtol) {
  const int64_t B = A.size(0), m = A.size(1), n = A.size(2);
  const LanczosLayout layout{m, n, std::min<int64_t>(lipfast::kMaxBasis, n)};
  auto t_scratch = at::empty({B * layout.t_entries()}, A.options());
  auto d_scratch = at::empty({B * layout.d_entries()}, A.options().dtype(at::kDouble));
  auto q_cur = at::empty({B, n}, A.options());
  auto w = at::empty({B, n}, A.options());
  auto partial = at::empty({B * plan.chunks * n}, A.options());
  auto states = at::empty({B * static_cast<int64_t>(sizeof(LanczosState))}, A.options().dtype(at::kByte));
  auto* state_ptr = reinterpret_cast<LanczosState*>(states.mutable_data_ptr<uint8_t>());
  const int threads = lanczos_threads(1, n);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  lanczos_start_kernel<T><<<B, threads, 0, stream>>>(layout, std::min(m, n), max_passes, rtol,
                                                     static_cast<double>(std::numeric_limits<T>::epsilon()),
                                                     x.mutable_data_ptr<T>(), q_cur.mutable_data_ptr<T>(),
                                                     t_scratch.mutable_data_ptr<T>(), d_scratch.mutable_data_ptr<double>(),
                                                     state_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t step = 1; step <= max_passes; ++step) {
    gram_pass<T>(A, plan, {q_cur.mutable_data_ptr<T>()}, w.mutable_data_ptr<T>(), nullptr, partial.mutable_data_ptr<T>(),
                 nullptr, stream);
    lanczos_step_kernel<T><<<B, threads, 0, stream>>>(layout, w.const_data_ptr<T>(), x.mutable_data_ptr<T>(),
                                                      q_cur.mutable_data_ptr<T>(), t_scratch.mutable_data_ptr<T>(),
                                                      d_scratch.mutable_data_ptr<double>(), state_ptr,
                                                      rel_err.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (step % 8 == 0 || step == max_passes) {
      const at::Tensor host = states.cpu();
      const auto* seen = reinterpret_cast<const LanczosState*>(host.const_data_ptr<uint8_t>());
      bool all_done = true;
      for (int64_t b = 0; b < B; ++b) all_done = all_done && seen[b].done;
      if (all_done) break;
    }
  }
}

// Lanczos for every matrix of Wk (B, m, n), v (B, n) the start vectors (overwritten by the unit Ritz
// vectors); fills u (B, m), sigma (B,) and rel_err (B,) float64.  Many matrices: lanczos_kernel,
// one block each, over slices of the batch that keep the scratch under 512 MiB.  A few large ones
// (fewer than the multiprocessors, 2^18 entries or more each), where one block per matrix would
// leave most of the GPU idle: Lanczos on the Gram matrix of the shorter side (on Wᵀ when W is
// wide, so that the basis and its reorthogonalization are as small as they can be), its products
// the fused multi-block pass, driven from the host (ATen's products and loop where the pass does
// not apply).
void lanczos_all(const at::Tensor& Wk, at::Tensor& v, at::Tensor& u, at::Tensor& sigma, at::Tensor& rel_err,
                 int64_t max_passes, double rtol) {
  const int64_t B = Wk.size(0), m = Wk.size(1), n = Wk.size(2);
  if (B == 0) return;
  const int device = Wk.get_device();
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  if (B < multiprocessors && m * n >= (int64_t{1} << 18)) {
    const bool transposed = n > m;
    const at::Tensor A = transposed ? Wk.transpose(1, 2).contiguous() : Wk;
    // A start vector for Aᵀ A: v itself, or W v (zero, so the default start, when v is zero).
    at::Tensor x = transposed ? at::bmm(Wk, v.unsqueeze(2)).squeeze(2).contiguous() : v.clone();
    const GramPassPlan plan = plan_gram_pass(A);
    if (plan.chunks > 0) {
      AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "lipfast_device_driven_lanczos", [&] {
        device_driven_lanczos<scalar_t>(A, plan, x, rel_err, max_passes, rtol);
      });
    } else {
      auto rel_err_cpu = at::empty({B}, at::TensorOptions().dtype(at::kDouble));
      at::Tensor partial;
      for (int64_t b = 0; b < B; ++b) {
        const auto gram = gram_function(A.narrow(0, b, 1), partial);
        auto top = lipfast::lanczos_top_aten(gram, x[b], max_passes, rtol, std::min(m, n), lipfast::kMaxBasis);
        x[b].copy_(top.v);
        rel_err_cpu.mutable_data_ptr<double>()[b] = top.rel_err;
      }
      rel_err.copy_(rel_err_cpu);
    }
    at::Tensor y = at::empty({B, A.size(1)}, A.options());
    left_vectors(A, x, y, sigma);  // y = A x / ‖A x‖: the other singular vector
    v.copy_(transposed ? y : x);
    u.copy_(transposed ? x : y);
    return;
  }
  const LanczosLayout layout{m, n, std::min<int64_t>(lipfast::kMaxBasis, n)};
  const int64_t item = Wk.element_size();
  const int64_t per_matrix = layout.t_entries() * item + layout.d_entries() * 8;
  const int64_t slice = std::max<int64_t>(1, std::min<int64_t>(B, (int64_t{512} << 20) / per_matrix));
  auto t_scratch = at::empty({slice * layout.t_entries()}, Wk.options());
  auto d_scratch = at::empty({slice * layout.d_entries()}, Wk.options().dtype(at::kDouble));
  // Stage W in shared memory when it fits in the 48 KiB a block may use without opt-in (less the
  // kernel's static 272 bytes).
  const int64_t matrix_bytes = m * n * item;
  const bool staged = matrix_bytes <= 46 * 1024;
  const int threads = lanczos_threads(m, n);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(Wk.scalar_type(), "lipfast_dense_spectral_norm_cuda", [&] {
    for (int64_t b0 = 0; b0 < B; b0 += slice) {
      const int64_t count = std::min(slice, B - b0);
      lanczos_kernel<scalar_t><<<count, threads, staged ? matrix_bytes : 0, stream>>>(
          Wk.const_data_ptr<scalar_t>() + b0 * m * n, layout, std::min(m, n), max_passes, rtol,
          static_cast<double>(std::numeric_limits<scalar_t>::epsilon()),
          v.mutable_data_ptr<scalar_t>() + b0 * n, u.mutable_data_ptr<scalar_t>() + b0 * m,
          sigma.mutable_data_ptr<scalar_t>() + b0, rel_err.mutable_data_ptr<double>() + b0,
          t_scratch.mutable_data_ptr<scalar_t>(), d_scratch.mutable_data_ptr<double>(), staged);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_spectral_norm_cuda(
    const at::Tensor& W, const std::optional<at::Tensor>& v0, int64_t max_iters, double rtol) {
  lipfast::check_matrix_batch("spectral_norm", W);
  TORCH_CHECK_VALUE(max_iters >= 1, "lipfast.spectral_norm: max_iters must be >= 1, got ", max_iters);
  TORCH_CHECK_VALUE(rtol > 0 && std::isfinite(rtol), "lipfast.spectral_norm: rtol must be positive, got ", rtol);
  const c10::cuda::CUDAGuard guard(W.device());
  const lipfast::Flattened f = lipfast::flatten_matrices(W);
  at::Tensor v = lipfast::start_vectors("spectral_norm", v0, f);
  const auto scanned = scan_and_check("spectral_norm", W, f);
  at::Tensor u = at::empty({f.B, f.m}, f.W.options());
  at::Tensor sigma = at::empty({f.B}, f.W.options());
  at::Tensor rel_err = at::empty({f.B}, f.W.options().dtype(at::kDouble));
  lanczos_all(scanned.first, v, u, sigma, rel_err, max_iters, rtol);
  sigma.div_(scanned.second);  // exact: powers of two
  const auto dtype = W.scalar_type();
  return {sigma.to(dtype).reshape(f.batch_shape), u.to(dtype).reshape(lipfast::with_last(f.batch_shape, f.m)),
          v.to(dtype).reshape(lipfast::with_last(f.batch_shape, f.n)), rel_err.reshape(f.batch_shape)};
}

std::tuple<at::Tensor, at::Tensor> dense_spectral_norm_bounds_cuda(const at::Tensor& W, double rtol,
                                                                   int64_t max_iters, int64_t max_gram_steps) {
  lipfast::check_matrix_batch("spectral_norm_bounds", W);
  TORCH_CHECK_VALUE(rtol > 0 && std::isfinite(rtol), "lipfast.spectral_norm_bounds: rtol must be positive, got ", rtol);
  TORCH_CHECK_VALUE(max_iters >= 1, "lipfast.spectral_norm_bounds: max_iters must be >= 1, got ", max_iters);
  TORCH_CHECK_VALUE(max_gram_steps >= 1, "lipfast.spectral_norm_bounds: max_gram_steps must be >= 1, got ",
                    max_gram_steps);
  const c10::cuda::CUDAGuard guard(W.device());
  const lipfast::Flattened f = lipfast::flatten_matrices(W);
  const at::Tensor Wk = scan_and_check("spectral_norm_bounds", W, f).first;  // only v is taken from it
  // Lower end: a Rayleigh quotient at a Lanczos vector converged well inside the requested gap.
  at::Tensor v = lipfast::start_vectors("spectral_norm_bounds", std::nullopt, f);
  at::Tensor u = at::empty({f.B, f.m}, f.W.options());
  at::Tensor sigma = at::empty({f.B}, f.W.options());
  at::Tensor rel_err = at::empty({f.B}, f.W.options().dtype(at::kDouble));
  lanczos_all(Wk, v, u, sigma, rel_err, max_iters, rtol / 8);
  const at::Tensor lower = lipfast::certified_rayleigh_lower(f.W, v);
  const at::Tensor upper =
      lipfast::gram_upper_bound(f.W, lower * lipfast::bracket_stop_factor(rtol, W.scalar_type()), max_gram_steps);
  const auto dtype = W.scalar_type();
  return {lipfast::round_directed(lower, dtype, /*up=*/false).reshape(f.batch_shape),
          lipfast::round_directed(upper, dtype, /*up=*/true).reshape(f.batch_shape)};
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
  const GramPassPlan plan = f.B > 0 ? plan_gram_pass(f.W) : GramPassPlan{};
  if (plan.chunks > 0) {  // a few large matrices: the fused pass over many blocks, two launches per step
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor y = at::empty({f.B, f.n}, f.W.options());
    at::Tensor partial = at::empty({f.B * plan.chunks * f.n}, f.W.options());
    at::Tensor tile_sq = at::empty({f.B * tiles(f.n)}, f.W.options().dtype(at::kDouble));
    const at::Tensor start_norm = at::linalg_vector_norm(v.to(at::kDouble), 2, {1}, /*keepdim=*/true);
    v.copy_(at::where(start_norm > 0, v / start_norm, v));
    AT_DISPATCH_FLOATING_TYPES(f.compute, "lipfast_dense_power_iteration_cuda", [&] {
      scalar_t* x = v.mutable_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      double* sq = tile_sq.mutable_data_ptr<double>();
      for (int64_t it = 0; it < iters; ++it) {
        GramInput<scalar_t> in{x};
        if (it > 0) in = GramInput<scalar_t>{x, yp, sq, tiles(f.n)};  // the pass normalizes the last y itself
        gram_pass<scalar_t>(f.W, plan, in, yp, nullptr, partial.mutable_data_ptr<scalar_t>(), sq, stream);
      }
      if (iters > 0) normalize<scalar_t>(yp, sq, f.B, f.n, x, stream);
    });
    left_vectors(f.W, v, u, sigma);
  } else if (f.B > 0) {
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
  const GramPassPlan plan = f.B > 0 ? plan_gram_pass(f.W) : GramPassPlan{};
  if (plan.chunks > 0 && iters == 0) {  // sigma = uᵀ W v for the given pair
    for (int64_t b = 0; b < f.B; ++b) sigma[b].copy_(at::dot(u[b], at::mv(f.W[b], v[b])));
  } else if (plan.chunks > 0) {  // a few large matrices: the fused pass over many blocks
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor t = at::empty({f.B, f.m}, f.W.options());
    at::Tensor z = at::empty({f.B, f.n}, f.W.options());
    at::Tensor partial = at::empty({f.B * plan.chunks * f.n}, f.W.options());
    AT_DISPATCH_FLOATING_TYPES(f.compute, "lipfast_spectral_norm_step_cuda", [&] {
      for (int64_t it = 0; it < iters; ++it) {
        gram_pass<scalar_t>(f.W, plan, {v.mutable_data_ptr<scalar_t>()}, z.mutable_data_ptr<scalar_t>(),
                            t.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<scalar_t>(), nullptr, stream);
        spectral_step_normalize_kernel<scalar_t><<<f.B, kThreads, 0, stream>>>(
            t.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), f.m, f.n, eps, u.mutable_data_ptr<scalar_t>(),
            v.mutable_data_ptr<scalar_t>(), sigma.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  } else if (f.B > 0) {
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
  m.impl("dense_spectral_norm", &dense_spectral_norm_cuda);
  m.impl("dense_spectral_norm_bounds", &dense_spectral_norm_bounds_cuda);
  m.impl("dense_spectral_norm_bounds_many", &lipfast::dense_spectral_norm_bounds_many);
  m.impl("dense_power_iteration", &dense_power_iteration_cuda);
  m.impl("spectral_norm_step", &spectral_norm_step_cuda);
}

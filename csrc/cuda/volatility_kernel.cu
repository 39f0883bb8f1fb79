// CUDA kernel for k-volatility over all pairs (knowledge continuity); the same method and contract
// as csrc/cpu/volatility_kernel.cpp, on the GPU.
//
// Shapes: hidden (n, d) (float32, float64, float16, bfloat16), losses (n,) float64, delta optional.
// Per tile pair (I, J), J >= I, of T rows: G = C_I C_Jᵀ by cuBLAS (ATen's mm, TF32 off for the
// call), then ONE fused epilogue kernel over the T × T pairs (a grid-stride loop, one pair per thread)
// that forms d²_ij, decides near pairs, recomputes them exactly from the input rows (rows of one
// exact-equality group are at distance 0), and writes each pair's ratio (float64) and a code
// (0 not valid, 1 valid, 2 distance 0 with equal losses, 3 distance 0 with different losses).  Row
// and column sums and counts of the tile are ATen reductions, which are deterministic, so results
// do not depend on scheduling.  Memory: the centred copy of the rows (n d) plus O(T²) tile buffers;
// never n × n.  Everything runs on the current stream of hidden's device; the host waits once, for
// the scale of the rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that needs the cuSPARSE headers
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "volatility.h"

namespace {

constexpr int64_t kTile = 2048;  // ratio tile 32 MiB (float64), product tile 16 MiB (float32)
constexpr int kThreads = 256;

// ‖x − y‖₂ from the input rows, never 0 for distinct rows: float64 sums for narrower inputs (no
// square of a float32 difference underflows there); for float64 input, scaled by the largest
// |difference| first.
template <typename T>
__device__ double exact_distance(const T* __restrict__ x, const T* __restrict__ y, int64_t d) {
  if constexpr (std::is_same_v<T, double>) {
    double largest = 0;
    for (int64_t k = 0; k < d; ++k) largest = fmax(largest, fabs(x[k] - y[k]));
    if (largest == 0) return 0;
    double s = 0;
    for (int64_t k = 0; k < d; ++k) {
      const double t = (x[k] - y[k]) / largest;
      s += t * t;
    }
    return largest * sqrt(s);
  } else {
    double s = 0;
    for (int64_t k = 0; k < d; ++k) {
      const double t = static_cast<double>(static_cast<float>(x[k])) - static_cast<double>(static_cast<float>(y[k]));
      s += t * t;
    }
    return sqrt(s);
  }
}

template <typename T, typename G>
__global__ void volatility_tile_kernel(const G* __restrict__ g, int64_t ti, int64_t tj, int64_t i0, int64_t j0,
                                       const double* __restrict__ a, const double* __restrict__ l,
                                       const int64_t* __restrict__ group, const T* __restrict__ h, int64_t d,
                                       double fraction, double scale, double delta, double* __restrict__ ratio,
                                       uint8_t* __restrict__ code) {
  const int64_t pairs = ti * tj;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < pairs;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ii = idx / tj;
    const int64_t i = i0 + ii;
    const int64_t j = j0 + (idx - ii * tj);
    double r = 0;
    uint8_t c = 0;
    if (i < j) {  // each unordered pair once
      const double s = a[i] + a[j];
      const double d2 = s - 2.0 * static_cast<double>(g[idx]);
      double dist = -1;
      if (d2 <= fraction * s) {  // near: cancellation could matter, so decide it exactly
        if (group[i] == group[j]) {
          c = l[i] != l[j] ? 3 : 2;
        } else {
          dist = exact_distance(h + i * d, h + j * d, d);
        }
      } else {
        dist = sqrt(d2) * scale;
      }
      if (c == 0 && dist <= delta) {
        r = fabs(l[i] - l[j]) / dist;
        c = 1;
      }
    }
    ratio[idx] = r;
    code[idx] = c;
  }
}

// cuBLAS in full float32 (no TF32) while alive: the near-pair rule assumes float32 rounding.
class FullPrecisionMatmul {
 public:
  FullPrecisionMatmul() : previous_(at::globalContext().allowTF32CuBLAS()) {
    at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~FullPrecisionMatmul() { at::globalContext().setAllowTF32CuBLAS(previous_); }
  FullPrecisionMatmul(const FullPrecisionMatmul&) = delete;
  FullPrecisionMatmul& operator=(const FullPrecisionMatmul&) = delete;

 private:
  bool previous_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_volatility_cuda(const at::Tensor& hidden_in,
                                                                        const at::Tensor& losses_in,
                                                                        std::optional<double> delta) {
  lipfast::check_volatility_args(hidden_in, losses_in, delta);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor losses = losses_in.contiguous();
  const int64_t n = hidden.size(0);
  const int64_t d = hidden.size(1);
  const at::ScalarType compute = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const double limit = delta.value_or(std::numeric_limits<double>::infinity());
  const auto f64 = losses.options();

  // Exact equality groups (+ 0 makes −0 and +0 one value); the centred, scaled copy C and a_i = ‖c_i‖².
  const at::Tensor group = (d == 0 || n == 0)
                               ? at::zeros({n}, f64.dtype(at::kLong))
                               : std::get<1>(at::unique_dim(hidden.to(compute) + 0, 0, true, true, false));
  at::Tensor C, a;
  double scale = 1.0;
  {
    const at::Tensor wide = hidden.to(at::kDouble);
    const at::Tensor centred = wide - wide.mean(0);
    const double largest = centred.numel() > 0 ? centred.abs().max().item<double>() : 0.0;
    int e = 0;
    if (largest > 0) std::frexp(largest, &e);
    e = std::clamp(e, -1022, 1023);
    scale = std::ldexp(1.0, e);
    C = (centred * std::ldexp(1.0, -e)).to(compute).contiguous();
    a = C.to(at::kDouble).square().sum(1);
  }
  const double fraction = lipfast::near_fraction(d, compute == at::kDouble ? 0x1p-53 : 0x1p-24);

  at::Tensor per_sum = at::zeros({n}, f64);
  at::Tensor per_count = at::zeros({n}, f64.dtype(at::kLong));
  at::Tensor total = at::zeros({}, f64);
  at::Tensor counts = at::zeros({3}, f64.dtype(at::kLong));
  const int64_t T = std::min(kTile, std::max<int64_t>(n, 1));
  at::Tensor product = at::empty({T * T}, C.options());
  at::Tensor ratio = at::empty({T * T}, f64);
  at::Tensor code = at::empty({T * T}, f64.dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const FullPrecisionMatmul full_precision;

  lipfast::for_each_tile_product(C, T, product, [&](int64_t i0, int64_t ti, int64_t j0, int64_t tj, const at::Tensor& g) {
    const int64_t blocks = std::min<int64_t>((ti * tj + kThreads - 1) / kThreads, 8192);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "pairwise_volatility_cuda", [&] {
      using G = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      volatility_tile_kernel<scalar_t, G><<<blocks, kThreads, 0, stream>>>(
          g.const_data_ptr<G>(), ti, tj, i0, j0, a.const_data_ptr<double>(), losses.const_data_ptr<double>(),
          group.const_data_ptr<int64_t>(), hidden.const_data_ptr<scalar_t>(), d, fraction, scale, limit,
          ratio.mutable_data_ptr<double>(), code.mutable_data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const at::Tensor r = ratio.narrow(0, 0, ti * tj).view({ti, tj});
    const at::Tensor c = code.narrow(0, 0, ti * tj).view({ti, tj});
    const at::Tensor row_sums = r.sum(1);
    per_sum.narrow(0, i0, ti).add_(row_sums);
    per_sum.narrow(0, j0, tj).add_(r.sum(0));
    total.add_(row_sums.sum());
    const at::Tensor valid = c.eq(1);
    per_count.narrow(0, i0, ti).add_(valid.sum(1));
    per_count.narrow(0, j0, tj).add_(valid.sum(0));
    counts.select(0, 0).add_(valid.sum());
    counts.select(0, 1).add_(c.ge(2).sum());
    counts.select(0, 2).add_(c.eq(3).sum());
  });
  return {total / counts.select(0, 0), per_sum / per_count, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(lipfast, CUDA, m) {
  m.impl("pairwise_volatility", &pairwise_volatility_cuda);
}

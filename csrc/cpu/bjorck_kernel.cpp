// CPU kernel of the Björck–Bowie step (csrc/bjorck.h): out = (1 + beta) Q - beta Q G, G = QᵀQ.
//
// A step is two products over Q (m, n): the Gram matrix G (m n^2 multiply-adds as a general
// product) and Q G (the same again, one addmm with the scaling fused).  G is symmetric, so only its
// lower triangle is formed, by the rank-k update of herk.h (half the multiply-adds), its columns
// shared between the threads, and then mirrored.  Q G stays one BLAS call.
#include "bjorck.h"
#include "herk.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace lipfast {
namespace {

// Copies the lower triangle of the n x n row-major g over its upper one, in blocks.
template <typename T>
void mirror_lower(T* g, int64_t n) {
  constexpr int64_t kSide = 32;
  at::parallel_for(0, (n + kSide - 1) / kSide, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t i0 = bi * kSide;
      for (int64_t j0 = 0; j0 <= i0; j0 += kSide) {
        for (int64_t i = i0; i < std::min(i0 + kSide, n); ++i) {
          for (int64_t j = j0; j < std::min(j0 + kSide, i); ++j) g[j * n + i] = g[i * n + j];
        }
      }
    }
  });
}

// G = QᵀQ (n x n), exactly symmetric.  The threads share the lower triangle by columns, thread t
// taking [c_t, c_t+1) with c_t = n (1 - sqrt(1 - t / threads)) (in whole panels), so that each gets
// an equal area (the first columns are the longest); each packs only the columns it reads, those
// from c_t on.  No partial sums to add.
at::Tensor symmetric_gram(const at::Tensor& Q) {
  const int64_t m = Q.size(0), n = Q.size(1);
  at::Tensor G = at::zeros({n, n}, Q.options());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 32));
  std::vector<int64_t> bounds(threads + 1, n);
  // whole panels, or herk_lower would round a share up into the next one's columns
  const int64_t panel = Q.scalar_type() == at::kFloat ? herk::kMaxPanel<float> : herk::kMaxPanel<double>;
  for (int64_t t = 0; t < threads; ++t) {
    const double c = n * (1.0 - std::sqrt(1.0 - static_cast<double>(t) / threads));
    bounds[t] = std::min<int64_t>(n, static_cast<int64_t>(c / panel + 0.5) * panel);
  }
  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "lipfast_bjorck_gram", [&] {
    const scalar_t* q = Q.const_data_ptr<scalar_t>();
    scalar_t* g = G.data_ptr<scalar_t>();
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> work(herk::workspace<scalar_t>(n));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t c0 = bounds[t], c1 = bounds[t + 1];
        if (c1 <= c0) continue;
        scalar_t* c = g + c0 * n + c0;
        herk::herk_lower<scalar_t>(q + c0, nullptr, n, m, n - c0, false, c, c, n, work.data(), c1 - c0);
      }
    });
    mirror_lower<scalar_t>(g, n);
  });
  return G;
}

std::tuple<at::Tensor, at::Tensor> bjorck_step_cpu(const at::Tensor& Q_in, double beta) {
  check_bjorck_args(Q_in, beta);
  const at::Tensor Q = Q_in.contiguous();
  at::Tensor G = symmetric_gram(Q);
  return {at::addmm(Q, Q, G, 1 + beta, -beta), G};
}

}  // namespace
}  // namespace lipfast

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("bjorck_step", &lipfast::bjorck_step_cpu); }

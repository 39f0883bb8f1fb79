// Lanczos on the operator of a convolution layer, one loop of ATen convolutions.  Device-agnostic:
// the CPU and CUDA registrations both call conv_spectral_norm below.
//
// Numerical contract: sigma = ‖A v‖ for the returned unit v (so never above sigma_max beyond
// rounding), and rel_err bounds the relative error of the top Ritz value when the residual test is
// trusted (the same stopping rules as the dense kernel: confirmation after p + max(p, 16) passes,
// and small operators, rank <= 16, run until their Krylov space is exhausted).  Given a known upper
// bound of sigma_max, it also stops once the bracket [sigma, upper] is narrow (LanczosControl).
#include "conv.h"
#include "lanczos.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace lipfast {
namespace {

constexpr uint64_t kStartSeed = 0x6C6970;  // the pure-PyTorch fallback's start-vector seed

enum class PadMode { kZeros, kCircular, kReflect, kReplicate };

PadMode parse_mode(c10::string_view mode) {
  if (mode == "zeros") return PadMode::kZeros;
  if (mode == "circular") return PadMode::kCircular;
  if (mode == "reflect") return PadMode::kReflect;
  if (mode == "replicate") return PadMode::kReplicate;
  TORCH_CHECK_VALUE(false, "lipfast.conv_spectral_norm: unknown padding_mode '", std::string(mode), "'");
}

// Input position copied to each position of a dim padded from n to lo + n + hi (-1: a zero).
std::vector<int64_t> pad_source_index(int64_t n, int64_t lo, int64_t hi, PadMode mode) {
  std::vector<int64_t> index;
  for (int64_t q = -lo; q < n + hi; ++q) {
    switch (mode) {
      case PadMode::kZeros: index.push_back(q >= 0 && q < n ? q : -1); break;
      case PadMode::kCircular: index.push_back(((q % n) + n) % n); break;
      case PadMode::kReplicate: index.push_back(std::clamp<int64_t>(q, 0, n - 1)); break;
      case PadMode::kReflect: {
        if (n == 1) { index.push_back(0); break; }
        const int64_t period = 2 * n - 2;
        const int64_t r = ((q % period) + period) % period;
        index.push_back(r >= n ? period - r : r);
        break;
      }
    }
  }
  return index;
}

class ConvOperator {
 public:
  ConvOperator(const at::Tensor& weight, at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef pad_lo,
               at::IntArrayRef pad_hi, at::IntArrayRef dilation, int64_t groups, PadMode mode,
               at::IntArrayRef output_size)
      : weight_(weight), input_size_(input_size.vec()), stride_(stride.vec()), pad_lo_(pad_lo.vec()),
        pad_hi_(pad_hi.vec()), dilation_(dilation.vec()), output_size_(output_size.vec()), groups_(groups),
        mode_(mode), dims_(weight.dim() - 2), zeros_(dims_, 0) {
    for (int64_t d = 0; d < dims_; ++d) {
      const int64_t k = weight.size(2 + d);
      const int64_t padded = input_size_[d] + pad_lo_[d] + pad_hi_[d];
      const int64_t full = (padded - dilation_[d] * (k - 1) - 1) / stride_[d] + 1;
      full_output_.push_back(full);
      // output_padding makes the transposed convolution's output exactly the padded size
      adjoint_output_padding_.push_back(padded - ((full - 1) * stride_[d] + dilation_[d] * (k - 1) + 1));
      if (mode_ != PadMode::kZeros) {
        auto index = pad_source_index(input_size_[d], pad_lo_[d], pad_hi_[d], mode_);
        index_.push_back(at::tensor(index, at::kLong).to(weight.device()));
      }
    }
  }

  // ATen's convolution, never in TF32: cuDNN's default for float32 on recent GPUs rounds the inputs
  // to 10-bit mantissas, about 1e-3 relative error per product, far from what rtol asks.
  at::Tensor convolution(const at::Tensor& x, bool transposed, at::IntArrayRef output_padding) const {
    return at::_convolution(x, weight_, {}, stride_, zeros_, dilation_, transposed, output_padding, groups_,
                            /*benchmark=*/false, /*deterministic=*/false,
                            /*cudnn_enabled=*/at::globalContext().userEnabledCuDNN(), /*allow_tf32=*/false);
  }

  // x (B, C_in, *input_size) -> (B, C_out, *output_size)
  at::Tensor apply(const at::Tensor& x) const {
    auto y = convolution(pad(x), false, zeros_);
    for (int64_t d = 0; d < dims_; ++d) {
      if (output_size_[d] < full_output_[d]) y = y.narrow(2 + d, 0, output_size_[d]);
    }
    return y;
  }

  // y (B, C_out, *output_size) -> (B, C_in, *input_size)
  at::Tensor adjoint(const at::Tensor& y) const {
    std::vector<int64_t> extend;
    bool cropped = false;
    for (int64_t d = dims_ - 1; d >= 0; --d) {
      extend.push_back(0);
      extend.push_back(full_output_[d] - output_size_[d]);
      cropped = cropped || full_output_[d] > output_size_[d];
    }
    auto full = cropped ? at::constant_pad_nd(y, extend, 0) : y;
    auto x = convolution(full, true, adjoint_output_padding_);
    return pad_adjoint(x);
  }

 private:
  at::Tensor pad(at::Tensor x) const {
    if (mode_ == PadMode::kZeros) {
      std::vector<int64_t> pads;
      bool any = false;
      for (int64_t d = dims_ - 1; d >= 0; --d) {
        pads.push_back(pad_lo_[d]);
        pads.push_back(pad_hi_[d]);
        any = any || pad_lo_[d] || pad_hi_[d];
      }
      return any ? at::constant_pad_nd(x, pads, 0) : x;
    }
    for (int64_t d = 0; d < dims_; ++d) x = x.index_select(2 + d, index_[d]);
    return x;
  }

  at::Tensor pad_adjoint(at::Tensor y) const {
    if (mode_ == PadMode::kZeros) {
      for (int64_t d = 0; d < dims_; ++d) y = y.narrow(2 + d, pad_lo_[d], input_size_[d]);
      return y;
    }
    for (int64_t d = dims_ - 1; d >= 0; --d) {
      auto shape = y.sizes().vec();
      shape[2 + d] = input_size_[d];
      y = at::zeros(shape, y.options()).index_add_(2 + d, index_[d], y);
    }
    return y;
  }

  at::Tensor weight_;
  std::vector<int64_t> input_size_, stride_, pad_lo_, pad_hi_, dilation_, output_size_;
  int64_t groups_;
  PadMode mode_;
  int64_t dims_;
  std::vector<int64_t> zeros_, full_output_, adjoint_output_padding_;
  std::vector<at::Tensor> index_;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_spectral_norm(
    const at::Tensor& weight, const std::optional<at::Tensor>& v0, at::IntArrayRef input_size,
    at::IntArrayRef stride, at::IntArrayRef pad_lo, at::IntArrayRef pad_hi, at::IntArrayRef dilation,
    int64_t groups, c10::string_view padding_mode, at::IntArrayRef output_size, int64_t max_iters, double rtol,
    std::optional<double> upper) {
  const int64_t dims = weight.dim() - 2;
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()),
                   "lipfast.conv_spectral_norm: weight must be a floating-point tensor, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(dims >= 1 && dims <= 3, "lipfast.conv_spectral_norm: weight must have 3, 4 or 5 dims, got shape ",
                    weight.sizes());
  for (auto size : {input_size.size(), stride.size(), pad_lo.size(), pad_hi.size(), dilation.size(), output_size.size()}) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(size) == dims,
                      "lipfast.conv_spectral_norm: every geometry argument needs one entry per spatial dim (", dims, ")");
  }
  TORCH_CHECK_VALUE(groups >= 1 && weight.size(0) % groups == 0,
                    "lipfast.conv_spectral_norm: weight.shape[0] must be divisible by groups, got ", weight.size(0),
                    " and groups=", groups);
  TORCH_CHECK_VALUE(max_iters >= 1, "lipfast.conv_spectral_norm: max_iters must be >= 1, got ", max_iters);
  TORCH_CHECK_VALUE(!upper.has_value() || *upper >= 0, "lipfast.conv_spectral_norm: upper must be >= 0, got ",
                    upper.value_or(0.0));
  const auto mode = parse_mode(padding_mode);
  const auto compute = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // A weight whose max |entry| lies outside [2^-32, 2^32] is iterated on w * 2^-e (max |entry| in
  // [0.5, 1)), so that the Gram products neither overflow nor underflow; sigma is scaled back.
  const double largest = weight.detach().abs().max().to(at::kDouble).item<double>();
  int exponent = 0;
  if (largest > 0 && std::isfinite(largest)) std::frexp(largest, &exponent);
  if (std::abs(exponent) <= 32) exponent = 0;
  // 2^-e in two factors: a subnormal largest entry has e down to -1073, and 2^1073 is not a double
  // (each factor scales up or is 1, so both products are exact where the result is normal)
  const int first = std::min(-exponent, 1023);
  const auto w = (exponent == 0 ? weight.detach().to(compute)
                                : (weight.detach().to(at::kDouble) * std::ldexp(1.0, first) *
                                   std::ldexp(1.0, -exponent - first))
                                      .to(compute))
                     .contiguous();
  const ConvOperator op(w, input_size, stride, pad_lo, pad_hi, dilation, groups, mode, output_size);

  std::vector<int64_t> in_shape{1, weight.size(1) * groups};
  in_shape.insert(in_shape.end(), input_size.begin(), input_size.end());
  const int64_t n = c10::multiply_integers(in_shape);
  int64_t m = weight.size(0);
  for (auto o : output_size) m *= o;

  at::Tensor start;
  if (v0.has_value() && v0->defined()) {
    TORCH_CHECK_VALUE(v0->numel() == n, "lipfast.conv_spectral_norm: v0 must have ", n, " entries, got ", v0->numel());
    start = v0->detach().to(w.options()).reshape({n}).clone();
  } else {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(kStartSeed);
    start = (at::rand({n}, generator, at::TensorOptions().dtype(at::kDouble)) * 2 - 1).to(w.options());
  }
  double start_norm = at::linalg_vector_norm(start.to(at::kDouble), 2).item<double>();
  if (!(start_norm > 0)) {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(kStartSeed);
    start = (at::rand({n}, generator, at::TensorOptions().dtype(at::kDouble)) * 2 - 1).to(w.options());
    start_norm = at::linalg_vector_norm(start.to(at::kDouble), 2).item<double>();
  }
  start = start / start_norm;

  auto gram = [&](const at::Tensor& x) { return op.adjoint(op.apply(x.view(in_shape))).reshape({n}); };
  const int64_t itemsize = compute == at::kDouble ? 8 : 4;
  const int64_t basis_cap = std::max<int64_t>(16, std::min<int64_t>(kMaxBasis, (int64_t{256} << 20) / (n * itemsize)));
  // theta is the top eigenvalue of the scaled operator's AᵀA: upper goes into the same units
  const double scaled_upper = upper.has_value() ? std::ldexp(*upper, -exponent) : 0.0;
  auto top = lanczos_top_aten(gram, start, max_iters, rtol, std::min(n, m), basis_cap, scaled_upper);

  auto y = op.apply(top.v.view(in_shape)).reshape({-1});
  const auto sigma = at::linalg_vector_norm(y.to(at::kDouble), 2);
  auto u = at::where(sigma > 0, y / sigma.clamp_min(std::numeric_limits<double>::min()).to(compute), at::zeros_like(y));
  std::vector<int64_t> out_shape{weight.size(0)};
  out_shape.insert(out_shape.end(), output_size.begin(), output_size.end());
  return {(exponent == 0 ? sigma : sigma * std::ldexp(1.0, exponent)).to(weight.scalar_type()),
          u.view(out_shape).to(weight.scalar_type()),
          top.v.view(at::IntArrayRef(in_shape).slice(1)).to(weight.scalar_type()),
          at::scalar_tensor(top.rel_err, at::TensorOptions().dtype(at::kDouble).device(weight.device()))};
}

}  // namespace lipfast

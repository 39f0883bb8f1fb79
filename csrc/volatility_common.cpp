// Device-agnostic pieces of the k-volatility op family: argument checks and the near-pair rule.
#include "volatility.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace lipfast {

double near_fraction(int64_t d, double unit) {
  const double du = static_cast<double>(d) * unit;
  if (du >= 0.5) return 1.0;
  return std::min(1.0, std::max(kNearFraction, 8.0 * du / (1.0 - du)));
}

void check_volatility_args(const at::Tensor& hidden, const at::Tensor& losses, std::optional<double> delta) {
  TORCH_CHECK_TYPE(at::isFloatingType(hidden.scalar_type()),
                   "lipfast.pairwise_volatility: hidden must be a floating-point tensor, got ", hidden.scalar_type());
  TORCH_CHECK_VALUE(hidden.dim() == 2, "lipfast.pairwise_volatility: hidden must be (n, d), got shape ",
                    hidden.sizes());
  TORCH_CHECK_TYPE(losses.scalar_type() == at::kDouble,
                   "lipfast.pairwise_volatility: losses must be float64, got ", losses.scalar_type());
  TORCH_CHECK_VALUE(losses.dim() == 1 && losses.size(0) == hidden.size(0),
                    "lipfast.pairwise_volatility: losses must be (n,) with n = ", hidden.size(0),
                    " (hidden's rows), got shape ", losses.sizes());
  TORCH_CHECK_VALUE(losses.device() == hidden.device(), "lipfast.pairwise_volatility: losses is on ",
                    losses.device(), " but hidden is on ", hidden.device());
  if (delta.has_value()) {
    TORCH_CHECK_VALUE(*delta > 0 && !std::isnan(*delta),
                      "lipfast.pairwise_volatility: delta must be > 0 when given, got ", *delta);
  }
}

}  // namespace lipfast

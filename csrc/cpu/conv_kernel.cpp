// CPU registration of the convolution-operator ops.  The loop itself is ATen calls
// (csrc/conv_common.cpp): each pass is one convolution and one transposed convolution, which ATen
// runs with its own CPU kernels (oneDNN where available), parallel over channels and pixels.
#include <torch/library.h>

#include "conv.h"

TORCH_LIBRARY_IMPL(lipfast, CPU, m) {
  m.impl("conv_spectral_norm", &lipfast::conv_spectral_norm);
}

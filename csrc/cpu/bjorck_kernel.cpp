// CPU registration of the Björck–Bowie step: its ATen form (csrc/bjorck_common.cpp), two BLAS calls
// per step with the scaling fused into the second.  Forming only QᵀQ's lower triangle with the
// rank-k update of herk.h halves that product's multiply-adds, but measured slower here: at 1024 x
// 1024 float32 on two threads it took 7 ms against the library's 6.5 ms for the full product, and
// the step 14-17 ms against 12.7-15 ms (BENCHMARKS.md, issue 9).
#include <torch/library.h>

#include "bjorck.h"

TORCH_LIBRARY_IMPL(lipfast, CPU, m) { m.impl("bjorck_step", &lipfast::bjorck_step_aten); }

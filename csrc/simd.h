// Function multi-versioning for the hot CPU loops.
#pragma once

// Compile a hot loop twice, for AVX2+FMA (x86-64-v3) and for the baseline, and let the CPU pick at
// load time: a plain -O3 build on x86-64 emits SSE2 only, which halves the throughput of vectorized
// loops.  No -march=native: the wheel must run on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LIPFAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LIPFAST_SIMD_CLONES
#endif

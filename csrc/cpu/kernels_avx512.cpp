// The kernels built for AVX-512 (F, BW, VL, DQ, VBMI) + FMA + F16C; chosen at run time when the CPU has them.
// Standard headers come first, outside the target pragma, so only this file's own functions (all with
// internal linkage) carry AVX-512 code.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#pragma GCC push_options
// gcc 12 reports its own intrinsics' deliberately undefined registers (_mm512_undefined_*) as uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same registers, as inlined into decode_avx512.h's loops
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,f16c,bmi,bmi2")

#define KVQ_AVX512 1
#define KVQ_AVX2 0
#define KVQ_ISA avx512
#include "kernels_impl.h"

#pragma GCC pop_options

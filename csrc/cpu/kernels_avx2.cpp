// The kernels built for AVX2 + FMA + F16C (every x86-64 CPU since Haswell / Zen 1): kernels_impl.h's
// hand-written 8-wide tile loops (code unpack, codebook lookup, scores, softmax, value sums) and register-fused
// decode (decode_avx2.h: TurboQuant codes of <= 4 bits decoded in registers for every query row); the rest is the
// portable C++, which the compiler vectorizes 8 floats wide with fused multiply-adds. Chosen at run time on
// CPUs without the AVX-512 subset the AVX-512 build needs. Standard headers come first, outside the target
// pragma.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")

#define KVQ_AVX512 0
#define KVQ_AVX2 1
#define KVQ_ISA avx2
#include "kernels_impl.h"

#pragma GCC pop_options

// The kernels as plain C++ (whatever the compiler vectorizes for the build's baseline ISA): the fallback
// for CPUs without AVX-512.
#define KVQ_AVX512 0
#define KVQ_AVX2 0
#define KVQ_ISA portable
#include "kernels_impl.h"

// Device helpers shared by the TurboQuant store and decode kernels. Framework-agnostic (CUDA only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "tq_params.h"

namespace kvq {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float load_as_float(const void* base, int64_t idx, DType t) {
  switch (t) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[idx]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[idx]);
    default: return static_cast<const float*>(base)[idx];
  }
}

__device__ __forceinline__ void store_from_float(void* base, int64_t idx, DType t, float x) {
  switch (t) {
    case DType::kFloat16: static_cast<__half*>(base)[idx] = __float2half_rn(x); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(base)[idx] = __float2bfloat16_rn(x); break;
    default: static_cast<float*>(base)[idx] = x;
  }
}

// fp16 stored little-endian at any byte offset (slots need not be 2-byte aligned).
__device__ __forceinline__ float load_f16(const uint8_t* p, int64_t sC) {
  const uint16_t bits = static_cast<uint16_t>(p[0]) | (static_cast<uint16_t>(p[sC]) << 8);
  return __half2float(__ushort_as_half(bits));
}

__device__ __forceinline__ void store_f16(uint8_t* p, int64_t sC, float x) {
  const uint16_t bits = __half_as_ushort(__float2half_rn(x));
  p[0] = static_cast<uint8_t>(bits & 0xFF);
  p[sC] = static_cast<uint8_t>(bits >> 8);
}

// Bit offset and width of coordinate d's code.
__device__ __forceinline__ void code_bits(const TqCodec& c, int d, int& bit, int& nb) {
  if (d < c.n0) {
    bit = d * c.b0;
    nb = c.b0;
  } else {
    bit = c.seg1 * 8 + (d - c.n0) * c.b1;
    nb = c.b1;
  }
}

// The code of coordinate d: ((byte[o/8] | byte[o/8 + 1] << 8) >> o % 8) & (2**b - 1); the second byte is
// read only when the code straddles into it (it may lie past the slot's end otherwise).
__device__ __forceinline__ int load_code(const uint8_t* row, int64_t sC, const TqCodec& c, int d) {
  int bit, nb;
  code_bits(c, d, bit, nb);
  const uint8_t* p = row + static_cast<int64_t>(bit >> 3) * sC;
  const int sh = bit & 7;
  uint32_t v = p[0];
  if (sh + nb > 8) v |= static_cast<uint32_t>(p[sC]) << 8;
  return static_cast<int>((v >> sh) & ((1u << nb) - 1u));
}

}  // namespace kvq

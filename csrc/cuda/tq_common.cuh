// Device helpers shared by the store and decode kernels. Framework-agnostic (CUDA only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

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

// Bit offset and width of code j (segment 0 holds codes [0, n0), segment 1 the rest).
__device__ __forceinline__ void code_bits(const TqCodec& c, int j, int& bit, int& nb) {
  if (j < c.n0) {
    bit = j * c.b0;
    nb = c.b0;
  } else {
    bit = c.seg1 * 8 + (j - c.n0) * c.b1;
    nb = c.b1;
  }
}

// Code j: ((byte[o/8] | byte[o/8 + 1] << 8 | byte[o/8 + 2] << 16) >> o % 8) & (2**b - 1); a following byte is
// read only when the code reaches into it (it may lie past the slot's end otherwise). b <= 12 (FibQuant's
// widest index), so a code spans at most three bytes.
__device__ __forceinline__ int load_code(const uint8_t* row, int64_t sC, const TqCodec& c, int j) {
  int bit, nb;
  code_bits(c, j, bit, nb);
  const uint8_t* p = row + static_cast<int64_t>(bit >> 3) * sC;
  const int sh = bit & 7;
  uint32_t v = p[0];
  if (sh + nb > 8) v |= static_cast<uint32_t>(p[sC]) << 8;
  if (sh + nb > 16) v |= static_cast<uint32_t>(p[2 * sC]) << 16;
  return static_cast<int>((v >> sh) & ((1u << nb) - 1u));
}

// Rotated coordinate d of a decoded row before its fp16 scale, from the code that covers it.
__device__ __forceinline__ float code_value(const uint8_t* row, int64_t sC, const TqCodec& c, const float* tab, int d) {
  if (c.kind == kKindFibQuant) return tab[load_code(row, sC, c, d / c.block) * c.block + d % c.block];
  return tab[d * c.w + load_code(row, sC, c, d)];
}

// Floats of a codec's decode table (centroids per coordinate, or the codebook).
__host__ __device__ __forceinline__ int table_floats(const TqCodec& c, int head_dim) {
  return c.kind == kKindFibQuant ? c.w * c.block : head_dim * c.w;
}

// Sink records: byte o of a block's sink area lives in slot o / bytes at byte offset + o % bytes.
__device__ __forceinline__ int64_t sink_byte(const Sinks& s, int64_t sT, int64_t sC, int o) {
  return static_cast<int64_t>(o / s.bytes) * sT + static_cast<int64_t>(s.offset + o % s.bytes) * sC;
}

// Record of block offset `off`: K (half 0) or V (half 1) coordinate d, bf16 little-endian.
__device__ __forceinline__ float load_sink(const uint8_t* block_row, int64_t sT, int64_t sC, const Sinks& s, int off,
                                           int half, int d, int head_dim) {
  const int o = off * 4 * head_dim + half * 2 * head_dim + 2 * d;
  const uint32_t bits = block_row[sink_byte(s, sT, sC, o)] | (static_cast<uint32_t>(block_row[sink_byte(s, sT, sC, o + 1)]) << 8);
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(bits)));
}

__device__ __forceinline__ void store_sink(uint8_t* block_row, int64_t sT, int64_t sC, const Sinks& s, int off, int half,
                                           int d, int head_dim, float x) {
  const int o = off * 4 * head_dim + half * 2 * head_dim + 2 * d;
  const uint32_t bits = __bfloat16_as_ushort(__float2bfloat16_rn(x));
  block_row[sink_byte(s, sT, sC, o)] = static_cast<uint8_t>(bits & 0xFF);
  block_row[sink_byte(s, sT, sC, o + 1)] = static_cast<uint8_t>(bits >> 8);
}

// Dynamic shared memory of the decode kernel (the FibQuant score table), sized by the launch.
__device__ __forceinline__ float* dynamic_smem() {
#ifdef KVQ_HOST_EMULATION  // the CPU emulation in tests/test_csrc_compile.py has no extern __shared__
  return kvq_emulated_dynamic_smem();
#else
  extern __shared__ float kvq_dynamic_smem[];
  return kvq_dynamic_smem;
#endif
}

}  // namespace kvq

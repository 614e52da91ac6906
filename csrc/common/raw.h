// Unquantized 16-bit storage (vllm_kvq/codecs/raw.py): D little-endian bf16 or fp16 values, no rotation.
#pragma once

#include <cstdint>

#include "codec_desc.h"
#include "half.h"

namespace kvq {

static inline void raw_encode(const CodecDesc& c, const float* x, uint8_t* out, int64_t stride) {
  for (int i = 0; i < c.dim; ++i) {
    const uint16_t h = c.kind == kBF16 ? f32_to_bf16(x[i]) : f32_to_f16(x[i]);
    out[static_cast<int64_t>(2 * i) * stride] = static_cast<uint8_t>(h & 0xffu);
    out[static_cast<int64_t>(2 * i + 1) * stride] = static_cast<uint8_t>(h >> 8);
  }
}

static inline void raw_decode(const CodecDesc& c, const uint8_t* row, float* y) {
  for (int i = 0; i < c.dim; ++i) {
    const uint16_t h = static_cast<uint16_t>(row[2 * i] | (row[2 * i + 1] << 8));
    y[i] = c.kind == kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
  }
}

}  // namespace kvq

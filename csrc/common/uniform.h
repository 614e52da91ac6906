// Uniform asymmetric integer codes per token and group (vllm_kvq/codecs/uniform.py): y = R x (identity
// unless rotate), per group of gs coordinates fp16 scale = (max - min) / (2^b - 1) and fp16 min,
// q = round_half_even((y - min) / scale) clamped to [0, 2^b - 1]; decode q * scale + min.
// Row: [codes | (fp16 scale, fp16 min) per group].
#pragma once

#include <cmath>
#include <cstdint>

#include "codec_desc.h"
#include "half.h"
#include "packing.h"
#include "rotation.h"

namespace kvq {

static inline void uniform_encode(const CodecDesc& c, const float* x, uint8_t* out, int64_t stride,
                                  float* fscratch, uint8_t* codes) {
  const int d = c.dim, gs = c.gs;
  const int qmax = (1 << c.b0) - 1;
  float* y = fscratch;
  rotate_apply(c.rot, x, y);
  for (int g = 0; g < d / gs; ++g) {
    const float* yg = y + g * gs;
    float lo = yg[0], hi = yg[0];
    for (int i = 1; i < gs; ++i) {
      lo = yg[i] < lo ? yg[i] : lo;
      hi = yg[i] > hi ? yg[i] : hi;
    }
    // Quantize with the fp16-rounded parameters decode will use, as the reference does.
    const uint16_t s16 = f32_to_f16((hi - lo) / static_cast<float>(qmax));
    const uint16_t m16 = f32_to_f16(lo);
    const float s32 = f16_to_f32(s16), m32 = f16_to_f32(m16);
    const float safe = s32 > 0.f ? s32 : 1.f;
    for (int i = 0; i < gs; ++i) {
      float q = std::nearbyint((yg[i] - m32) / safe);
      q = q < 0.f ? 0.f : (q > static_cast<float>(qmax) ? static_cast<float>(qmax) : q);
      codes[g * gs + i] = static_cast<uint8_t>(q);
    }
    uint8_t* m = out + static_cast<int64_t>(c.meta + 4 * g) * stride;
    m[0] = static_cast<uint8_t>(s16 & 0xffu);
    m[stride] = static_cast<uint8_t>(s16 >> 8);
    m[2 * stride] = static_cast<uint8_t>(m16 & 0xffu);
    m[3 * stride] = static_cast<uint8_t>(m16 >> 8);
  }
  pack_bits(codes, d, c.b0, out, stride);
}

static inline void uniform_decode_rotated(const CodecDesc& c, const uint8_t* row, float* y) {
  for (int g = 0; g < c.dim / c.gs; ++g) {
    const uint8_t* m = row + c.meta + 4 * g;
    const float s = f16_to_f32(static_cast<uint16_t>(m[0] | (m[1] << 8)));
    const float mn = f16_to_f32(static_cast<uint16_t>(m[2] | (m[3] << 8)));
    for (int i = g * c.gs; i < (g + 1) * c.gs; ++i) y[i] = static_cast<float>(unpack_one(row, i, c.b0)) * s + mn;
  }
}

}  // namespace kvq

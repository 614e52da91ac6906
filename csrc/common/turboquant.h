// TurboQuant (vllm_kvq/codecs/turboquant.py): y = R x / ||x||, each coordinate replaced by the index of its
// Lloyd-Max cell (torch.bucketize: the number of thresholds strictly below it), one fp16 scale.
// Row: [segment 0 codes | segment 1 codes | fp16 scale]; decode is scale * centroid in the rotated domain.
#pragma once

#include <cmath>
#include <cstdint>

#include "codec_desc.h"
#include "half.h"
#include "packing.h"
#include "rotation.h"

namespace kvq {

static inline void tq_encode(const CodecDesc& c, const float* x, uint8_t* out, int64_t stride, float* fscratch,
                             uint8_t* codes) {
  const int d = c.dim;
  double ss = 0.0;
  for (int i = 0; i < d; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float norm = static_cast<float>(std::sqrt(ss));
  const float safe = norm > 1e-30f ? norm : 1e-30f;
  float* y = fscratch;
  rotate_apply(c.rot, x, y);
  for (int i = 0; i < d; ++i) y[i] = y[i] / safe;
  // torch.bucketize as a count of thresholds below each value: branch-free, and the loop over coordinates
  // vectorizes (a binary search mispredicts on every level).
  for (int i = 0; i < d; ++i) codes[i] = 0;
  for (int k = 0; k < (1 << c.b0) - 1; ++k) {
    const float t = c.thr0[k];
    for (int i = 0; i < c.n0; ++i) codes[i] += y[i] > t ? 1 : 0;
  }
  for (int k = 0; k < (1 << c.b1) - 1 && c.n0 < d; ++k) {
    const float t = c.thr1[k];
    for (int i = c.n0; i < d; ++i) codes[i] += y[i] > t ? 1 : 0;
  }
  float c2 = 0.f, yc = 0.f;
  for (int i = 0; i < d; ++i) {
    const float cv = i < c.n0 ? c.cent0[codes[i]] : c.cent1[codes[i]];
    c2 += cv * cv;
    yc += y[i] * cv;
  }
  c2 = c2 > 1e-30f ? c2 : 1e-30f;
  float scale = norm;
  if (c.smode == 1) scale = norm / std::sqrt(c2);
  if (c.smode == 2) scale = norm * yc / c2;
  pack_bits(codes, c.n0, c.b0, out, stride);
  if (c.n0 < d) pack_bits(codes + c.n0, d - c.n0, c.b1, out + static_cast<int64_t>(c.seg1) * stride, stride);
  const uint16_t h = f32_to_f16(scale);
  out[static_cast<int64_t>(c.meta) * stride] = static_cast<uint8_t>(h & 0xffu);
  out[static_cast<int64_t>(c.meta + 1) * stride] = static_cast<uint8_t>(h >> 8);
}

static inline float tq_scale(const CodecDesc& c, const uint8_t* row) {
  return f16_to_f32(static_cast<uint16_t>(row[c.meta] | (row[c.meta + 1] << 8)));
}

static inline void tq_decode_rotated(const CodecDesc& c, const uint8_t* row, float* y) {
  const float s = tq_scale(c, row);
  for (int i = 0; i < c.n0; ++i) y[i] = c.cent0[unpack_one(row, i, c.b0)] * s;
  for (int i = c.n0; i < c.dim; ++i) y[i] = c.cent1[unpack_one(row + c.seg1, i - c.n0, c.b1)] * s;
}

}  // namespace kvq

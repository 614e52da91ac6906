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
  // Fields in locals: codes (uint8_t*) may alias anything, so reading c's fields inside the loops would
  // reload them on every store and keep the loops scalar.
  const int d = c.dim, n0 = c.n0;
  // Sum of squares in double, 8 independent lanes (vectorizes) added pairwise; the float norm it rounds to
  // is the one-chain sum's in all but astronomically rare cases.
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i8 = 0;
  for (; i8 + 8 <= d; i8 += 8)
    for (int l = 0; l < 8; ++l) lane[l] += static_cast<double>(x[i8 + l]) * x[i8 + l];
  for (int i = i8; i < d; ++i) lane[i - i8] += static_cast<double>(x[i]) * x[i];
  const double ss = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  const float norm = static_cast<float>(std::sqrt(ss));
  const float safe = norm > 1e-30f ? norm : 1e-30f;
  float* y = fscratch;
  rotate_apply(c.rot, x, y);
  for (int i = 0; i < d; ++i) y[i] = y[i] / safe;
  // torch.bucketize as a count of thresholds below each value: branch-free, and the loop over coordinates
  // vectorizes (a binary search mispredicts on every level). Counts in int32 (same width as the floats).
  int32_t cnt[1024];  // D <= 1024 (kernels.h bounds the head size)
  for (int i = 0; i < d; ++i) cnt[i] = 0;
  const float* thr0 = c.thr0;
  const float* thr1 = c.thr1;
  const int nt0 = (1 << c.b0) - 1, nt1 = n0 < d ? (1 << c.b1) - 1 : 0;
  for (int k = 0; k < nt0; ++k) {
    const float t = thr0[k];
    for (int i = 0; i < n0; ++i) cnt[i] += y[i] > t ? 1 : 0;
  }
  for (int k = 0; k < nt1; ++k) {
    const float t = thr1[k];
    for (int i = n0; i < d; ++i) cnt[i] += y[i] > t ? 1 : 0;
  }
  for (int i = 0; i < d; ++i) codes[i] = static_cast<uint8_t>(cnt[i]);
  // ||c||^2 and y . c in 16 independent lanes (vectorizes), added pairwise: the float32 sums differ from
  // one chain's in the last bits, far below the fp16 scale's rounding.
  float c2l[16] = {}, ycl[16] = {};
  const float* cent0 = c.cent0;
  const float* cent1 = c.cent1;
  for (int i0 = 0; i0 < d; i0 += 16)
    for (int l = 0; l < 16 && i0 + l < d; ++l) {
      const int i = i0 + l;
      const float cv = i < n0 ? cent0[cnt[i]] : cent1[cnt[i]];
      c2l[l] += cv * cv;
      ycl[l] += y[i] * cv;
    }
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) {
      c2l[l] += c2l[l + w];
      ycl[l] += ycl[l + w];
    }
  float c2 = c2l[0];
  const float yc = ycl[0];
  c2 = c2 > 1e-30f ? c2 : 1e-30f;
  float scale = norm;
  if (c.smode == 1) scale = norm / std::sqrt(c2);
  if (c.smode == 2) scale = norm * yc / c2;
  pack_bits(codes, n0, c.b0, out, stride);
  if (n0 < d) pack_bits(codes + n0, d - n0, c.b1, out + static_cast<int64_t>(c.seg1) * stride, stride);
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

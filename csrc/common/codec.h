// Dispatch over the codec kinds: encode a vector, decode a packed row (scalar reference paths shared by
// every native backend; SIMD kernels specialise the hot loops per ISA).
#pragma once

#include "codec_desc.h"
#include "fibquant.h"
#include "raw.h"
#include "turboquant.h"
#include "uniform.h"

namespace kvq {

// FibQuant through a CodecDesc (see codec_desc.h for the field mapping). scratch: 2 * D floats; the norm
// as tq_encode computes it (double sum), the rest as the reference.
static inline void fib_encode(const CodecDesc& c, const float* x, uint8_t* out, int64_t stride, float* fscratch) {
  const int d = c.dim;
  double ss = 0.0;
  for (int i = 0; i < d; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float norm = static_cast<float>(std::sqrt(ss));
  const float safe = norm > 1e-30f ? norm : 1e-30f;
  float* u = fscratch;
  float* cw = fscratch + d;
  rotate_apply(c.rot, x, u);
  for (int i = 0; i < d; ++i) u[i] = u[i] / safe;
  uint16_t idx[1024];  // D / K <= 1024 (kernels.h bounds the head size)
  const float scale = fib_encode_unit(u, d, c.n0, c.cent0, c.thr0, 1 << c.b0, c.smode, norm, idx, cw);
  fib_pack(idx, d / c.n0, c.b0, out, stride);
  const uint16_t h = f32_to_f16(scale);
  out[static_cast<int64_t>(c.meta) * stride] = static_cast<uint8_t>(h & 0xffu);
  out[static_cast<int64_t>(c.meta + 1) * stride] = static_cast<uint8_t>(h >> 8);
}

// The fp16 scale after the codes: the same field as TurboQuant's.
static inline float fib_row_scale(const CodecDesc& c, const uint8_t* row) { return tq_scale(c, row); }

static inline void fib_decode_rotated(const CodecDesc& c, const uint8_t* row, float* y) {
  fib_codewords(row, c.dim, c.n0, c.b0, c.cent0, y);
  const float s = fib_row_scale(c, row);
  for (int i = 0; i < c.dim; ++i) y[i] *= s;
}

// Encodes x (D floats, calibration already applied) into c.nbytes bytes at out[k * stride].
// scratch: 2 * D floats and D bytes.
static inline void encode_vector(const CodecDesc& c, const float* x, uint8_t* out, int64_t stride, float* fscratch,
                                 uint8_t* cscratch) {
  switch (c.kind) {
    case kTurboQuant: tq_encode(c, x, out, stride, fscratch, cscratch); break;
    case kUniform: uniform_encode(c, x, out, stride, fscratch, cscratch); break;
    case kFibQuant: fib_encode(c, x, out, stride, fscratch); break;
    default: raw_encode(c, x, out, stride); break;
  }
}

// Decodes a contiguous packed row into its rotated domain (D floats): what attention dots queries with.
static inline void decode_rotated_scalar(const CodecDesc& c, const uint8_t* row, float* y) {
  switch (c.kind) {
    case kTurboQuant: tq_decode_rotated(c, row, y); break;
    case kUniform: uniform_decode_rotated(c, row, y); break;
    case kFibQuant: fib_decode_rotated(c, row, y); break;
    default: raw_decode(c, row, y); break;
  }
}

}  // namespace kvq

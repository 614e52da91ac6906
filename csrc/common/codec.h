// Dispatch over the codec kinds: encode a vector, decode a packed row (scalar reference paths shared by
// every native backend; SIMD kernels specialise the hot loops per ISA).
#pragma once

#include "codec_desc.h"
#include "raw.h"
#include "turboquant.h"
#include "uniform.h"

namespace kvq {

// Encodes x (D floats, calibration already applied) into c.nbytes bytes at out[k * stride].
// scratch: 2 * D floats and D bytes.
static inline void encode_vector(const CodecDesc& c, const float* x, uint8_t* out, int64_t stride, float* fscratch,
                                 uint8_t* cscratch) {
  switch (c.kind) {
    case kTurboQuant: tq_encode(c, x, out, stride, fscratch, cscratch); break;
    case kUniform: uniform_encode(c, x, out, stride, fscratch, cscratch); break;
    default: raw_encode(c, x, out, stride); break;
  }
}

// Decodes a contiguous packed row into its rotated domain (D floats): what attention dots queries with.
static inline void decode_rotated_scalar(const CodecDesc& c, const uint8_t* row, float* y) {
  switch (c.kind) {
    case kTurboQuant: tq_decode_rotated(c, row, y); break;
    case kUniform: uniform_decode_rotated(c, row, y); break;
    default: raw_decode(c, row, y); break;
  }
}

}  // namespace kvq

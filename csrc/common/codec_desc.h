// One codec of a head group as native kernels see it: the layout numbers and pointers to its small tables.
// Filled from vllm_kvq/kernels/cpu.py (``codec_desc``), which reads them off the Python codec objects; the
// Python codecs define the bytes, these structs only describe them.
#pragma once

#include <cstdint>

#include "rotation.h"

namespace kvq {

enum CodecKind : int { kTurboQuant = 0, kUniform = 1, kBF16 = 2, kFP16 = 3, kFibQuant = 4 };

struct CodecDesc {
  int kind;
  int dim;     // D
  int nbytes;  // packed bytes per vector
  // TurboQuant: segment 0 holds coordinates [0, n0) at b0 bits, segment 1 [n0, D) at b1 bits (== b0 and
  // n0 == D for integer rates). Uniform: b0 bits for all D coordinates. FibQuant (fibquant.h): b0 = L index
  // bits per block, n0 = K coordinates per block, cent0 = the (2^L, K) codebook, thr0 = its (2^L,) half
  // squared norms, meta = the byte offset of the fp16 scale.
  int b0, n0, b1;
  int seg1;   // byte offset of segment 1
  int meta;   // byte offset of the metadata (fp16 scale; uniform: fp16 (scale, min) per group)
  int gs;     // uniform group size
  int smode;  // TurboQuant scale mode: 0 norm, 1 corrected, 2 lsq
  const float* cent0;  // (2^b0,) centroids of segment 0
  const float* cent1;  // (2^b1,)
  const float* thr0;   // (2^b0 - 1,) increasing thresholds of segment 0
  const float* thr1;   // (2^b1 - 1,)
  Rotation rot;
};

}  // namespace kvq

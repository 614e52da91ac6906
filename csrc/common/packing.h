// Exact b-bit packing (vllm_kvq/codecs/packing.py defines it): code j of a segment occupies bits
// [j*b, (j+1)*b) of a little-endian bit stream, so it starts in byte (j*b)/8 at bit (j*b)%8.
#pragma once

#include <cstdint>

namespace kvq {

// Packs n codes of b bits (1..8) from codes[] into ceil(n*b/8) bytes written at out[k * stride].
static inline void pack_bits(const uint8_t* codes, int n, int b, uint8_t* out, int64_t stride) {
  const int nbytes = (n * b + 7) / 8;
  uint32_t acc = 0;
  int have = 0, k = 0;
  for (int j = 0; j < n; ++j) {
    acc |= static_cast<uint32_t>(codes[j]) << have;
    have += b;
    while (have >= 8) {
      out[static_cast<int64_t>(k++) * stride] = static_cast<uint8_t>(acc & 0xffu);
      acc >>= 8;
      have -= 8;
    }
  }
  if (k < nbytes) out[static_cast<int64_t>(k) * stride] = static_cast<uint8_t>(acc & 0xffu);
}

// Code j of b bits from a contiguous packed segment.
static inline uint32_t unpack_one(const uint8_t* seg, int j, int b) {
  const int bit = j * b;
  const uint8_t* p = seg + bit / 8;
  // Two bytes cover any code of up to 8 bits; the second byte is read only when the code reaches into it.
  uint32_t w = p[0];
  if ((bit % 8) + b > 8) w |= static_cast<uint32_t>(p[1]) << 8;
  return (w >> (bit % 8)) & ((1u << b) - 1u);
}

}  // namespace kvq

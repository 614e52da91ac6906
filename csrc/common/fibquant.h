// FibQuant (vllm_kvq/codecs/fibquant.py): y = R x / ||x||, each block of K consecutive rotated coordinates
// replaced by the index of its nearest codeword in one shared codebook of W = 2^L codewords (L = K * bits
// index bits), one fp16 scale. Row: [M = D / K indices as an L-bit little-endian bit stream | fp16 scale];
// index j occupies bits [j*L, (j+1)*L). Decode is scale * codeword in the rotated domain.
//
// Plain functions over raw pointers, no framework and no containers, so the CPU kernels and the CUDA
// kernels share them (KVQ_HD marks them host + device under nvcc). Tables, as vllm_kvq/kernels hand them over:
//   words   (W, K) float32 row-major, the codebook
//   half_sq (W,)   float32, 0.5 * ||w||^2 computed as the reference computes it (fib_codebook.nearest)
#pragma once

#include <cmath>
#include <cstdint>

#ifndef KVQ_HD
#ifdef __CUDACC__
#define KVQ_HD __host__ __device__
#else
#define KVQ_HD
#endif
#endif

namespace kvq {

constexpr int kFibMaxIndexBits = 12;  // fib_codebook.MAX_INDEX_BITS: an index spans at most 3 bytes

// Index j of a packed row (L <= 12). The window reads a third byte only when the index reaches into it; the
// last index's window never leaves the row (the fp16 scale follows the codes).
KVQ_HD static inline uint32_t fib_index(const uint8_t* row, int j, int L) {
  const int bit = j * L;
  const uint8_t* p = row + (bit >> 3);
  const int sh = bit & 7;
  uint32_t w = p[0];
  if (sh + L > 8) w |= static_cast<uint32_t>(p[1]) << 8;
  if (sh + L > 16) w |= static_cast<uint32_t>(p[2]) << 16;
  return (w >> sh) & ((1u << L) - 1u);
}

// All M indices of a row into idx[0..M): one pass over the bit stream.
KVQ_HD static inline void fib_indices(const uint8_t* row, int M, int L, uint16_t* idx) {
  uint32_t acc = 0;
  int have = 0, b = 0;
  const uint32_t mask = (1u << L) - 1u;
  for (int j = 0; j < M; ++j) {
    while (have < L) {
      acc |= static_cast<uint32_t>(row[b++]) << have;
      have += 8;
    }
    idx[j] = static_cast<uint16_t>(acc & mask);
    acc >>= L;
    have -= L;
  }
}

// Packs M indices of L bits into ceil(M*L/8) bytes written at out[b * stride] (the reference's bit layout).
KVQ_HD static inline void fib_pack(const uint16_t* idx, int M, int L, uint8_t* out, int64_t stride) {
  const int nbytes = (M * L + 7) / 8;
  uint32_t acc = 0;
  int have = 0, b = 0;
  for (int j = 0; j < M; ++j) {
    acc |= static_cast<uint32_t>(idx[j]) << have;
    have += L;
    while (have >= 8) {
      out[static_cast<int64_t>(b++) * stride] = static_cast<uint8_t>(acc & 0xffu);
      acc >>= 8;
      have -= 8;
    }
  }
  if (b < nbytes) out[static_cast<int64_t>(b) * stride] = static_cast<uint8_t>(acc & 0xffu);
}

// Nearest codeword of one K-block y: the reference's criterion half_sq[c] - <y, w_c>, the first minimum
// wins (torch.argmin). Only a different summation order of the K-term dot product can differ from it: a
// code may then flip where two codewords tie (the codec's boundary_distance measures how close that is).
KVQ_HD static inline int fib_nearest(const float* y, int K, const float* words, const float* half_sq, int W) {
  int best = 0;
  float best_s = 0.f;
  for (int c = 0; c < W; ++c) {
    const float* w = words + c * K;
    float dot = 0.f;
    for (int i = 0; i < K; ++i) dot += y[i] * w[i];
    const float s = half_sq[c] - dot;
    if (c == 0 || s < best_s) {
      best_s = s;
      best = c;
    }
  }
  return best;
}

// The fp16-to-be scale of a unit rotated vector u (D floats) coded by codewords c (D floats) with norm
// ||x||: scale mode 0 "norm", 1 "corrected" (||x|| / ||c||), 2 "lsq" (||x|| <u, c> / ||c||^2); as
// TurboQuant's (the same three modes and clamps as the reference).
KVQ_HD static inline float fib_scale(int smode, float norm, const float* u, const float* c, int D) {
  if (smode == 0) return norm;
  float c2 = 0.f, uc = 0.f;
  for (int i = 0; i < D; ++i) {
    c2 += c[i] * c[i];
    uc += u[i] * c[i];
  }
  c2 = c2 > 1e-30f ? c2 : 1e-30f;
  return smode == 1 ? norm / sqrtf(c2) : norm * uc / c2;
}

// Encodes a unit rotated vector u (D floats): indices of every block into idx[0..M) and the codewords they
// pick into c (D floats); returns the scale (scale mode smode, input norm ``norm``).
KVQ_HD static inline float fib_encode_unit(const float* u, int D, int K, const float* words, const float* half_sq,
                                           int W, int smode, float norm, uint16_t* idx, float* c) {
  const int M = D / K;
  for (int j = 0; j < M; ++j) {
    const int best = fib_nearest(u + j * K, K, words, half_sq, W);
    idx[j] = static_cast<uint16_t>(best);
    for (int i = 0; i < K; ++i) c[j * K + i] = words[best * K + i];
  }
  return fib_scale(smode, norm, u, c, D);
}

// Decode of a row into its rotated domain without the scale: y[j*K + i] = words[idx_j][i].
KVQ_HD static inline void fib_codewords(const uint8_t* row, int D, int K, int L, const float* words, float* y) {
  const int M = D / K;
  for (int j = 0; j < M; ++j) {
    const float* w = words + fib_index(row, j, L) * K;
    for (int i = 0; i < K; ++i) y[j * K + i] = w[i];
  }
}

// ---- table lookups for attention (product quantization's asymmetric distance) ---------------------------
//
// For a rotated query q (D floats) the table T[j * W + c] = <q block j, w_c> (M x W floats) turns a score
// into M lookups: <q, decode(row)> = scale * sum_j T[j * W + idx_j]. Values accumulate the other way round:
// a histogram H[j * W + c] of the attention weight (times the row scale) each codeword got at block j;
// the rotated output is then o[j*K + i] = sum_c H[j * W + c] * w_c[i] (fib_fold), once per query row.

KVQ_HD static inline void fib_query_table(const float* q, int D, int K, const float* words, int W, float* table) {
  const int M = D / K;
  for (int j = 0; j < M; ++j) {
    const float* qb = q + j * K;
    float* t = table + static_cast<int64_t>(j) * W;
    for (int c = 0; c < W; ++c) {
      const float* w = words + c * K;
      float s = 0.f;
      for (int i = 0; i < K; ++i) s += qb[i] * w[i];
      t[c] = s;
    }
  }
}

// sum_j T[j * W + idx[j]] (the unscaled score of one row, from its unpacked indices). Four partial sums:
// one chain of dependent adds would wait on the add latency at every lookup.
KVQ_HD static inline float fib_table_score(const float* table, const uint16_t* idx, int M, int W) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int j = 0;
  for (; j + 3 < M; j += 4) {
    s0 += table[static_cast<int64_t>(j) * W + idx[j]];
    s1 += table[static_cast<int64_t>(j + 1) * W + idx[j + 1]];
    s2 += table[static_cast<int64_t>(j + 2) * W + idx[j + 2]];
    s3 += table[static_cast<int64_t>(j + 3) * W + idx[j + 3]];
  }
  for (; j < M; ++j) s0 += table[static_cast<int64_t>(j) * W + idx[j]];
  return (s0 + s1) + (s2 + s3);
}

// H[j * W + idx[j]] += p for every block j of one row.
KVQ_HD static inline void fib_histogram_add(float* hist, const uint16_t* idx, int M, int W, float p) {
  for (int j = 0; j < M; ++j) hist[static_cast<int64_t>(j) * W + idx[j]] += p;
}

// o[j*K + i] += sum_c H[j * W + c] * words[c][i]: the histogram back to a rotated-domain vector.
KVQ_HD static inline void fib_fold(const float* hist, int D, int K, const float* words, int W, float* o) {
  const int M = D / K;
  for (int j = 0; j < M; ++j) {
    const float* h = hist + static_cast<int64_t>(j) * W;
    for (int c = 0; c < W; ++c) {
      const float hc = h[c];
      if (hc == 0.f) continue;  // most codewords of a block never occur in a short context
      const float* w = words + c * K;
      for (int i = 0; i < K; ++i) o[j * K + i] += hc * w[i];
    }
  }
}

}  // namespace kvq

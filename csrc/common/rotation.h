// The codecs' rotations (vllm_kvq/codecs/rotation.py): identity, seeded randomized Hadamard
// R x = H (s * x) / sqrt(D) for power-of-two D, or a dense orthogonal R (D x D, row-major, y = R x).
// The butterfly order matches rotation.fwht, so a Hadamard rotation gives torch's float32 results bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#if (defined(KVQ_AVX512) && KVQ_AVX512) || (defined(KVQ_AVX2) && KVQ_AVX2)
#include <immintrin.h>
#endif

namespace kvq {

enum RotKind : int { kRotIdentity = 0, kRotHadamard = 1, kRotDense = 2 };

struct Rotation {
  int kind;
  int dim;
  const float* signs;  // (D,) +-1, Hadamard
  const float* mat;    // (D, D) R, dense
  float norm;          // 1 / sqrt(D) rounded to float, Hadamard
};

// Unnormalized fast Walsh-Hadamard transform in place (D a power of two).
static inline void fwht_inplace(float* x, int d) {
  for (int h = 1; h < d; h *= 2) {
    for (int i = 0; i < d; i += 2 * h) {
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
}

#if defined(KVQ_AVX512) && KVQ_AVX512
// fwht_inplace for D a multiple of 16 in the CPU kernels' AVX-512 build (csrc/cpu/kernels_avx512.cpp defines
// KVQ_AVX512 under its target pragma, which does not define __AVX512F__): the same
// butterflies, each output element the same single a + b or a - b of the same two inputs, so the same bits.
// Levels h < 16 pair lanes of one vector (a lane permute, then an add and a masked subtract); h >= 16
// pairs whole vectors.
static inline void fwht_inplace_avx512(float* x, int d) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int i = 0; i < d; i += 16) {
    __m512 v = _mm512_loadu_ps(x + i);
    for (int h = 1; h < 16; h *= 2) {
      const __m512 p = _mm512_permutexvar_ps(_mm512_xor_si512(lane, _mm512_set1_epi32(h)), v);
      // lanes with bit h set hold x[j + h] (b); their partner p holds x[j] (a): a - b there, a + b elsewhere
      const __mmask16 upper = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(h));
      v = _mm512_mask_sub_ps(_mm512_add_ps(v, p), upper, p, v);
    }
    _mm512_storeu_ps(x + i, v);
  }
  for (int h = 16; h < d; h *= 2)
    for (int i = 0; i < d; i += 2 * h)
      for (int j = i; j < i + h; j += 16) {
        const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + h);
        _mm512_storeu_ps(x + j, _mm512_add_ps(a, b));
        _mm512_storeu_ps(x + j + h, _mm512_sub_ps(a, b));
      }
}
#endif

#if defined(KVQ_AVX2) && KVQ_AVX2
// fwht_inplace for D a multiple of 8 in the CPU kernels' AVX2 build, the same butterflies and bits as the
// AVX-512 one: levels h < 8 pair lanes of one vector (an in-register permute, an add, a subtract and a
// blend), h >= 8 pairs whole vectors.
template <int H>
static inline __m256 fwht_lanes_avx2(__m256 v) {
  // p holds each lane's partner; lanes with bit H set hold x[j + H] (b) and take a - b = p - v
  const __m256 p = H == 1 ? _mm256_permute_ps(v, 0xB1) : H == 2 ? _mm256_permute_ps(v, 0x4E)
                                                                : _mm256_permute2f128_ps(v, v, 0x01);
  return _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), H == 1 ? 0xAA : H == 2 ? 0xCC : 0xF0);
}

static inline void fwht_inplace_avx2(float* x, int d) {
  for (int i = 0; i < d; i += 8)
    _mm256_storeu_ps(x + i, fwht_lanes_avx2<4>(fwht_lanes_avx2<2>(fwht_lanes_avx2<1>(_mm256_loadu_ps(x + i)))));
  for (int h = 8; h < d; h *= 2)
    for (int i = 0; i < d; i += 2 * h)
      for (int j = i; j < i + h; j += 8) {
        const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
        _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
        _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
      }
}
#endif

static inline void fwht(float* x, int d) {
#if defined(KVQ_AVX512) && KVQ_AVX512
  if (d % 16 == 0) {
    fwht_inplace_avx512(x, d);
    return;
  }
#endif
#if defined(KVQ_AVX2) && KVQ_AVX2
  if (d % 8 == 0) {
    fwht_inplace_avx2(x, d);
    return;
  }
#endif
  fwht_inplace(x, d);
}

// y = R x (x and y must not alias).
static inline void rotate_apply(const Rotation& r, const float* x, float* y) {
  const int d = r.dim;
  if (r.kind == kRotHadamard) {
    for (int i = 0; i < d; ++i) y[i] = x[i] * r.signs[i];
    fwht(y, d);
    for (int i = 0; i < d; ++i) y[i] *= r.norm;
  } else if (r.kind == kRotDense) {
    for (int i = 0; i < d; ++i) {
      const float* row = r.mat + static_cast<int64_t>(i) * d;
      float s = 0.f;
      for (int j = 0; j < d; ++j) s += row[j] * x[j];
      y[i] = s;
    }
  } else {
    for (int i = 0; i < d; ++i) y[i] = x[i];
  }
}

// x = R^T y (x and y must not alias).
static inline void rotate_inverse(const Rotation& r, const float* y, float* x) {
  const int d = r.dim;
  if (r.kind == kRotHadamard) {
    for (int i = 0; i < d; ++i) x[i] = y[i];
    fwht(x, d);
    for (int i = 0; i < d; ++i) x[i] = x[i] * r.norm * r.signs[i];
  } else if (r.kind == kRotDense) {
    for (int j = 0; j < d; ++j) x[j] = 0.f;
    for (int i = 0; i < d; ++i) {
      const float* row = r.mat + static_cast<int64_t>(i) * d;
      const float yi = y[i];
      for (int j = 0; j < d; ++j) x[j] += row[j] * yi;
    }
  } else {
    for (int i = 0; i < d; ++i) x[i] = y[i];
  }
}

}  // namespace kvq

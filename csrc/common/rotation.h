// The codecs' rotations (vllm_kvq/codecs/rotation.py): identity, seeded randomized Hadamard
// R x = H (s * x) / sqrt(D) for power-of-two D, or a dense orthogonal R (D x D, row-major, y = R x).
// The butterfly order matches rotation.fwht, so a Hadamard rotation gives torch's float32 results bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

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

// y = R x (x and y must not alias).
static inline void rotate_apply(const Rotation& r, const float* x, float* y) {
  const int d = r.dim;
  if (r.kind == kRotHadamard) {
    for (int i = 0; i < d; ++i) y[i] = x[i] * r.signs[i];
    fwht_inplace(y, d);
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
    fwht_inplace(x, d);
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

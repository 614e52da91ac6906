// Position-aware key centring (vllm_kvq/key_centre.py) in the CPU kernels. The cache holds each key minus the
// key mean turned to its own position p, so query row (token t, query head qh) adds
//     bias(t, qh, p) = bias_q[t, qh] . table[p]      (natural-log units: bias_q carries the softmax scale)
// to its score of the key at p, sink records included (AttnArgs::bias_q null: no centring), where
// table[p] = [cos(p f), sin(p f), 0...] over the h = bias_half rotate-half pairs.
//
// Per-row tiles (decode, the generic prefill) evaluate 16 consecutive positions b + r at once from table[b]
// and the first 16 rows (angle addition): with (A, B) = bias_q's halves and (c, s) = table[b]'s,
//     bias(b + r) = sum_i w_i cos(r f_i) + w_{h+i} sin(r f_i),   w_i = A_i c_i + B_i s_i,  w_{h+i} = B_i c_i - A_i s_i,
// i.e. one D-vector w per 16 keys and D multiply-adds of 16 lanes against bias_et (table rows 0..15
// transposed, (2h, 16)). The lane-major prefill (rows in lanes) takes table[p] per key. Either way a row's bias
// of a key depends only on its bias query and the key's position, summed in one fixed order per path, so a
// row's result still depends only on its query and its context (chunked prefill and prefix-cache hits give
// the cold run's bits).
//
// Included by kernels_impl.h inside its ISA namespace.
#pragma once

namespace {

// s[jj] += bias of row (t, qh) for the keys at positions j0 + jj, jj < n: one row's tile of scores.
inline void add_key_bias(const AttnArgs& a, int64_t t, int qh, int j0, int n, float* s) {
  if (!a.bias_q) return;
  const float* x = a.bias_q + t * a.sbq_n + qh * a.sbq_h;
  const int h = a.bias_half;
  alignas(64) float w[2 * kMaxBiasHalf];
  for (int g0 = 0; g0 < n; g0 += 16) {
    const float* tb = a.bias_table + static_cast<int64_t>(j0 + g0) * a.head_dim;
    int i0 = 0;
#if KVQ_AVX512
    for (; i0 + 16 <= h; i0 += 16) {
      const __m512 A = _mm512_loadu_ps(x + i0), B = _mm512_loadu_ps(x + h + i0);
      const __m512 c = _mm512_loadu_ps(tb + i0), sn = _mm512_loadu_ps(tb + h + i0);
      _mm512_storeu_ps(w + i0, _mm512_fmadd_ps(B, sn, _mm512_mul_ps(A, c)));  // h need not be a multiple of 16
      _mm512_storeu_ps(w + h + i0, _mm512_fnmadd_ps(A, sn, _mm512_mul_ps(B, c)));
    }
#elif KVQ_AVX2
    for (; i0 + 8 <= h; i0 += 8) {
      const __m256 A = _mm256_loadu_ps(x + i0), B = _mm256_loadu_ps(x + h + i0);
      const __m256 c = _mm256_loadu_ps(tb + i0), sn = _mm256_loadu_ps(tb + h + i0);
      _mm256_storeu_ps(w + i0, _mm256_fmadd_ps(B, sn, _mm256_mul_ps(A, c)));
      _mm256_storeu_ps(w + h + i0, _mm256_fnmadd_ps(A, sn, _mm256_mul_ps(B, c)));
    }
#endif
    for (int i = i0; i < h; ++i) {
      const float A = x[i], B = x[h + i], c = tb[i], sn = tb[h + i];
      w[i] = A * c + B * sn;
      w[h + i] = B * c - A * sn;
    }
    const int m = n - g0 < 16 ? n - g0 : 16;
#if KVQ_AVX512
    // four independent chains (a single one would wait on each FMA's latency), summed in a fixed order
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const int d2 = 2 * h;
    int i = 0;
    for (; i + 4 <= d2; i += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u)
        acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(w[i + u]), _mm512_load_ps(a.bias_et + (i + u) * 16), acc[u]);
    }
    for (; i < d2; ++i) acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(w[i]), _mm512_load_ps(a.bias_et + i * 16), acc[0]);
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    const __mmask16 k = static_cast<__mmask16>((1u << m) - 1u);
    float* out = s + g0;
    _mm512_mask_storeu_ps(out, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, out), sum));
#elif KVQ_AVX2
    // the 16 lanes as two halves, four chains each (i mod 4), summed in a fixed order
    __m256 lo[4], hi[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) lo[u] = hi[u] = _mm256_setzero_ps();
    const int d2 = 2 * h;
    int i = 0;
    for (; i + 4 <= d2; i += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m256 wb = _mm256_set1_ps(w[i + u]);
        lo[u] = _mm256_fmadd_ps(wb, _mm256_load_ps(a.bias_et + (i + u) * 16), lo[u]);
        hi[u] = _mm256_fmadd_ps(wb, _mm256_load_ps(a.bias_et + (i + u) * 16 + 8), hi[u]);
      }
    }
    for (; i < d2; ++i) {
      const __m256 wb = _mm256_set1_ps(w[i]);
      lo[0] = _mm256_fmadd_ps(wb, _mm256_load_ps(a.bias_et + i * 16), lo[0]);
      hi[0] = _mm256_fmadd_ps(wb, _mm256_load_ps(a.bias_et + i * 16 + 8), hi[0]);
    }
    alignas(32) float sum[16];
    _mm256_store_ps(sum, _mm256_add_ps(_mm256_add_ps(lo[0], lo[1]), _mm256_add_ps(lo[2], lo[3])));
    _mm256_store_ps(sum + 8, _mm256_add_ps(_mm256_add_ps(hi[0], hi[1]), _mm256_add_ps(hi[2], hi[3])));
    for (int r = 0; r < m; ++r) s[g0 + r] += sum[r];
#else
    float acc[16] = {0.f};
    for (int i = 0; i < 2 * h; ++i)
      for (int r = 0; r < 16; ++r) acc[r] += w[i] * a.bias_et[i * 16 + r];
    for (int r = 0; r < m; ++r) s[g0 + r] += acc[r];
#endif
  }
}

#if KVQ_AVX512
// Lane-major form: out[lanes] = bias of the key at position p for every lane, bqt (D, lanes: ls apart,
// nr <= 4 vectors) holding the lanes' bias queries transposed (zero in padding lanes). Each lane sums over
// d = 0, 1, ... in order; the NR vectors' chains interleave.
template <int NR>
inline void lane_key_bias_n(const float* y, int d, const float* bqt, int64_t ls, float* out) {
  __m512 acc[NR];
#pragma GCC unroll 4
  for (int v = 0; v < NR; ++v) acc[v] = _mm512_setzero_ps();
  for (int i = 0; i < d; ++i) {
    const __m512 yb = _mm512_set1_ps(y[i]);
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) acc[v] = _mm512_fmadd_ps(yb, _mm512_load_ps(bqt + i * ls + 16 * v), acc[v]);
  }
#pragma GCC unroll 4
  for (int v = 0; v < NR; ++v) _mm512_store_ps(out + 16 * v, acc[v]);
}

inline void lane_key_bias(const AttnArgs& a, int nr, const float* bqt, int64_t ls, int p, float* out) {
  const float* y = a.bias_table + static_cast<int64_t>(p) * a.head_dim;
  const int d = 2 * a.bias_half;  // the table is zero past the rotary channels
  switch (nr) {
    case 1: lane_key_bias_n<1>(y, d, bqt, ls, out); break;
    case 2: lane_key_bias_n<2>(y, d, bqt, ls, out); break;
    case 3: lane_key_bias_n<3>(y, d, bqt, ls, out); break;
    default: lane_key_bias_n<4>(y, d, bqt, ls, out); break;
  }
}
#endif

}  // namespace

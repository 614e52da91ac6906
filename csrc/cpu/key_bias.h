// Position-aware key centring (vllm_kvq/key_centre.py) in the CPU kernels. The cache holds each key minus the
// key mean turned to its 16-position chunk, so query row (token t, query head qh) adds
//     bias(t, qh, c) = bias_q[t, qh] . table[c]      (natural-log units: bias_q carries the softmax scale)
// to its score of every key at a position p with p / 16 == c, sink records included (AttnArgs::bias_q null:
// no centring). The bias is one dot product per (row, chunk), never per key. It depends only on the row's
// bias query and the chunk, summed in one fixed order per ISA, so a row's result still depends only on its
// query and its context (chunked prefill and prefix-cache hits give the cold run's bits).
//
// Included by kernels_impl.h inside its ISA namespace; the AVX-512 build has a lane-major form for the
// prefill kernel (prefill_avx512.h), whose rows sit in vector lanes.
#pragma once

namespace {

constexpr int kBiasChunk = 16;  // positions per table row (key_centre.CHUNK)

// bias_q[t, qh] . table[c]
inline float chunk_bias(const AttnArgs& a, int64_t t, int qh, int c) {
  const float* x = a.bias_q + t * a.sbq_n + qh * a.sbq_h;
  const float* y = a.bias_table + static_cast<int64_t>(c) * a.head_dim;
#if KVQ_AVX512
  __m512 acc = _mm512_setzero_ps();
  for (int i = 0; i < a.head_dim; i += 16) {  // head_dim % 16 == 0 in this build (supports())
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
#else
  float s = 0.f;
  for (int i = 0; i < a.head_dim; ++i) s += x[i] * y[i];
  return s;
#endif
}

// s[jj] += bias of row (t, qh) for the keys at positions j0 + jj, jj < n: one row's tile of scores.
inline void add_key_bias(const AttnArgs& a, int64_t t, int qh, int j0, int n, float* s) {
  if (!a.bias_q) return;
  for (int j = j0; j < j0 + n;) {
    const int c = j / kBiasChunk;
    const int e = (c + 1) * kBiasChunk < j0 + n ? (c + 1) * kBiasChunk : j0 + n;
    const float b = chunk_bias(a, t, qh, c);
    for (; j < e; ++j) s[j - j0] += b;
  }
}

#if KVQ_AVX512
// Lane-major form: out[lanes] = bias of chunk c for every lane, bqt (D, lanes: ls apart, nr <= 4 vectors)
// holding the lanes' bias queries transposed (zero in padding lanes). Each lane sums over d = 0, 1, ... in
// order; the NR vectors' chains interleave.
template <int NR>
inline void lane_chunk_bias_n(const float* y, int d, const float* bqt, int64_t ls, float* out) {
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

inline void lane_chunk_bias(const AttnArgs& a, int nr, const float* bqt, int64_t ls, int c, float* out) {
  const float* y = a.bias_table + static_cast<int64_t>(c) * a.head_dim;
  switch (nr) {
    case 1: lane_chunk_bias_n<1>(y, a.head_dim, bqt, ls, out); break;
    case 2: lane_chunk_bias_n<2>(y, a.head_dim, bqt, ls, out); break;
    case 3: lane_chunk_bias_n<3>(y, a.head_dim, bqt, ls, out); break;
    default: lane_chunk_bias_n<4>(y, a.head_dim, bqt, ls, out); break;
  }
}
#endif

}  // namespace

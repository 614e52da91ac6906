// The CPU kernels, compiled once per ISA: kernels_avx512.cpp defines KVQ_AVX512 1 under an AVX-512 target
// pragma, kernels_portable.cpp compiles the same code as plain C++. KVQ_ISA names the namespace.
//
// Attention works on tiles of kTile context tokens: a tile's K codes are decoded once into a float32 tile
// in the key codec's rotated domain, every query row of the work item (the G query heads of one KV head,
// times up to a chunk of query tokens in prefill) takes its scores from it, the online softmax updates,
// the tile's V codes are decoded once and accumulated in the value codec's rotated domain. Queries are
// rotated once per item and outputs rotated back once per row. Everything here has internal linkage
// (anonymous namespace or the ISA namespace), so the two builds never share a symbol.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../common/codec.h"
#include "kernels.h"

#if KVQ_AVX512
#include <immintrin.h>
#endif

namespace kvq {
namespace cpu {
namespace KVQ_ISA {
namespace {

constexpr int kTile = 32;  // context tokens decoded per tile (a multiple of 16)

// Per-thread scratch, grown on demand and kept (vLLM's worker threads live as long as the engine).
struct Scratch {
  void* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  void* get(size_t bytes) {
    if (bytes > cap) {
      std::free(p);
      cap = bytes + 4096;
      p = std::aligned_alloc(64, (cap + 63) / 64 * 64);
      std::memset(p, 0, cap);  // tile rows past a tile's valid tokens are read (never used): keep them finite
    }
    return p;
  }
};

thread_local Scratch tls_scratch;

inline float load_elem(const void* p, int64_t i, int dtype) {
  if (dtype == kF32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kF16 ? f16_to_f32(h) : bf16_to_f32(h);
}

inline void store_elem(void* p, int64_t i, int dtype, float v) {
  if (dtype == kF32)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = dtype == kF16 ? f32_to_f16(v) : f32_to_bf16(v);
}

inline int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

// ------------------------------------------------------------------------------------------ row decode

#if KVQ_AVX512

// What the SIMD row decoder does for one codec, decided once per call.
struct RowDecoder {
  const CodecDesc* c;
  int mode;  // 0 scalar, 1 TurboQuant 16-lane lookups, 2 uniform, 3 bf16, 4 fp16
  __m512 cb0, cb1;
  __m512i sh0, sh0a, sh0b, msk0, sh1, sh1a, sh1b, msk1;
};

inline void shifts_for(int b, __m512i* sh, __m512i* sha, __m512i* shb, __m512i* msk) {
  alignas(64) int32_t s[16], a[16], bb[16];
  for (int j = 0; j < 16; ++j) {
    s[j] = j * b;
    a[j] = 32 - j * b;  // negative counts become huge unsigned ones: the variable shifts then give 0
    bb[j] = j * b - 32;
  }
  *sh = _mm512_load_si512(s);
  *sha = _mm512_load_si512(a);
  *shb = _mm512_load_si512(bb);
  *msk = _mm512_set1_epi32((1 << b) - 1);
}

inline __m512 load_codebook(const float* cent, int b) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (1 << b)) - 1u), cent);
}

RowDecoder make_decoder(const CodecDesc& c) {
  RowDecoder r;
  std::memset(static_cast<void*>(&r), 0, sizeof(r));
  r.c = &c;
  if (c.kind == kTurboQuant) {
    const bool ok = c.b0 <= 4 && c.b1 <= 4 && c.n0 % 16 == 0 && (c.dim - c.n0) % 16 == 0;
    if (ok) {
      r.mode = 1;
      r.cb0 = load_codebook(c.cent0, c.b0);
      r.cb1 = load_codebook(c.cent1, c.b1);
      shifts_for(c.b0, &r.sh0, &r.sh0a, &r.sh0b, &r.msk0);
      shifts_for(c.b1, &r.sh1, &r.sh1a, &r.sh1b, &r.msk1);
    }
  } else if (c.kind == kUniform) {
    if ((c.b0 <= 4 || c.b0 == 8) && c.gs % 16 == 0) {
      r.mode = 2;
      if (c.b0 <= 4) shifts_for(c.b0, &r.sh0, &r.sh0a, &r.sh0b, &r.msk0);
    }
  } else {
    r.mode = c.kind == kBF16 ? 3 : 4;
  }
  return r;
}

// 16 codes of b <= 4 bits starting at byte p (2b bytes): a masked load never reads past them.
inline __m512i unpack16(const uint8_t* p, int b, __m512i sh, __m512i sha, __m512i shb, __m512i msk) {
  const __m128i raw = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << (2 * b)) - 1u), p);
  const uint64_t w = static_cast<uint64_t>(_mm_cvtsi128_si64(raw));
  const __m512i lo = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(w)));
  const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(w >> 32)));
  const __m512i c = _mm512_or_si512(_mm512_or_si512(_mm512_srlv_epi32(lo, sh), _mm512_sllv_epi32(hi, sha)),
                                    _mm512_srlv_epi32(hi, shb));
  return _mm512_and_si512(c, msk);
}

inline void decode_row(const RowDecoder& r, const uint8_t* row, float* y) {
  const CodecDesc& c = *r.c;
  const int d = c.dim;
  switch (r.mode) {
    case 1: {
      const __m512 s = _mm512_set1_ps(tq_scale(c, row));
      const int c0 = c.n0 / 16;
      for (int ch = 0; ch < c0; ++ch) {
        const __m512i idx = unpack16(row + 2 * c.b0 * ch, c.b0, r.sh0, r.sh0a, r.sh0b, r.msk0);
        _mm512_store_ps(y + 16 * ch, _mm512_mul_ps(_mm512_permutexvar_ps(idx, r.cb0), s));
      }
      for (int ch = 0; ch < (d - c.n0) / 16; ++ch) {
        const __m512i idx = unpack16(row + c.seg1 + 2 * c.b1 * ch, c.b1, r.sh1, r.sh1a, r.sh1b, r.msk1);
        _mm512_store_ps(y + c.n0 + 16 * ch, _mm512_mul_ps(_mm512_permutexvar_ps(idx, r.cb1), s));
      }
      return;
    }
    case 2: {
      for (int ch = 0; ch < d / 16; ++ch) {
        const uint8_t* m = row + c.meta + 4 * ((16 * ch) / c.gs);
        const __m512 s = _mm512_set1_ps(f16_to_f32(static_cast<uint16_t>(m[0] | (m[1] << 8))));
        const __m512 mn = _mm512_set1_ps(f16_to_f32(static_cast<uint16_t>(m[2] | (m[3] << 8))));
        const __m512i q = c.b0 == 8 ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * ch)))
                                    : unpack16(row + 2 * c.b0 * ch, c.b0, r.sh0, r.sh0a, r.sh0b, r.msk0);
        // multiply then add, as the reference does (no fused rounding)
        _mm512_store_ps(y + 16 * ch, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), s), mn));
      }
      return;
    }
    case 3:
      for (int ch = 0; ch < d / 16; ++ch) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * ch));
        _mm512_store_ps(y + 16 * ch, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
      }
      return;
    case 4:
      for (int ch = 0; ch < d / 16; ++ch)
        _mm512_store_ps(y + 16 * ch, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * ch))));
      return;
    default:
      decode_rotated_scalar(c, row, y);
  }
}

// exp for attention weights: Cody-Waite reduction to |f| <= ln2/2 and a degree-6 polynomial (relative
// error ~2e-7, near float rounding); inputs below -87 give 0.
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), p, n);
}

// Sum of each of 16 vectors. Lane i of the result is the sum of v[(i % 4) * 4 + i / 4]; that map is its
// own inverse, so callers put token t's accumulator at index kHsumOrder[t] to get tokens in lane order.
constexpr int kHsumOrder[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

inline __m512 hsum16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int k = 0; k < 8; ++k)
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
  for (int k = 0; k < 4; ++k)
    x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; ++k)
    y[k] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * k], x[2 * k + 1], 0x44), _mm512_shuffle_ps(x[2 * k], x[2 * k + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// s[jj] = q . kt[jj] for jj < kTile (rows past the valid ones are computed and masked by the caller).
inline void tile_scores(const float* q, const float* kt, int d, int64_t dp, int nv, float* s) {
  for (int g = 0; g < nv; g += 16) {
    __m512 acc[16];
    for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
    for (int ch = 0; ch < d; ch += 16) {
      const __m512 qv = _mm512_load_ps(q + ch);
      for (int u = 0; u < 16; ++u)
        acc[kHsumOrder[u]] = _mm512_fmadd_ps(qv, _mm512_load_ps(kt + (g + u) * dp + ch), acc[kHsumOrder[u]]);
    }
    _mm512_store_ps(s + g, hsum16(acc));
  }
}

// Online softmax over one row's tile of scores: p = exp(s - m_new) for the nv valid tokens (0 past them),
// returns alpha = exp(m_old - m_new) and updates m, l.
inline float softmax_tile(float* s, int nv, float* m, float* l) {
  float mt = -INFINITY;
  for (int g = 0; g < nv; g += 16) {
    const __mmask16 k = nv - g >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (nv - g)) - 1u);
    mt = std::fmax(mt, _mm512_mask_reduce_max_ps(k, _mm512_load_ps(s + g)));
  }
  const float m_new = std::fmax(*m, mt);
  const float alpha = std::exp(*m - m_new);
  const __m512 mv = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int g = 0; g < kTile; g += 16) {
    const int left = nv - g;
    const __mmask16 k = left >= 16 ? static_cast<__mmask16>(0xffff)
                                   : (left <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << left) - 1u));
    const __m512 p = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(_mm512_load_ps(s + g), mv)));
    _mm512_store_ps(s + g, p);
    sum = _mm512_add_ps(sum, p);
  }
  *l = *l * alpha + _mm512_reduce_add_ps(sum);
  *m = m_new;
  return alpha;
}

// acc = acc * alpha + sum_jj p[jj] vt[jj]
inline void tile_accumulate(float* acc, float alpha, const float* p, const float* vt, int d, int64_t dp, int nv) {
  const __m512 al = _mm512_set1_ps(alpha);
  for (int c0 = 0; c0 < d; c0 += 128) {
    const int nc = (d - c0 < 128 ? d - c0 : 128) / 16;
    __m512 a[8];
    for (int c = 0; c < nc; ++c) a[c] = _mm512_mul_ps(_mm512_load_ps(acc + c0 + 16 * c), al);
    for (int jj = 0; jj < nv; ++jj) {
      const __m512 pv = _mm512_set1_ps(p[jj]);
      const float* v = vt + jj * dp + c0;
      for (int c = 0; c < nc; ++c) a[c] = _mm512_fmadd_ps(pv, _mm512_load_ps(v + 16 * c), a[c]);
    }
    for (int c = 0; c < nc; ++c) _mm512_store_ps(acc + c0 + 16 * c, a[c]);
  }
}

#else  // portable

struct RowDecoder {
  const CodecDesc* c;
};

RowDecoder make_decoder(const CodecDesc& c) { return RowDecoder{&c}; }

inline void decode_row(const RowDecoder& r, const uint8_t* row, float* y) { decode_rotated_scalar(*r.c, row, y); }

inline void tile_scores(const float* q, const float* kt, int d, int64_t dp, int nv, float* s) {
  for (int jj = 0; jj < nv; ++jj) {
    float acc = 0.f;
    for (int i = 0; i < d; ++i) acc += q[i] * kt[jj * dp + i];
    s[jj] = acc;
  }
}

inline float softmax_tile(float* s, int nv, float* m, float* l) {
  float mt = -INFINITY;
  for (int jj = 0; jj < nv; ++jj) mt = std::fmax(mt, s[jj]);
  const float m_new = std::fmax(*m, mt);
  const float alpha = std::exp(*m - m_new);
  float sum = 0.f;
  for (int jj = 0; jj < kTile; ++jj) {
    s[jj] = jj < nv ? std::exp(s[jj] - m_new) : 0.f;
    sum += s[jj];
  }
  *l = *l * alpha + sum;
  *m = m_new;
  return alpha;
}

inline void tile_accumulate(float* acc, float alpha, const float* p, const float* vt, int d, int64_t dp, int nv) {
  for (int i = 0; i < d; ++i) acc[i] *= alpha;
  for (int jj = 0; jj < nv; ++jj)
    for (int i = 0; i < d; ++i) acc[i] += p[jj] * vt[jj * dp + i];
}

#endif

// ---------------------------------------------------------------------------------------------- output

// o_rot (D) -> unrotate with the value codec, + v_shift, written to out row (token t, query head qh).
inline void write_output(const AttnArgs& a, int64_t t, int qh, int kvh, const float* o_rot, float* tmp) {
  const int d = a.head_dim;
  rotate_inverse(a.v.rot, o_rot, tmp);
  const int64_t base = t * a.son + qh * a.soh;
  for (int i = 0; i < d; ++i) {
    const float v = a.v_shift ? tmp[i] + a.v_shift[kvh * d + i] : tmp[i];
    store_elem(a.out, base + i, a.dtype, v);
  }
}

}  // namespace

// ----------------------------------------------------------------------------------------------- store

void store_range(const StoreArgs& a, int64_t begin, int64_t end) {
  const int d = a.k.dim;
  auto* fs = static_cast<float*>(tls_scratch.get(sizeof(float) * 4 * d + d));
  float* x = fs;
  float* work = fs + d;  // 2 * D floats for the codec
  uint8_t* codes = reinterpret_cast<uint8_t*>(fs + 3 * d);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / a.gh;
    const int64_t slot = a.slots[n];
    if (slot < 0) continue;
    const int h = a.heads[i % a.gh];
    uint8_t* row = a.cache + (slot / a.block_size) * a.sB + h * a.sH + (slot % a.block_size) * a.sT;
    const int64_t kb = n * a.skn + h * a.skh;
    for (int j = 0; j < d; ++j) {
      float v = load_elem(a.key, kb + j, a.dtype);
      if (a.k_shift) v = v - a.k_shift[h * d + j];
      if (a.k_scale) v = v / a.k_scale[h * d + j];
      x[j] = v;
    }
    encode_vector(a.k, x, row, a.sC, work, codes);
    const int64_t vb = n * a.svn + h * a.svh;
    for (int j = 0; j < d; ++j) {
      const float v = load_elem(a.value, vb + j, a.dtype);
      x[j] = a.v_shift ? v - a.v_shift[h * d + j] : v;
    }
    encode_vector(a.v, x, row + static_cast<int64_t>(a.value_offset) * a.sC, a.sC, work, codes);
    for (int b = a.pad_begin; b < a.slot_bytes; ++b) row[static_cast<int64_t>(b) * a.sC] = 0;
  }
}

// ------------------------------------------------------------------------------------------- attention

bool supports(const CodecDesc& k, const CodecDesc& v, int head_dim) {
#if KVQ_AVX512
  return head_dim % 16 == 0 && k.dim == head_dim && v.dim == head_dim;
#else
  return k.dim == head_dim && v.dim == head_dim;
#endif
}

void attend_item(const AttnArgs& a, const WorkItem& w) {
  const int d = a.head_dim, g = a.group;
  const int s = w.seq;
  const int h = a.heads[w.hslot];
  const int len = a.seq_lens[s];
  const int q_start = a.qsl[s];
  const int ql = a.qsl[s + 1] - q_start;
  const int nq = w.q1 - w.q0;
  const int rows = nq * g;
  const int first_pos = len - ql + (w.q0 - q_start);
  const int c_end = w.c1 < first_pos + nq ? w.c1 : first_pos + nq;
  const int64_t dp = align16(d);
  const int64_t span = a.value_offset + a.v.nbytes;  // slot bytes attention reads
  const bool packed = a.sC == 1;

  // Scratch layout (floats): Q rows, acc rows, K tile, V tile, scores, m, l, tmp (2 D), then slot copies.
  const size_t nf = static_cast<size_t>(rows) * dp * 2 + 2 * kTile * dp + static_cast<size_t>(rows) * kTile +
                    2 * align16(rows) + 2 * dp;
  auto* base = static_cast<float*>(tls_scratch.get(sizeof(float) * nf + kTile * (align16(span) + 64)));
  float* qr = base;
  float* acc = qr + rows * dp;
  float* kt = acc + rows * dp;
  float* vt = kt + kTile * dp;
  float* sc = vt + kTile * dp;
  float* mrow = sc + rows * kTile;
  float* lrow = mrow + align16(rows);
  float* tmp = lrow + align16(rows);
  uint8_t* copies = reinterpret_cast<uint8_t*>(base + nf);
  const uint8_t* ptrs[kTile];

  for (int qi = 0; qi < nq; ++qi) {
    for (int gi = 0; gi < g; ++gi) {
      const int r = qi * g + gi;
      const int64_t qb = static_cast<int64_t>(w.q0 + qi) * a.sqn + static_cast<int64_t>(h * g + gi) * a.sqh;
      for (int i = 0; i < d; ++i) {
        const float v = load_elem(a.query, qb + i, a.dtype);
        tmp[i] = a.k_scale ? v * a.k_scale[h * d + i] : v;
      }
      float* q = qr + r * dp;
      rotate_apply(a.k.rot, tmp, q);
      for (int i = 0; i < d; ++i) q[i] *= a.scale;
      mrow[r] = -INFINITY;
      lrow[r] = 0.f;
      std::memset(acc + r * dp, 0, sizeof(float) * dp);
    }
  }

  const RowDecoder kd = make_decoder(a.k), vd = make_decoder(a.v);
  for (int j0 = w.c0; j0 < c_end; j0 += kTile) {
    const int n = c_end - j0 < kTile ? c_end - j0 : kTile;
    for (int jj = 0; jj < n; ++jj) {
      const int j = j0 + jj;
      const int64_t blk = a.block_table[static_cast<int64_t>(s) * a.sbt + j / a.block_size];
      const uint8_t* p = a.cache + blk * a.sB + static_cast<int64_t>(h) * a.sH + static_cast<int64_t>(j % a.block_size) * a.sT;
      if (!packed) {  // strided slot bytes: gather the slot into a contiguous copy first
        uint8_t* c = copies + jj * (align16(span) + 64);
        for (int64_t b = 0; b < span; ++b) c[b] = p[b * a.sC];
        p = c;
      }
      ptrs[jj] = p;
      decode_row(kd, p, kt + jj * dp);
    }
    for (int qi = 0; qi < nq; ++qi) {
      const int nv = first_pos + qi - j0 + 1 < n ? first_pos + qi - j0 + 1 : n;  // causal: keys j <= position
      for (int gi = 0; gi < g; ++gi) {
        const int r = qi * g + gi;
        if (nv > 0) tile_scores(qr + r * dp, kt, d, dp, nv, sc + r * kTile);
      }
    }
    for (int jj = 0; jj < n; ++jj) decode_row(vd, ptrs[jj] + a.value_offset, vt + jj * dp);
    for (int qi = 0; qi < nq; ++qi) {
      const int nv = first_pos + qi - j0 + 1 < n ? first_pos + qi - j0 + 1 : n;
      if (nv <= 0) continue;
      for (int gi = 0; gi < g; ++gi) {
        const int r = qi * g + gi;
        const float alpha = softmax_tile(sc + r * kTile, nv, mrow + r, lrow + r);
        tile_accumulate(acc + r * dp, alpha, sc + r * kTile, vt, d, dp, nv);
      }
    }
  }

  for (int qi = 0; qi < nq; ++qi) {
    const int64_t t = w.q0 + qi;
    for (int gi = 0; gi < g; ++gi) {
      const int r = qi * g + gi;
      const int qh = h * g + gi;
      if (w.split >= 0) {
        const int64_t at = (static_cast<int64_t>(w.split) * a.num_tokens + t) * a.num_q_heads + qh;
        std::memcpy(a.partial + at * d, acc + r * dp, sizeof(float) * d);
        a.ml[2 * at] = mrow[r];
        a.ml[2 * at + 1] = lrow[r];
        continue;
      }
      const float inv = 1.f / (lrow[r] > 1e-30f ? lrow[r] : 1e-30f);
      float* o = acc + r * dp;
      for (int i = 0; i < d; ++i) o[i] = o[i] * inv;
      write_output(a, t, qh, h, o, tmp);
    }
  }
}

void merge_splits(const AttnArgs& a, int splits, const int32_t* tok_rows, int64_t begin, int64_t end) {
  const int d = a.head_dim, g = a.group;
  auto* f = static_cast<float*>(tls_scratch.get(sizeof(float) * 3 * align16(d)));
  float* o = f;
  float* tmp = f + align16(d);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = tok_rows[i / (a.gh * g)];
    const int rest = static_cast<int>(i % (a.gh * g));
    const int h = a.heads[rest / g];
    const int qh = h * g + rest % g;
    float mx = -INFINITY;
    for (int sp = 0; sp < splits; ++sp)
      mx = std::fmax(mx, a.ml[2 * ((static_cast<int64_t>(sp) * a.num_tokens + t) * a.num_q_heads + qh)]);
    for (int k = 0; k < d; ++k) o[k] = 0.f;
    float l = 0.f;
    for (int sp = 0; sp < splits; ++sp) {
      const int64_t at = (static_cast<int64_t>(sp) * a.num_tokens + t) * a.num_q_heads + qh;
      const float m = a.ml[2 * at];
      if (m == -INFINITY) continue;
      const float wgt = std::exp(m - mx);
      l += wgt * a.ml[2 * at + 1];
      const float* p = a.partial + at * d;
      for (int k = 0; k < d; ++k) o[k] += wgt * p[k];
    }
    const float inv = 1.f / (l > 1e-30f ? l : 1e-30f);
    for (int k = 0; k < d; ++k) o[k] *= inv;
    write_output(a, t, qh, h, o, tmp);
  }
}

}  // namespace KVQ_ISA
}  // namespace cpu
}  // namespace kvq

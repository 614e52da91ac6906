// The CPU kernels, compiled once per ISA: kernels_avx512.cpp defines KVQ_AVX512 1 under an AVX-512 target
// pragma, kernels_avx2.cpp KVQ_AVX2 1 under an AVX2 + FMA + F16C one (8-wide tile loops), kernels_portable.cpp
// compiles the same code as plain C++. KVQ_ISA names the namespace.
//
// Attention works on tiles of kTile context tokens: a tile's K codes are decoded once into a float32 tile
// in the key codec's rotated domain, every query row of the work item (the G query heads of one KV head,
// times up to a chunk of query tokens in prefill) takes its scores from it, the online softmax updates,
// the tile's V codes are decoded once and accumulated in the value codec's rotated domain (the SIMD builds'
// decode items over TurboQuant codes of <= 4 bits skip the float tiles: decode_fused.h, same bits). Queries are
// rotated once per item and outputs rotated back once per row. Everything here has internal linkage
// (anonymous namespace or the ISA namespace), so the two builds never share a symbol.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../common/codec.h"
#include "kernels.h"

#if KVQ_AVX512 || KVQ_AVX2
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

// FibQuant rows into a tile, for every build: M = D / K block indices of L bits, 8 at a time (8 indices of L
// bits are exactly L bytes, assembled in registers: a wide load could leave the cache's last slot), each
// copying its K-float codeword (one 8- or 16-byte move for K = 2 / 4) into the row. The row's fp16 scale
// goes to scales[jj] (applied to a tile's scores or weights at once, like TurboQuant's), not into the row.
template <int L>
inline uint64_t fib_le_bytes(const uint8_t* p) {
  uint64_t v = 0;
  int at = 0;
  if (L - at >= 4) {
    uint32_t x;
    std::memcpy(&x, p + at, 4);
    v |= static_cast<uint64_t>(x) << (8 * at);
    at += 4;
  }
  if (L - at >= 2) {
    uint16_t x;
    std::memcpy(&x, p + at, 2);
    v |= static_cast<uint64_t>(x) << (8 * at);
    at += 2;
  }
  if (L - at >= 2) {
    uint16_t x;
    std::memcpy(&x, p + at, 2);
    v |= static_cast<uint64_t>(x) << (8 * at);
    at += 2;
  }
  if (L - at >= 1) v |= static_cast<uint64_t>(p[at]) << (8 * at);
  return v;
}

template <int K, int L>
inline void fib_tile_kl(const CodecDesc& c, const uint8_t* const* ptrs, int n, int offset, float* out, int64_t dp,
                        float* scales) {
  constexpr uint64_t mask = (uint64_t{1} << L) - 1;
  const int m = c.dim / K, m8 = m / 8 * 8;
  const float* words = c.cent0;
  for (int jj = 0; jj < n; ++jj) {
    const uint8_t* row = ptrs[jj] + offset;
    float* y = out + jj * dp;
    int j = 0;
    for (const uint8_t* p = row; j < m8; j += 8, p += L) {
      const uint64_t w = fib_le_bytes<L>(p);
      for (int i = 0; i < 8; ++i)
        std::memcpy(y + (j + i) * K, words + ((w >> (i * L)) & mask) * K, sizeof(float) * K);
    }
    for (; j < m; ++j) std::memcpy(y + j * K, words + fib_index(row, j, L) * K, sizeof(float) * K);
    scales[jj] = fib_row_scale(c, row);
  }
}

template <int K>
inline bool fib_tile_k(const CodecDesc& c, const uint8_t* const* ptrs, int n, int offset, float* out, int64_t dp,
                       float* scales) {
  switch (c.b0) {
    case 2: fib_tile_kl<K, 2>(c, ptrs, n, offset, out, dp, scales); return true;
    case 3: fib_tile_kl<K, 3>(c, ptrs, n, offset, out, dp, scales); return true;
    case 4: fib_tile_kl<K, 4>(c, ptrs, n, offset, out, dp, scales); return true;
    case 5: fib_tile_kl<K, 5>(c, ptrs, n, offset, out, dp, scales); return true;
    case 6: fib_tile_kl<K, 6>(c, ptrs, n, offset, out, dp, scales); return true;
    case 7: fib_tile_kl<K, 7>(c, ptrs, n, offset, out, dp, scales); return true;
    case 8: fib_tile_kl<K, 8>(c, ptrs, n, offset, out, dp, scales); return true;
    default: return false;
  }
}

// The FibQuant tile when its block size and index width have one (K in 1, 2, 4, 8; 2 to 8 index bits: every
// preset), else false (the caller decodes row by row).
inline bool fib_tile(const CodecDesc& c, const uint8_t* const* ptrs, int n, int offset, float* out, int64_t dp,
                     float* scales) {
  switch (c.n0) {
    case 1: return fib_tile_k<1>(c, ptrs, n, offset, out, dp, scales);
    case 2: return fib_tile_k<2>(c, ptrs, n, offset, out, dp, scales);
    case 4: return fib_tile_k<4>(c, ptrs, n, offset, out, dp, scales);
    case 8: return fib_tile_k<8>(c, ptrs, n, offset, out, dp, scales);
    default: return false;
  }
}

#if KVQ_AVX512

// What the SIMD row decoder does for one codec, decided once per call. Codes are unpacked 64 at a time to
// bytes with VBMI (a byte permute puts the b bytes holding codes 8k..8k+7 into qword k, a multishift pulls
// each code's bit field out), widened 16 at a time and looked up in a codebook held in registers.
struct Segment {
  int start, n, b, byte0;  // coordinates [start, start + n) at b bits, packed from byte byte0
  int ngroups;             // groups of up to 64 codes
  __mmask64 lmask[8];      // bytes to load per group (never past the segment)
  int nch[8];              // 16-coordinate chunks per group
  __m512i perm, shift, mask;
  __m512 cb0, cb1;  // codebook entries 0..15 and 16..31
  const float* cent;
};

struct RowDecoder {
  const CodecDesc* c;
  int mode;  // 0 scalar, 1 TurboQuant (unscaled centroids; the row scale is returned), 2 uniform, 3 bf16, 4 fp16
  int nseg;
  Segment seg[2];
};

inline Segment make_segment(int start, int n, int b, int byte0, const float* cent) {
  Segment g;
  std::memset(static_cast<void*>(&g), 0, sizeof(g));
  alignas(64) uint8_t perm[64], shift[64];
  for (int k = 0; k < 8; ++k)
    for (int j = 0; j < 8; ++j) {
      perm[8 * k + j] = static_cast<uint8_t>(k * b + j);
      shift[8 * k + j] = static_cast<uint8_t>(j * b);
    }
  g.start = start;
  g.n = n;
  g.b = b;
  g.byte0 = byte0;
  g.ngroups = (n + 63) / 64;
  for (int gi = 0; gi < g.ngroups && gi < 8; ++gi) {
    const int codes = n - 64 * gi < 64 ? n - 64 * gi : 64;
    const int bytes = codes * b / 8;
    g.lmask[gi] = bytes >= 64 ? ~static_cast<__mmask64>(0) : (static_cast<__mmask64>(1) << bytes) - 1;
    g.nch[gi] = codes / 16;
  }
  g.perm = _mm512_load_si512(perm);
  g.shift = _mm512_load_si512(shift);
  g.mask = _mm512_set1_epi8(static_cast<char>((1 << b) - 1));
  g.cb0 = g.cb1 = _mm512_setzero_ps();
  g.cent = cent;
  if (cent) {
    const int w = 1 << b;
    g.cb0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(w >= 16 ? 0xffffu : (1u << w) - 1u), cent);
    if (w > 16) g.cb1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(w >= 32 ? 0xffffu : (1u << (w - 16)) - 1u), cent + 16);
  }
  return g;
}

RowDecoder make_decoder(const CodecDesc& c) {
  RowDecoder r;
  std::memset(static_cast<void*>(&r), 0, sizeof(r));
  r.c = &c;
  const bool fits = c.dim <= 512;  // 8 groups of 64 codes per segment
  if (c.kind == kTurboQuant) {
    if (fits && c.n0 % 16 == 0 && (c.dim - c.n0) % 16 == 0) {
      r.mode = 1;
      r.nseg = c.n0 < c.dim ? 2 : 1;
      r.seg[0] = make_segment(0, c.n0, c.b0, 0, c.cent0);
      if (r.nseg == 2) r.seg[1] = make_segment(c.n0, c.dim - c.n0, c.b1, c.seg1, c.cent1);
    }
  } else if (c.kind == kUniform) {
    if (fits && c.gs % 16 == 0) {
      r.mode = 2;
      r.nseg = 1;
      r.seg[0] = make_segment(0, c.dim, c.b0, 0, nullptr);
    }
  } else if (c.kind == kBF16 || c.kind == kFP16) {
    r.mode = c.kind == kBF16 ? 3 : 4;
  }
  return r;
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// Codebook lookup of 16 codes: a register permute for up to 32 entries, a gather beyond.
template <int B>
inline __m512 lookup(const Segment& g, __m512i idx) {
  if (B <= 4) return _mm512_permutexvar_ps(idx, g.cb0);
  if (B == 5) return _mm512_permutex2var_ps(g.cb0, idx, g.cb1);
  return _mm512_i32gather_ps(idx, g.cent, 4);
}

// Values of one segment of every row of a tile: TurboQuant centroids (MODE 1) or uniform q * scale + min
// (MODE 2), rows ptrs[jj] + offset written to out + jj * dp.
template <int B, int MODE>
inline void decode_segment_tile(const Segment& g, const CodecDesc& c, const uint8_t* const* ptrs, int n, int offset,
                                float* out, int64_t dp) {
  const __m512i perm = g.perm, shift = g.shift, mask = g.mask;
  for (int jj = 0; jj < n; ++jj) {
    const uint8_t* row = ptrs[jj] + offset;
    for (int gi = 0; gi < g.ngroups; ++gi) {
      __m512i x = _mm512_maskz_loadu_epi8(g.lmask[gi], row + g.byte0 + 8 * B * gi);
      x = _mm512_and_si512(_mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(perm, x)), mask);
      float* y = out + jj * dp + g.start + 64 * gi;
      const int nch = g.nch[gi];
      auto emit = [&](__m128i codes, int ch) {
        const __m512i idx = _mm512_cvtepu8_epi32(codes);
        if (MODE == 1) {
          _mm512_store_ps(y + 16 * ch, lookup<B>(g, idx));
        } else {
          const uint8_t* m = row + c.meta + 4 * ((g.start + 64 * gi + 16 * ch) / c.gs);
          // multiply then add, as the reference does (no fused rounding)
          _mm512_store_ps(y + 16 * ch, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(idx), _mm512_set1_ps(half_at(m))),
                                                     _mm512_set1_ps(half_at(m + 2))));
        }
      };
      emit(_mm512_castsi512_si128(x), 0);
      if (nch > 1) emit(_mm512_extracti32x4_epi32(x, 1), 1);
      if (nch > 2) emit(_mm512_extracti32x4_epi32(x, 2), 2);
      if (nch > 3) emit(_mm512_extracti32x4_epi32(x, 3), 3);
    }
  }
}

template <int MODE>
inline void decode_segment_bits(const Segment& g, const CodecDesc& c, const uint8_t* const* ptrs, int n, int offset,
                                float* out, int64_t dp) {
  switch (g.b) {
    case 1: decode_segment_tile<1, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 2: decode_segment_tile<2, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 3: decode_segment_tile<3, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 4: decode_segment_tile<4, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 5: decode_segment_tile<5, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 6: decode_segment_tile<6, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 7: decode_segment_tile<7, MODE>(g, c, ptrs, n, offset, out, dp); break;
    default: decode_segment_tile<8, MODE>(g, c, ptrs, n, offset, out, dp); break;
  }
}

// Decodes the rows at ptrs[jj] + offset (jj < n) into out rows of stride dp (rotated domain) and writes
// the factor each row's values still need into scales[jj]: TurboQuant's scale (applied to a whole tile of
// scores or weights at once), 1 for the other codecs. The mode is dispatched once per tile.
inline void decode_tile(const RowDecoder& r, const uint8_t* const* ptrs, int n, int offset, float* out, int64_t dp,
                        float* scales) {
  const CodecDesc& c = *r.c;
  const int d = c.dim;
  switch (r.mode) {
    case 1:
      for (int si = 0; si < r.nseg; ++si) decode_segment_bits<1>(r.seg[si], c, ptrs, n, offset, out, dp);
      for (int jj = 0; jj < n; ++jj) scales[jj] = half_at(ptrs[jj] + offset + c.meta);
      return;
    case 2:
      decode_segment_bits<2>(r.seg[0], c, ptrs, n, offset, out, dp);
      for (int jj = 0; jj < n; ++jj) scales[jj] = 1.f;
      return;
    case 3:
      for (int jj = 0; jj < n; ++jj) {
        const uint8_t* row = ptrs[jj] + offset;
        for (int ch = 0; ch < d / 16; ++ch) {
          const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * ch));
          _mm512_store_ps(out + jj * dp + 16 * ch, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        }
        scales[jj] = 1.f;
      }
      return;
    case 4:
      for (int jj = 0; jj < n; ++jj) {
        const uint8_t* row = ptrs[jj] + offset;
        for (int ch = 0; ch < d / 16; ++ch)
          _mm512_store_ps(out + jj * dp + 16 * ch,
                          _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * ch))));
        scales[jj] = 1.f;
      }
      return;
    default:
      if (c.kind == kFibQuant && fib_tile(c, ptrs, n, offset, out, dp, scales)) return;
      for (int jj = 0; jj < n; ++jj) {
        decode_rotated_scalar(c, ptrs[jj] + offset, out + jj * dp);
        scales[jj] = 1.f;
      }
  }
}

// s[jj] *= f[jj] for a tile
inline void scale_tile(float* s, const float* f) {
  for (int g = 0; g < kTile; g += 16) _mm512_store_ps(s + g, _mm512_mul_ps(_mm512_load_ps(s + g), _mm512_load_ps(f + g)));
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
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)
    w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xEE));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)
    x[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xDD));
#pragma GCC unroll 2
  for (int k = 0; k < 2; ++k)
    y[k] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * k], x[2 * k + 1], 0x44), _mm512_shuffle_ps(x[2 * k], x[2 * k + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
}

// s[jj] = q . kt[jj] for jj < kTile (rows past the valid ones are computed and masked by the caller).
inline void tile_scores(const float* q, const float* kt, int d, int64_t dp, int nv, float* s) {
  for (int g = 0; g < nv; g += 16) {
    __m512 acc[16];
#pragma GCC unroll 16
    for (int u = 0; u < 16; ++u) acc[u] = _mm512_setzero_ps();
    for (int ch = 0; ch < d; ch += 16) {
      const __m512 qv = _mm512_load_ps(q + ch);
#pragma GCC unroll 16
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

// acc[0 .. 16 NC) = acc * alpha + sum_jj p[jj] vt[jj][0 .. 16 NC): NC is a constant so the accumulators stay
// in registers.
template <int NC>
inline void accumulate_chunks(float* acc, __m512 al, const float* p, const float* vt, int64_t dp, int nv) {
  // Two accumulator sets (even and odd tokens): one chain of dependent FMAs per chunk would wait on the
  // FMA latency, not its throughput.
  __m512 a[NC], b[NC];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) {
    a[c] = _mm512_mul_ps(_mm512_load_ps(acc + 16 * c), al);
    b[c] = _mm512_setzero_ps();
  }
  int jj = 0;
  for (; jj + 1 < nv; jj += 2) {
    const __m512 p0 = _mm512_set1_ps(p[jj]), p1 = _mm512_set1_ps(p[jj + 1]);
    const float* v0 = vt + jj * dp;
    const float* v1 = v0 + dp;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      a[c] = _mm512_fmadd_ps(p0, _mm512_load_ps(v0 + 16 * c), a[c]);
      b[c] = _mm512_fmadd_ps(p1, _mm512_load_ps(v1 + 16 * c), b[c]);
    }
  }
  if (jj < nv) {
    const __m512 p0 = _mm512_set1_ps(p[jj]);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) a[c] = _mm512_fmadd_ps(p0, _mm512_load_ps(vt + jj * dp + 16 * c), a[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) _mm512_store_ps(acc + 16 * c, _mm512_add_ps(a[c], b[c]));
}

// acc = acc * alpha + sum_jj p[jj] vt[jj]
inline void tile_accumulate(float* acc, float alpha, const float* p, const float* vt, int d, int64_t dp, int nv) {
  const __m512 al = _mm512_set1_ps(alpha);
  int c0 = 0;
  for (; d - c0 >= 128; c0 += 128) accumulate_chunks<8>(acc + c0, al, p, vt + c0, dp, nv);
  switch ((d - c0) / 16) {
    case 1: accumulate_chunks<1>(acc + c0, al, p, vt + c0, dp, nv); break;
    case 2: accumulate_chunks<2>(acc + c0, al, p, vt + c0, dp, nv); break;
    case 3: accumulate_chunks<3>(acc + c0, al, p, vt + c0, dp, nv); break;
    case 4: accumulate_chunks<4>(acc + c0, al, p, vt + c0, dp, nv); break;
    case 5: accumulate_chunks<5>(acc + c0, al, p, vt + c0, dp, nv); break;
    case 6: accumulate_chunks<6>(acc + c0, al, p, vt + c0, dp, nv); break;
    case 7: accumulate_chunks<7>(acc + c0, al, p, vt + c0, dp, nv); break;
    default: break;
  }
}

#elif KVQ_AVX2

// The AVX2 + FMA + F16C build's tile loops, 8 floats wide. Codes of b bits are unpacked 8 at a time: a
// 16-byte window of the row holding the b bytes of 8 codes is broadcast to both 128-bit lanes, a byte shuffle
// puts the two bytes at code j's first bit into dword j, a variable shift brings the code to bit 0. The window
// never leaves the codec's row (codes and metadata): near the row's end it is the row's last 16 bytes and
// the shuffle indices move by the difference. Rows under 16 bytes take the two bytes per code from scalar
// loads instead. Codebooks of up to 16 entries are looked up in registers.
struct Segment {
  int start, n, b, byte0;  // coordinates [start, start + n) at b bits, packed from byte byte0
  int nfull;               // codes unpacked 8 at a time (n rounded down to 8); the rest one by one
  int nwin;                // codes whose 16-byte window starts at their own first byte (the rest: at row_end - 16)
  int win_last;            // row bytes - 16 - byte0: where the row's last 16 bytes start, from the segment
  __m256i shuf, shift;     // dword j <- bytes (j b) / 8 and the next; its shift (j b) % 8
  __m256 cb0, cb1;         // codebook entries 0..7 and 8..15
  const float* cent;
};

struct RowDecoder {
  const CodecDesc* c;
  int mode;  // 0 scalar, 1 TurboQuant (unscaled centroids; the row scale is returned), 2 uniform, 3 bf16, 4 fp16
  int nseg;
  Segment seg[2];
};

inline __m256 load_book(const float* cent, int first, int w) {
  alignas(32) float e[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int i = 0; i < 8 && first + i < w; ++i) e[i] = cent[first + i];
  return _mm256_load_ps(e);
}

// row_bytes: the codec's packed bytes (codes, then metadata); the windows stay inside them.
inline Segment make_segment(int start, int n, int b, int byte0, const float* cent, int row_bytes) {
  Segment g;
  std::memset(static_cast<void*>(&g), 0, sizeof(g));
  g.start = start;
  g.n = n;
  g.b = b;
  g.byte0 = byte0;
  g.nfull = n / 8 * 8;
  g.win_last = row_bytes - 16 - byte0;
  // chunk k (codes 8k ..) starts at byte k b of the segment; its window fits from there while k b <= win_last
  g.nwin = g.win_last < 0 ? 0 : (g.win_last / b + 1) * 8;
  if (g.nwin > g.nfull) g.nwin = g.nfull;
  alignas(32) int8_t shuf[32];
  alignas(32) int32_t shift[8];
  for (int j = 0; j < 8; ++j) {
    const int bit = j * b;
    int8_t* d = shuf + 4 * j;  // both 128-bit lanes hold the same window: indices 0..15 in each
    d[0] = static_cast<int8_t>(bit / 8);
    d[1] = static_cast<int8_t>(bit / 8 + 1);  // read only when the code reaches into it (masked off otherwise)
    d[2] = d[3] = static_cast<int8_t>(0x80);   // zero
    shift[j] = bit % 8;
  }
  g.shuf = _mm256_load_si256(reinterpret_cast<const __m256i*>(shuf));
  g.shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(shift));
  g.cent = cent;
  if (cent) {
    g.cb0 = load_book(cent, 0, 1 << b);
    g.cb1 = load_book(cent, 8, 1 << b);
  }
  return g;
}

RowDecoder make_decoder(const CodecDesc& c) {
  RowDecoder r;
  std::memset(static_cast<void*>(&r), 0, sizeof(r));
  r.c = &c;
  if (c.kind == kTurboQuant && c.b0 <= 8 && (c.n0 == c.dim || c.b1 <= 8)) {
    r.mode = 1;
    r.nseg = c.n0 < c.dim ? 2 : 1;
    r.seg[0] = make_segment(0, c.n0, c.b0, 0, c.cent0, c.nbytes);
    if (r.nseg == 2) r.seg[1] = make_segment(c.n0, c.dim - c.n0, c.b1, c.seg1, c.cent1, c.nbytes);
  } else if (c.kind == kUniform && c.b0 <= 8 && c.gs % 8 == 0) {
    r.mode = 2;
    r.nseg = 1;
    r.seg[0] = make_segment(0, c.dim, c.b0, 0, nullptr, c.nbytes);
  } else if (c.kind == kBF16 || c.kind == kFP16) {
    r.mode = c.kind == kBF16 ? 3 : 4;
  }
  return r;
}

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// The B bytes at p as a little-endian integer, from loads of 1, 2, 4 or 8 bytes assembled in registers (a
// memcpy of 3, 5, 6 or 7 bytes goes through the stack, and the wide load that reads it back stalls on store
// forwarding).
template <int N>
inline uint64_t load_n(const uint8_t* p) {
  if (N == 1) return p[0];
  if (N == 2) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
  }
  if (N == 4) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

template <int B>
inline uint64_t load_le(const uint8_t* p) {
  if (B == 1 || B == 2 || B == 4 || B == 8) return load_n<B>(p);
  if (B == 3) return load_n<2>(p) | load_n<1>(p + 2) << 16;
  if (B == 5) return load_n<4>(p) | load_n<1>(p + 4) << 32;
  if (B == 6) return load_n<4>(p) | load_n<2>(p + 4) << 32;
  return load_n<4>(p) | load_n<2>(p + 4) << 32 | load_n<1>(p + 6) << 48;
}

// Codes 0..7 of B bits from the B bytes at p (code j at bits [j B, (j + 1) B)), one per 32-bit lane.
template <int B>
inline __m256i unpack8(const uint8_t* p) {
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
  if (B <= 4) {
    const uint32_t w = static_cast<uint32_t>(load_le<B>(p));
    const __m256i sh = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), sh), mask);
  }
  const uint64_t w = load_le<B>(p);
  const __m256i v = _mm256_set1_epi64x(static_cast<long long>(w));
  const __m256i lo = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, B, 2 * B, 3 * B));
  const __m256i hi = _mm256_srlv_epi64(v, _mm256_setr_epi64x(4 * B, 5 * B, 6 * B, 7 * B));
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);  // each qword's low dword
  return _mm256_and_si256(_mm256_blend_epi32(_mm256_permutevar8x32_epi32(lo, even),
                                             _mm256_permutevar8x32_epi32(hi, even), 0xF0), mask);
}

// Values of one segment of every row of a tile: TurboQuant centroids (MODE 1) or uniform q * scale + min
// (MODE 2), rows ptrs[jj] + offset written to out + jj * dp.
template <int B, int MODE>
inline void decode_segment_tile(const Segment& g, const CodecDesc& c, const uint8_t* const* ptrs, int n, int offset,
                                float* out, int64_t dp) {
  // The segment's fields in locals: the stores below go through float pointers the compiler cannot prove
  // apart from g, and would otherwise reload every field per chunk.
  const __m256i shuf = g.shuf, shift = g.shift, mask = _mm256_set1_epi32((1 << B) - 1);
  const __m256 cb0 = g.cb0, cb1 = g.cb1;
  const int nwin = g.nwin, nfull = g.nfull, nseg = g.n, win_last = g.win_last, start = g.start;
  const bool row_fits = win_last + g.byte0 >= 0;  // the codec's row holds 16 bytes
  const float* cent = g.cent;
  auto window = [&](const uint8_t* w, __m256i ctl) {
    const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(x, ctl), shift), mask);
  };
  auto emit = [&](const uint8_t* row, float* y, int k, __m256i idx) {
    if (MODE == 1) {
      __m256 v;
      if (B <= 3)
        v = _mm256_permutevar8x32_ps(cb0, idx);
      else if (B == 4)
        v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(cb0, idx), _mm256_permutevar8x32_ps(cb1, idx),
                             _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      else
        v = _mm256_i32gather_ps(cent, idx, 4);
      _mm256_storeu_ps(y + k, v);  // a second segment may start off 8
    } else {
      const uint8_t* m = row + c.meta + 4 * ((start + k) / c.gs);
      // multiply then add, as the reference does (no fused rounding)
      _mm256_storeu_ps(y + k, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(idx), _mm256_set1_ps(half_at(m))),
                                            _mm256_set1_ps(half_at(m + 2))));
    }
  };
  for (int jj = 0; jj < n; ++jj) {
    const uint8_t* row = ptrs[jj] + offset;
    const uint8_t* seg = row + g.byte0;
    float* y = out + jj * dp + start;
    int k = 0, at = 0;  // chunk k / 8 starts at byte at = k / 8 * B of the segment
    for (; k < nwin; k += 8, at += B) emit(row, y, k, window(seg + at, shuf));
    if (row_fits) {  // the row's last 16 bytes (before this segment, for a late one), indices moved per chunk
      for (; k < nfull; k += 8, at += B)
        emit(row, y, k, window(seg + win_last, _mm256_add_epi8(shuf, _mm256_set1_epi8(static_cast<char>(at - win_last)))));
    } else {
      for (; k < nfull; k += 8, at += B) emit(row, y, k, unpack8<B>(seg + at));
    }
    for (; k < nseg; ++k) {
      const uint32_t q = unpack_one(seg, k, B);
      if (MODE == 1) {
        y[k] = cent[q];
      } else {
        const uint8_t* m = row + c.meta + 4 * ((start + k) / c.gs);
        y[k] = static_cast<float>(q) * half_at(m) + half_at(m + 2);
      }
    }
  }
}

template <int MODE>
inline void decode_segment_bits(const Segment& g, const CodecDesc& c, const uint8_t* const* ptrs, int n, int offset,
                                float* out, int64_t dp) {
  switch (g.b) {
    case 1: decode_segment_tile<1, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 2: decode_segment_tile<2, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 3: decode_segment_tile<3, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 4: decode_segment_tile<4, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 5: decode_segment_tile<5, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 6: decode_segment_tile<6, MODE>(g, c, ptrs, n, offset, out, dp); break;
    case 7: decode_segment_tile<7, MODE>(g, c, ptrs, n, offset, out, dp); break;
    default: decode_segment_tile<8, MODE>(g, c, ptrs, n, offset, out, dp); break;
  }
}

// Decodes the rows at ptrs[jj] + offset (jj < n) into out rows of stride dp (rotated domain) and writes the
// factor each row's values still need into scales[jj]: TurboQuant's scale (applied to a whole tile of scores
// or weights at once), 1 for the other codecs.
inline void decode_tile(const RowDecoder& r, const uint8_t* const* ptrs, int n, int offset, float* out, int64_t dp,
                        float* scales) {
  const CodecDesc& c = *r.c;
  const int d = c.dim, d8 = d / 8 * 8;
  switch (r.mode) {
    case 1:
      for (int si = 0; si < r.nseg; ++si) decode_segment_bits<1>(r.seg[si], c, ptrs, n, offset, out, dp);
      for (int jj = 0; jj < n; ++jj) scales[jj] = half_at(ptrs[jj] + offset + c.meta);
      return;
    case 2:
      decode_segment_bits<2>(r.seg[0], c, ptrs, n, offset, out, dp);
      for (int jj = 0; jj < n; ++jj) scales[jj] = 1.f;
      return;
    case 3:
    case 4:
      for (int jj = 0; jj < n; ++jj) {
        const uint8_t* row = ptrs[jj] + offset;
        float* y = out + jj * dp;
        for (int i = 0; i < d8; i += 8) {
          const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i));
          // unaligned: decode_context hands rows of stride D, any head size
          _mm256_storeu_ps(y + i, r.mode == 3 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                                             : _mm256_cvtph_ps(h));
        }
        for (int i = d8; i < d; ++i) y[i] = load_elem(row, i, r.mode == 3 ? kBF16In : kF16);
        scales[jj] = 1.f;
      }
      return;
    default:
      if (c.kind == kFibQuant && fib_tile(c, ptrs, n, offset, out, dp, scales)) return;
      for (int jj = 0; jj < n; ++jj) {
        decode_rotated_scalar(c, ptrs[jj] + offset, out + jj * dp);
        scales[jj] = 1.f;
      }
  }
}

// s[jj] *= f[jj] for a tile
inline void scale_tile(float* s, const float* f) {
  for (int g = 0; g < kTile; g += 8) _mm256_store_ps(s + g, _mm256_mul_ps(_mm256_load_ps(s + g), _mm256_load_ps(f + g)));
}

// exp for attention weights: Cody-Waite reduction to |f| <= ln2/2 and a degree-6 polynomial (relative error
// ~2e-7), 2^n put in the exponent field; inputs below -87 give 0.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  // n is in [-126, 127] after the clamp: 2^n is a normal float
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

// Lane u of the result is the sum of v[u]'s 8 lanes.
inline __m256 hsum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

inline float hmax(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Lanes [0, k) set (k clamped to [0, 8]).
inline __m256 lanes_below(int k) {
  k = k < 0 ? 0 : (k > 8 ? 8 : k);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// s[jj] = q . kt[jj] for jj < nv rounded up to 8 (rows past the valid ones are computed and masked by the caller).
inline void tile_scores(const float* q, const float* kt, int d, int64_t dp, int nv, float* s) {
  const int d8 = d / 8 * 8;
  for (int g = 0; g < nv; g += 8) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    for (int ch = 0; ch < d8; ch += 8) {
      const __m256 qv = _mm256_load_ps(q + ch);
#pragma GCC unroll 8
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_load_ps(kt + (g + u) * dp + ch), acc[u]);
    }
    _mm256_store_ps(s + g, hsum8(acc));
    for (int u = 0; u < 8 && d8 < d; ++u) {
      float t = 0.f;
      for (int i = d8; i < d; ++i) t += q[i] * kt[(g + u) * dp + i];
      s[g + u] += t;
    }
  }
}

// Online softmax over one row's tile of scores: p = exp(s - m_new) for the nv valid tokens (0 past them),
// returns alpha = exp(m_old - m_new) and updates m, l.
inline float softmax_tile(float* s, int nv, float* m, float* l) {
  __m256 mx = _mm256_set1_ps(-INFINITY);
  for (int g = 0; g < nv; g += 8)
    mx = _mm256_max_ps(mx, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_load_ps(s + g), lanes_below(nv - g)));
  const float m_new = std::fmax(*m, hmax(mx));
  const float alpha = std::exp(*m - m_new);
  const __m256 mv = _mm256_set1_ps(m_new);
  __m256 sum = _mm256_setzero_ps();
  for (int g = 0; g < kTile; g += 8) {
    const __m256 p = _mm256_and_ps(lanes_below(nv - g), exp256(_mm256_sub_ps(_mm256_load_ps(s + g), mv)));
    _mm256_store_ps(s + g, p);
    sum = _mm256_add_ps(sum, p);
  }
  *l = *l * alpha + hsum(sum);
  *m = m_new;
  return alpha;
}

// acc_r[0 .. 8 NC) = acc_r * alpha[r] + sum_jj p[r ps + jj] x(jj, c) over chunks c < NC, for RB rows (acc + r dp)
// and tokens jj < nv, where x(jj, c) is token jj's 8 values of chunk c: a decoded tile's (tile_accumulate), or
// codes decoded in registers (decode_avx2.h), summed in the same order either way. Even and odd tokens go to two
// chains: one chain of dependent FMAs per chunk would wait on the FMA latency, not its throughput.
template <int RB, int NC, typename X>
inline void accumulate_rows(float* acc, int64_t dp, const float* alpha, const float* p, int64_t ps, int nv,
                            const X& x) {
  __m256 a[RB][NC], b[RB][NC];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      a[r][c] = _mm256_mul_ps(_mm256_load_ps(acc + r * dp + 8 * c), _mm256_set1_ps(alpha[r]));
      b[r][c] = _mm256_setzero_ps();
    }
  int jj = 0;
  for (; jj + 1 < nv; jj += 2) {
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      const __m256 x0 = x(jj, c), x1 = x(jj + 1, c);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        a[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(p[r * ps + jj]), x0, a[r][c]);
        b[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(p[r * ps + jj + 1]), x1, b[r][c]);
      }
    }
  }
  if (jj < nv) {
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      const __m256 x0 = x(jj, c);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) a[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(p[r * ps + jj]), x0, a[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) _mm256_store_ps(acc + r * dp + 8 * c, _mm256_add_ps(a[r][c], b[r][c]));
}

// fn(c0, NC) over chunks [0, n) in groups of CG (a constant NC, so accumulators stay in registers), the last
// group smaller.
template <int CG, typename F>
inline void for_chunk_groups(int n, const F& fn) {
  int c0 = 0;
  for (; c0 + CG <= n; c0 += CG) fn(c0, std::integral_constant<int, CG>());
  switch (n - c0) {
    case 1: fn(c0, std::integral_constant<int, 1>()); break;
    case 2: if constexpr (CG > 2) fn(c0, std::integral_constant<int, 2>()); break;
    case 3: if constexpr (CG > 3) fn(c0, std::integral_constant<int, 3>()); break;
    default: break;
  }
}

// acc = acc * alpha + sum_jj p[jj] vt[jj]
inline void tile_accumulate(float* acc, float alpha, const float* p, const float* vt, int d, int64_t dp, int nv) {
  const int d8 = d / 8 * 8;
  for_chunk_groups<4>(d8 / 8, [&](int c0, auto nc) {
    const float* v = vt + 8 * c0;
    accumulate_rows<1, decltype(nc)::value>(acc + 8 * c0, dp, &alpha, p, 0, nv,
                                            [&](int jj, int c) { return _mm256_load_ps(v + jj * dp + 8 * c); });
  });
  for (int i = d8; i < d; ++i) {
    float t = acc[i] * alpha;
    for (int jj = 0; jj < nv; ++jj) t += p[jj] * vt[jj * dp + i];
    acc[i] = t;
  }
}

#else  // portable

struct RowDecoder {
  const CodecDesc* c;
};

RowDecoder make_decoder(const CodecDesc& c) { return RowDecoder{&c}; }

inline void decode_tile(const RowDecoder& r, const uint8_t* const* ptrs, int n, int offset, float* out, int64_t dp,
                        float* scales) {
  if (r.c->kind == kFibQuant && fib_tile(*r.c, ptrs, n, offset, out, dp, scales)) return;
  for (int jj = 0; jj < n; ++jj) {
    decode_rotated_scalar(*r.c, ptrs[jj] + offset, out + jj * dp);
    scales[jj] = 1.f;
  }
}

inline void scale_tile(float* s, const float* f) {
  for (int jj = 0; jj < kTile; ++jj) s[jj] *= f[jj];
}

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

// o_rot (D) -> unrotate with the value codec, * v_scale + v_shift (the value codec's output transform),
// written to out row (token t, query head qh).
inline void write_output(const AttnArgs& a, int64_t t, int qh, int kvh, const float* o_rot, float* tmp) {
  const int d = a.head_dim;
  rotate_inverse(a.v.rot, o_rot, tmp);
  const int64_t base = t * a.son + qh * a.soh;
  for (int i = 0; i < d; ++i) {
    float v = tmp[i];
    if (a.v_scale) v = v * a.v_scale[kvh * d + i];
    if (a.v_shift) v = v + a.v_shift[kvh * d + i];
    store_elem(a.out, base + i, a.dtype, v);
  }
}

// A row that attended no key (exclude_self at position 0) outputs 0, as the reference does (not the value
// codec's output transform of a zero vector).
inline void write_zero(const AttnArgs& a, int64_t t, int qh) {
  const int64_t base = t * a.son + qh * a.soh;
  for (int i = 0; i < a.head_dim; ++i) store_elem(a.out, base + i, a.dtype, 0.f);
}

// Row (t, qh)'s log-sum-exp m + log l when the caller asked for it; -inf for a row that attended no key
// (l == 0: any attended key adds at least exp(0) = 1).
inline void write_lse(const AttnArgs& a, int64_t t, int qh, float m, float l) {
  if (a.lse) a.lse[t * a.slse_n + qh] = l > 0.f ? m + std::log(l) : -INFINITY;
}

// ----------------------------------------------------------------------------------------------- sinks

// Where byte o of a block's sink area lives: slot o / bytes, slot byte offset + o % bytes.
inline int64_t sink_at(const Sinks& s, int64_t sT, int64_t sC, int64_t o) {
  return (o / s.bytes) * sT + (s.offset + o % s.bytes) * sC;
}

// Record j's K (side 0) or V (side 1) half of the block at ``block`` -> D floats (rotated domain).
inline void load_sink(const Sinks& s, int d, const uint8_t* block, int64_t sT, int64_t sC, int j, int side,
                      float* out) {
  const int64_t o0 = static_cast<int64_t>(j) * 4 * d + static_cast<int64_t>(side) * 2 * d;
  for (int i = 0; i < d; ++i) {
    const uint8_t lo = block[sink_at(s, sT, sC, o0 + 2 * i)], hi = block[sink_at(s, sT, sC, o0 + 2 * i + 1)];
    out[i] = bf16_to_f32(static_cast<uint16_t>(lo | (hi << 8)));
  }
}

inline void store_sink(const Sinks& s, int d, uint8_t* block, int64_t sT, int64_t sC, int j, int side,
                       const float* y) {
  const int64_t o0 = static_cast<int64_t>(j) * 4 * d + static_cast<int64_t>(side) * 2 * d;
  for (int i = 0; i < d; ++i) {
    const uint16_t h = f32_to_bf16(y[i]);
    block[sink_at(s, sT, sC, o0 + 2 * i)] = static_cast<uint8_t>(h & 0xffu);
    block[sink_at(s, sT, sC, o0 + 2 * i + 1)] = static_cast<uint8_t>(h >> 8);
  }
}

// The context tokens [j0, j0 + n) of one head's sequence: each slot's bytes (contiguous: the slot itself,
// or a gathered copy when the cache's slot bytes are strided) and, for tokens a sink record replaces, the
// block base and block offset (sblk null otherwise). Returns whether any token of the tile is a sink.
struct TileRows {
  const uint8_t* ptrs[kTile];
  const uint8_t* sblk[kTile];
  int soff[kTile];
};

template <typename Args>
inline bool gather_tile(const Args& a, const uint8_t* head_base, const int32_t* bt, int j0, int n, int64_t span,
                        uint8_t* copies, TileRows& t) {
  bool any_sink = false;
  int bi = j0 / a.block_size, off = j0 % a.block_size;  // one division per tile, not per token
  const uint8_t* blk = head_base + static_cast<int64_t>(bt[bi]) * a.sB;
  for (int jj = 0; jj < n; ++jj, ++off) {
    if (off == a.block_size) {
      off = 0;
      blk = head_base + static_cast<int64_t>(bt[++bi]) * a.sB;
    }
    const uint8_t* p = blk + static_cast<int64_t>(off) * a.sT;
    if (a.sC != 1) {  // strided slot bytes: gather the slot into a contiguous copy first
      uint8_t* c = copies + jj * (align16(span) + 64);
      for (int64_t b = 0; b < span; ++b) c[b] = p[b * a.sC];
      p = c;
    }
    t.ptrs[jj] = p;
    const bool sink = off < a.sinks.tokens;
    t.sblk[jj] = sink ? blk : nullptr;
    t.soff[jj] = off;
    any_sink |= sink;
  }
  return any_sink;
}

// Overwrites the decoded rows of sink tokens with their records (and their per-row factor with 1).
template <typename Args>
inline void patch_sinks(const Args& a, const TileRows& t, int n, int side, float* out, int64_t dp, float* scales) {
  for (int jj = 0; jj < n; ++jj) {
    if (!t.sblk[jj]) continue;
    load_sink(a.sinks, a.head_dim, t.sblk[jj], a.sT, a.sC, t.soff[jj], side, out + jj * dp);
    scales[jj] = 1.f;
  }
}

// (x86-64 only, like every build of csrc/cpu: setup.py compiles it on x86-64 alone.)
// _mm_prefetch in a loop that computes nothing else is deleted by gcc 12 at -O3 (the loop has no side
// effect it must keep); a volatile asm statement stays.
inline void prefetch_line(const uint8_t* p) { asm volatile("prefetcht0 (%0)" : : "r"(p)); }

// Asks for the slots of context tokens [j0, j1) (the next tile) while this one computes: a decode item
// does little work per byte, and without this each tile's first touch of its rows waits on memory. A run
// of tokens within one block is one byte range when its slots lie close together (the usual layout).
inline void prefetch_rows(const AttnArgs& a, const uint8_t* head_base, const int32_t* bt, int j0, int j1,
                          int64_t span) {
  for (int j = j0; j < j1;) {
    const int bi = j / a.block_size, off = j % a.block_size;
    const int end = j1 < (bi + 1) * a.block_size ? j1 : (bi + 1) * a.block_size;
    const uint8_t* p = head_base + static_cast<int64_t>(bt[bi]) * a.sB + static_cast<int64_t>(off) * a.sT;
    if (a.sC == 1 && a.sT <= 2 * span) {
      const uint8_t* last = p + static_cast<int64_t>(end - 1 - j) * a.sT + span;
      for (; p < last; p += 64) prefetch_line(p);
    } else {
      for (int k = j; k < end; ++k, p += a.sT) prefetch_line(p);
    }
    j = end;
  }
}

}  // namespace

#include "key_bias.h"
#if KVQ_AVX512
#include "decode_avx512.h"
#include "prefill_avx512.h"
#elif KVQ_AVX2
#include "decode_avx2.h"
#endif
#if KVQ_AVX512 || KVQ_AVX2
#include "decode_fused.h"
#endif

// ----------------------------------------------------------------------------------------------- store

void store_range(const StoreArgs& a, int64_t begin, int64_t end) {
  const int d = a.k.dim;
  auto* fs = static_cast<float*>(tls_scratch.get(sizeof(float) * 5 * d + d));
  float* x = fs;
  float* work = fs + d;  // 2 * D floats for the codec
  float* y = fs + 3 * d;
  uint8_t* codes = reinterpret_cast<uint8_t*>(fs + 4 * d);
  const int sink_end = a.sinks.offset + a.sinks.bytes;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t n = i / a.gh;
    const int64_t slot = a.slots[n];
    if (slot < 0) continue;
    const int h = a.heads[i % a.gh];
    const int off = static_cast<int>(slot % a.block_size);
    uint8_t* block = a.cache + (slot / a.block_size) * a.sB + h * a.sH;
    uint8_t* row = block + off * a.sT;
    const bool sink = off < a.sinks.tokens;
    const int64_t kb = n * a.skn + h * a.skh;
    for (int j = 0; j < d; ++j) {
      float v = load_elem(a.key, kb + j, a.dtype);
      if (a.k_shift) v = v - a.k_shift[h * d + j];
      if (a.k_scale) v = v / a.k_scale[h * d + j];
      x[j] = v;
    }
    encode_vector(a.k, x, row, a.sC, work, codes);
    if (sink) {
      rotate_apply(a.k.rot, x, y);
      store_sink(a.sinks, d, block, a.sT, a.sC, off, 0, y);
    }
    const int64_t vb = n * a.svn + h * a.svh;
    for (int j = 0; j < d; ++j) {
      float v = load_elem(a.value, vb + j, a.dtype);
      if (a.v_shift) v = v - a.v_shift[h * d + j];
      if (a.v_scale) v = v / a.v_scale[h * d + j];
      x[j] = v;
    }
    encode_vector(a.v, x, row + static_cast<int64_t>(a.value_offset) * a.sC, a.sC, work, codes);
    if (sink) {
      rotate_apply(a.v.rot, x, y);
      store_sink(a.sinks, d, block, a.sT, a.sC, off, 1, y);
    }
    // The sink area belongs to the block (other tokens' records): only the slot's own padding is zeroed.
    for (int b = a.pad_begin; b < a.slot_bytes; ++b)
      if (!a.sinks.tokens || b < a.sinks.offset || b >= sink_end) row[static_cast<int64_t>(b) * a.sC] = 0;
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

// Whether decode items over codecs k and v decode their codes in registers (decode_fused.h).
bool fused_decode(const CodecDesc& k, const CodecDesc& v) {
#if KVQ_AVX512 || KVQ_AVX2
  FusedCodec fk, fv;
  make_fused(k, fk);
  make_fused(v, fv);
  return fk.ok && fv.ok;
#else
  (void)k;
  (void)v;
  return false;
#endif
}

namespace {

constexpr int kLutMaxWords = 1024;  // wider codebooks (11, 12 index bits) decode to tiles: tables too big

// Lookup tables for FibQuant keys / codeword histograms for FibQuant values pay for their D * W set-up
// (per query row) only over a long enough context, and hold one query row each: decode items only.
inline bool use_lut(const AttnArgs& a, const CodecDesc& c, int nq, int ctx) {
  return c.kind == kFibQuant && nq == 1 && a.lut_from >= 0 && ctx >= a.lut_from && (1 << c.b0) <= kLutMaxWords;
}

}  // namespace

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
  // Keys the item's first row sees: positions [0, vis0) (its own included unless exclude_self); row qi sees
  // [0, vis0 + qi). Decode items (one row) see every key of [c0, c_end).
  const int vis0 = first_pos + 1 - a.exclude_self;
  const int c_end = w.c1 < vis0 + nq - 1 ? w.c1 : vis0 + nq - 1;
  const int64_t dp = align16(d);
  const int64_t span = a.value_offset + a.v.nbytes;  // slot bytes attention reads
#if KVQ_AVX512
  // Every item of a prefill sequence (even a last item of one query token): the sequence's rows then all
  // sum in the same order, whichever chunk or item they land in.
  if (ql >= 2 && rows <= kMaxPrefillRows && w.split < 0 && w.c0 == 0) return attend_prefill_item(a, w);
#endif
  const bool k_lut = use_lut(a, a.k, nq, c_end - w.c0);
  const bool v_hist = use_lut(a, a.v, nq, c_end - w.c0);
  const int km = d / (k_lut ? a.k.n0 : 1), kw = k_lut ? 1 << a.k.b0 : 0;
  const int vm = d / (v_hist ? a.v.n0 : 1), vw = v_hist ? 1 << a.v.b0 : 0;

  // Scratch layout (floats): Q rows, acc rows, K tile, V tile, scores, m, l, tmp (2 D), per-token factors,
  // key tables, value histograms, unpacked indices (uint16), then slot copies.
  const size_t ntab = k_lut ? static_cast<size_t>(rows) * km * kw : 0;
  const size_t nhist = v_hist ? static_cast<size_t>(rows) * vm * vw : 0;
  const size_t nidx = align16((static_cast<size_t>(kTile) * (km + vm) + 1) / 2);
  const size_t nf = static_cast<size_t>(rows) * dp * 2 + 2 * kTile * dp + static_cast<size_t>(rows) * kTile +
                    3 * align16(rows) + 2 * dp + 2 * kTile + align16(ntab) + align16(nhist) + nidx;
  auto* base = static_cast<float*>(tls_scratch.get(sizeof(float) * nf + kTile * (align16(span) + 64)));
  float* qr = base;
  float* acc = qr + rows * dp;
  float* kt = acc + rows * dp;
  float* vt = kt + kTile * dp;
  float* sc = vt + kTile * dp;
  float* mrow = sc + rows * kTile;
  float* lrow = mrow + align16(rows);
  float* alpha = lrow + align16(rows);  // per row, for the fused decode tiles
  float* tmp = alpha + align16(rows);
  float* kscale = tmp + 2 * dp;  // per-token factors decode_tile leaves to the tile (TurboQuant scales)
  float* vscale = kscale + kTile;
  float* tabs = vscale + kTile;
  float* hist = tabs + align16(ntab);
  uint16_t* kidx = reinterpret_cast<uint16_t*>(hist + align16(nhist));
  uint16_t* vidx = kidx + kTile * km;
  uint8_t* copies = reinterpret_cast<uint8_t*>(base + nf);
  TileRows t;

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
      if (k_lut) fib_query_table(q, d, a.k.n0, a.k.cent0, kw, tabs + static_cast<size_t>(r) * km * kw);
    }
  }
  if (v_hist) std::memset(hist, 0, sizeof(float) * nhist);

  const RowDecoder kd = make_decoder(a.k), vd = make_decoder(a.v);
  const uint8_t* head_base = a.cache + static_cast<int64_t>(h) * a.sH;
  const int32_t* bt = a.block_table + static_cast<int64_t>(s) * a.sbt;
#if KVQ_AVX512 || KVQ_AVX2
  FusedCodec fk, fv;  // decode items over TurboQuant codes of <= 4 bits: decoded in registers (decode_fused.h)
  make_fused(a.k, fk);
  make_fused(a.v, fv);
  const bool fused = nq == 1 && fk.ok && fv.ok && !a.general_decode;
#else
  const bool fused = false;
  (void)alpha;
#endif
  int64_t fused_tiles = 0;
  for (int j0 = w.c0; j0 < c_end; j0 += kTile) {
    const int n = c_end - j0 < kTile ? c_end - j0 : kTile;
    const bool any_sink = gather_tile(a, head_base, bt, j0, n, span, copies, t);
    const bool fused_tile = fused && !any_sink;
    // A decode item reads each row once: ask for the next tile's now (AVX-512: on its fused tiles only).
    if ((KVQ_AVX512 ? fused_tile : nq == 1) && j0 + kTile < c_end)
      prefetch_rows(a, head_base, bt, j0 + kTile, c_end < j0 + 2 * kTile ? c_end : j0 + 2 * kTile, span);
#if KVQ_AVX512 || KVQ_AVX2
    if (fused_tile) {
      fused_decode_tile(a, fk, fv, t, j0, n, w.q0, h * g, rows, qr, dp, sc, mrow, lrow, acc, kscale, vscale, alpha);
      ++fused_tiles;
      continue;
    }
#endif
    if (k_lut) {
      for (int jj = 0; jj < n; ++jj) {
        fib_indices(t.ptrs[jj], km, a.k.b0, kidx + jj * km);
        kscale[jj] = fib_row_scale(a.k, t.ptrs[jj]);
      }
      if (any_sink) patch_sinks(a, t, n, 0, kt, dp, kscale);  // sink rows: their records, dotted directly
      for (int r = 0; r < rows; ++r) {
        const float* tab = tabs + static_cast<size_t>(r) * km * kw;
        const float* q = qr + r * dp;
        float* sr = sc + r * kTile;
        for (int jj = 0; jj < n; ++jj) {
          if (t.sblk[jj]) {
            float dot = 0.f;
            for (int i = 0; i < d; ++i) dot += q[i] * kt[jj * dp + i];
            sr[jj] = dot;
          } else {
            sr[jj] = fib_table_score(tab, kidx + jj * km, km, kw) * kscale[jj];
          }
        }
        add_key_bias(a, w.q0 + r / g, h * g + r % g, j0, n, sr);
      }
    } else {
      decode_tile(kd, t.ptrs, n, 0, kt, dp, kscale);
      if (any_sink) patch_sinks(a, t, n, 0, kt, dp, kscale);
      for (int qi = 0; qi < nq; ++qi) {
        const int nv = vis0 + qi - j0 < n ? vis0 + qi - j0 : n;  // causal: the row's visible keys
        if (nv <= 0) continue;
        for (int gi = 0; gi < g; ++gi) {
          float* sr = sc + (qi * g + gi) * kTile;
          tile_scores(qr + (qi * g + gi) * dp, kt, d, dp, nv, sr);
          scale_tile(sr, kscale);
          add_key_bias(a, w.q0 + qi, h * g + gi, j0, nv, sr);
        }
      }
    }
    if (v_hist) {
      for (int jj = 0; jj < n; ++jj) {
        fib_indices(t.ptrs[jj] + a.value_offset, vm, a.v.b0, vidx + jj * vm);
        vscale[jj] = fib_row_scale(a.v, t.ptrs[jj] + a.value_offset);
      }
      if (any_sink) patch_sinks(a, t, n, 1, vt, dp, vscale);
      for (int r = 0; r < rows; ++r) {  // decode: one query token, every context token of the tile visible
        const float l_before = lrow[r];
        const float alpha = softmax_tile(sc + r * kTile, n, mrow + r, lrow + r);
        float* hr = hist + static_cast<size_t>(r) * vm * vw;
        float* ar = acc + r * dp;
        if (l_before > 0.f && alpha != 1.f) {  // the running max moved (rare after the first tiles)
          for (size_t e = 0; e < static_cast<size_t>(vm) * vw; ++e) hr[e] *= alpha;
          for (int i = 0; i < d; ++i) ar[i] *= alpha;
        }
        const float* p = sc + r * kTile;
        for (int jj = 0; jj < n; ++jj) {
          if (t.sblk[jj]) {
            for (int i = 0; i < d; ++i) ar[i] += p[jj] * vt[jj * dp + i];
          } else {
            fib_histogram_add(hr, vidx + jj * vm, vm, vw, p[jj] * vscale[jj]);
          }
        }
      }
    } else {
      decode_tile(vd, t.ptrs, n, a.value_offset, vt, dp, vscale);
      if (any_sink) patch_sinks(a, t, n, 1, vt, dp, vscale);
      for (int qi = 0; qi < nq; ++qi) {
        const int nv = vis0 + qi - j0 < n ? vis0 + qi - j0 : n;
        if (nv <= 0) continue;
        for (int gi = 0; gi < g; ++gi) {
          const int r = qi * g + gi;
          const float alpha = softmax_tile(sc + r * kTile, nv, mrow + r, lrow + r);
          scale_tile(sc + r * kTile, vscale);  // after the normalizer took the weights: V's per-token scales
          tile_accumulate(acc + r * dp, alpha, sc + r * kTile, vt, d, dp, nv);
        }
      }
    }
  }
  if (fused_tiles) fused_decode_tiles.fetch_add(fused_tiles, std::memory_order_relaxed);
  if (v_hist)
    for (int r = 0; r < rows; ++r)
      fib_fold(hist + static_cast<size_t>(r) * vm * vw, d, a.v.n0, a.v.cent0, vw, acc + r * dp);

  for (int qi = 0; qi < nq; ++qi) {
    const int64_t t_row = w.q0 + qi;
    for (int gi = 0; gi < g; ++gi) {
      const int r = qi * g + gi;
      const int qh = h * g + gi;
      if (w.split >= 0) {
        const int64_t at = (static_cast<int64_t>(w.split) * a.num_tokens + t_row) * a.num_q_heads + qh;
        std::memcpy(a.partial + at * d, acc + r * dp, sizeof(float) * d);
        a.ml[2 * at] = mrow[r];
        a.ml[2 * at + 1] = lrow[r];
        continue;
      }
      write_lse(a, t_row, qh, mrow[r], lrow[r]);
      if (lrow[r] == 0.f) {
        write_zero(a, t_row, qh);
        continue;
      }
      const float inv = 1.f / (lrow[r] > 1e-30f ? lrow[r] : 1e-30f);
      float* o = acc + r * dp;
      for (int i = 0; i < d; ++i) o[i] = o[i] * inv;
      write_output(a, t_row, qh, h, o, tmp);
    }
  }
}

void decode_context(const AttnArgs& a, int s, int hslot, int c0, int c1, float* kout, float* vout) {
  const int d = a.head_dim;
  const int h = a.heads[hslot];
  const int64_t span = a.value_offset + a.v.nbytes;
  auto* base = static_cast<uint8_t*>(tls_scratch.get(2 * kTile * sizeof(float) + kTile * (align16(span) + 64)));
  float* ks = reinterpret_cast<float*>(base);
  float* vs = ks + kTile;
  uint8_t* copies = base + 2 * kTile * sizeof(float);
  TileRows t;
  const RowDecoder kd = make_decoder(a.k), vd = make_decoder(a.v);
  const uint8_t* head_base = a.cache + static_cast<int64_t>(h) * a.sH;
  const int32_t* bt = a.block_table + static_cast<int64_t>(s) * a.sbt;
  for (int j0 = c0; j0 < c1; j0 += kTile) {
    const int n = c1 - j0 < kTile ? c1 - j0 : kTile;
    const bool any_sink = gather_tile(a, head_base, bt, j0, n, span, copies, t);
    float* ko = kout + static_cast<int64_t>(j0 - c0) * d;
    float* vo = vout + static_cast<int64_t>(j0 - c0) * d;
    decode_tile(kd, t.ptrs, n, 0, ko, d, ks);
    decode_tile(vd, t.ptrs, n, a.value_offset, vo, d, vs);
    if (any_sink) {
      patch_sinks(a, t, n, 0, ko, d, ks);
      patch_sinks(a, t, n, 1, vo, d, vs);
    }
    for (int jj = 0; jj < n; ++jj)
      for (int i = 0; i < d; ++i) {
        ko[jj * d + i] *= ks[jj];
        vo[jj * d + i] *= vs[jj];
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
    // A split whose keys exclude_self removed (or that lies past the sequence) has m = -inf: it adds nothing.
    write_lse(a, t, qh, mx, l);
    if (l == 0.f) {
      write_zero(a, t, qh);
      continue;
    }
    const float inv = 1.f / (l > 1e-30f ? l : 1e-30f);
    for (int k = 0; k < d; ++k) o[k] *= inv;
    write_output(a, t, qh, h, o, tmp);
  }
}

}  // namespace KVQ_ISA
}  // namespace cpu
}  // namespace kvq

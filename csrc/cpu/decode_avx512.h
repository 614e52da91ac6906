// Decode work items (one query token) over TurboQuant keys and values with codes of at most 4 bits, on
// AVX-512: the codec's chunk decoders, fused_scores and fused_accumulate_rows that decode_fused.h's tile calls
// (decode_avx2.h is the AVX2 build's); included by kernels_impl.h inside its ISA namespace (AVX-512 build only).
//
// attend_item's general path decodes a tile's codes into float tiles in memory and reads them back once per
// query row. Here a token's codes are decoded in registers and used at once by every query row of its KV
// head (the G query heads): a 16-coordinate chunk is one byte permute (dword j gets the two bytes holding
// code j), one variable shift (code j to bit 0) and one lookup in a register codebook that repeats the 2^b
// centroids over its 16 entries (so the bits above a code never matter). No tile is stored or reloaded.
//
// The sums are the general path's, in its order: a score sums q[d] k[d] over the chunks in order and 16
// tokens' sums come out of hsum16's tree (its levels applied as the tokens arrive), values are summed by
// tile_accumulate's even/odd token chains, TurboQuant's per-token scale is applied per tile. So both paths
// give the same bits, and a tile holding sink tokens takes the general path with the same state (m, l, acc).
#pragma once

namespace {

// One 16-coordinate chunk of a packed row: dword j of permutexvar_epi8(perm, codes) holds the two bytes at
// code j's first bit, srlv by shift brings the code to bit 0, permutexvar_ps looks up its low 4 bits.
struct ChunkDecoder {
  __m512i perm, shift;
  __m512 book;
};

constexpr int kFusedMaxChunks = 16;  // D <= 256, and every code byte within one 64-byte load

struct FusedCodec {
  bool ok;
  int nc;        // 16-coordinate chunks
  int meta;      // byte offset of the fp16 scale (= code bytes)
  __mmask64 load;  // the code bytes of a row
  ChunkDecoder ch[kFusedMaxChunks];
};

inline void make_fused(const CodecDesc& c, FusedCodec& f) {
  f.ok = c.kind == kTurboQuant && c.dim % 16 == 0 && c.dim / 16 <= kFusedMaxChunks && c.n0 % 16 == 0 &&
         c.b0 <= 4 && (c.n0 == c.dim || c.b1 <= 4) && c.meta <= 64;
  if (!f.ok) return;
  f.nc = c.dim / 16;
  f.meta = c.meta;
  f.load = c.meta >= 64 ? ~static_cast<__mmask64>(0) : (static_cast<__mmask64>(1) << c.meta) - 1;
  alignas(64) uint8_t perm[64];
  alignas(64) int32_t shift[16];
  alignas(64) float book[16];
  for (int k = 0; k < f.nc; ++k) {
    const bool first = 16 * k < c.n0;
    const int b = first ? c.b0 : c.b1, start = first ? 0 : c.n0, byte0 = first ? 0 : c.seg1;
    const float* cent = first ? c.cent0 : c.cent1;
    for (int j = 0; j < 16; ++j) {
      const int bit = (16 * k + j - start) * b;
      const int at = byte0 + bit / 8;
      const int next = at + 1 < 64 ? at + 1 : 63;  // a code that ends in its first byte never reads it
      perm[4 * j] = static_cast<uint8_t>(at);
      perm[4 * j + 1] = perm[4 * j + 2] = perm[4 * j + 3] = static_cast<uint8_t>(next);
      shift[j] = bit % 8;
      book[j] = cent[j % (1 << b)];
    }
    f.ch[k].perm = _mm512_load_si512(perm);
    f.ch[k].shift = _mm512_load_si512(shift);
    f.ch[k].book = _mm512_load_ps(book);
  }
}

inline __m512 decode_chunk(const ChunkDecoder& d, __m512i codes) {
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_permutexvar_epi8(d.perm, codes), d.shift), d.book);
}

// The four levels of hsum16's tree: hsum16(v) = t3(t2(t1(t0(v0, v1), t0(v2, v3)), t1(..)), t2(..)).
inline __m512 t0(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
}
inline __m512 t1(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}
inline __m512 t2(__m512 a, __m512 b) { return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE)); }
inline __m512 t3(__m512 a, __m512 b) { return _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x88), _mm512_shuffle_ps(a, b, 0xDD)); }

constexpr int kScoreTokens = 16;  // tokens per fused_scores call: hsum16's lanes

// Sums of RB query rows (q + r * dp) with the keys of 16 tokens (codes at ptrs[u] + offset, every pointer
// valid) -> s[r * ss + u], unscaled. Token u's sum enters the tree at index kHsumOrder[u], as in tile_scores.
template <int RB>
inline void fused_scores(const FusedCodec& f, const uint8_t* const* ptrs, int offset, const float* q, int64_t dp,
                         float* s, int64_t ss) {
  __m512 y[RB][2];
#pragma GCC unroll 2
  for (int half = 0; half < 2; ++half) {
    __m512 x[RB][2];
#pragma GCC unroll 2
    for (int quad = 0; quad < 2; ++quad) {
      __m512 v[RB][4];
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const __m512i codes = _mm512_maskz_loadu_epi8(f.load, ptrs[kHsumOrder[8 * half + 4 * quad + k]] + offset);
#pragma GCC unroll 4
        for (int r = 0; r < RB; ++r) v[r][k] = _mm512_setzero_ps();
        for (int c = 0; c < f.nc; ++c) {
          const __m512 kv = decode_chunk(f.ch[c], codes);
#pragma GCC unroll 4
          for (int r = 0; r < RB; ++r) v[r][k] = _mm512_fmadd_ps(_mm512_load_ps(q + r * dp + 16 * c), kv, v[r][k]);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) x[r][quad] = t1(t0(v[r][0], v[r][1]), t0(v[r][2], v[r][3]));
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) y[r][half] = t2(x[r][0], x[r][1]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) _mm512_store_ps(s + r * ss, t3(y[r][0], y[r][1]));
}

// acc_r[chunks c0 .. c0 + CG) = acc_r * alpha[r] + sum_jj p[r * ps + jj] v_jj for RB rows (acc + r * dp) over
// tokens jj < nv (codes at ptrs[jj] + offset), even and odd tokens in two chains as tile_accumulate sums them.
template <int RB, int CG>
inline void fused_accumulate(const FusedCodec& f, int c0, const uint8_t* const* ptrs, int offset, int nv, const float* p,
                             int64_t ps, const float* alpha, float* acc, int64_t dp) {
  __m512 a[RB][CG], b[RB][CG];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CG; ++c) {
      a[r][c] = _mm512_mul_ps(_mm512_load_ps(acc + r * dp + 16 * (c0 + c)), _mm512_set1_ps(alpha[r]));
      b[r][c] = _mm512_setzero_ps();
    }
  int jj = 0;
  for (; jj + 1 < nv; jj += 2) {
    const __m512i x0 = _mm512_maskz_loadu_epi8(f.load, ptrs[jj] + offset);
    const __m512i x1 = _mm512_maskz_loadu_epi8(f.load, ptrs[jj + 1] + offset);
#pragma GCC unroll 4
    for (int c = 0; c < CG; ++c) {
      const __m512 v0 = decode_chunk(f.ch[c0 + c], x0), v1 = decode_chunk(f.ch[c0 + c], x1);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        a[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * ps + jj]), v0, a[r][c]);
        b[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * ps + jj + 1]), v1, b[r][c]);
      }
    }
  }
  if (jj < nv) {
    const __m512i x0 = _mm512_maskz_loadu_epi8(f.load, ptrs[jj] + offset);
#pragma GCC unroll 4
    for (int c = 0; c < CG; ++c) {
      const __m512 v0 = decode_chunk(f.ch[c0 + c], x0);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) a[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[r * ps + jj]), v0, a[r][c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < CG; ++c) _mm512_store_ps(acc + r * dp + 16 * (c0 + c), _mm512_add_ps(a[r][c], b[r][c]));
}

template <int RB>
inline void fused_accumulate_rows(const FusedCodec& f, const uint8_t* const* ptrs, int offset, int nv, const float* p,
                                  int64_t ps, const float* alpha, float* acc, int64_t dp) {
  // Chunk groups keep 2 * RB * CG accumulators within the 32 vector registers, with room for the decoded chunks.
  constexpr int CG = RB <= 3 ? 4 : 3;
  int c0 = 0;
  for (; c0 + CG <= f.nc; c0 += CG) fused_accumulate<RB, CG>(f, c0, ptrs, offset, nv, p, ps, alpha, acc, dp);
  switch (f.nc - c0) {
    case 1: fused_accumulate<RB, 1>(f, c0, ptrs, offset, nv, p, ps, alpha, acc, dp); break;
    case 2: fused_accumulate<RB, 2>(f, c0, ptrs, offset, nv, p, ps, alpha, acc, dp); break;
    case 3: fused_accumulate<RB, 3>(f, c0, ptrs, offset, nv, p, ps, alpha, acc, dp); break;
    default: break;
  }
}

}  // namespace

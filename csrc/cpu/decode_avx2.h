// Decode work items (one query token) over TurboQuant keys and values with codes of at most 4 bits, on AVX2 +
// FMA: the codec's chunk decoders, fused_scores and fused_accumulate_rows that decode_fused.h's tile calls
// (decode_avx512.h is the AVX-512 build's); included by kernels_impl.h inside its ISA namespace (AVX2 build only).
//
// 8 codes of b <= 4 bits are b whole bytes, so chunk k of a segment starts at byte k b and its codes lie in
// the dword there: one broadcast load, one variable shift (code j to bit 0 of dword j) and a register lookup
// (permutevar8x32_ps reads an index's low 3 bits: the codebook repeats the 2^b centroids over its 8 entries,
// so the bits above a code never matter; 4-bit codes take two lookups and a blend on bit 3). A token's codes
// are used at once by every query row of its KV head; no float tile is stored or reloaded.
//
// The sums are the general path's, in its order: a score sums q[d] k[d] over the chunks in order and 8 tokens'
// sums come out of hsum8, values are summed by accumulate_rows as tile_accumulate sums them, TurboQuant's
// per-token scale is applied per tile. So both paths give the same bits, and a tile holding sink tokens takes
// the general path with the same state (m, l, acc).
#pragma once

namespace {

struct FusedSegment {
  int c0, nch;   // its first 8-coordinate chunk of the row, and its chunks
  int b, byte0;  // bits per code, first code byte in the row
  __m256i shift;        // (0, b, ..., 7 b)
  __m256 book0, book1;  // codebook entries 0..7 and 8..15, centroid i % 2^b at entry i
};

struct FusedCodec {
  bool ok;
  int nseg;
  int meta;  // byte offset of the fp16 scale
  FusedSegment seg[2];
};

inline void make_fused(const CodecDesc& c, FusedCodec& f) {
  std::memset(static_cast<void*>(&f), 0, sizeof(f));
  const auto bits_ok = [](int b) { return b >= 1 && b <= 4; };
  f.ok = c.kind == kTurboQuant && c.dim % 8 == 0 && c.n0 > 0 && c.n0 % 8 == 0 && bits_ok(c.b0) &&
         (c.n0 == c.dim || bits_ok(c.b1));
  if (!f.ok) return;
  f.meta = c.meta;
  f.nseg = c.n0 < c.dim ? 2 : 1;
  for (int s = 0; s < f.nseg; ++s) {
    FusedSegment& g = f.seg[s];
    g.b = s ? c.b1 : c.b0;
    g.byte0 = s ? c.seg1 : 0;
    g.c0 = s ? c.n0 / 8 : 0;
    g.nch = (s ? c.dim - c.n0 : c.n0) / 8;
    // a chunk is read as the 4 bytes at its first one: they must lie within the row (codes, then the scale)
    f.ok = f.ok && g.byte0 + (g.nch - 1) * g.b + 4 <= c.nbytes;
    const float* cent = s ? c.cent1 : c.cent0;
    alignas(32) int32_t shift[8];
    alignas(32) float book[16];
    for (int j = 0; j < 8; ++j) shift[j] = j * g.b;
    for (int j = 0; j < 16; ++j) book[j] = cent[j % (1 << g.b)];
    g.shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(shift));
    g.book0 = _mm256_load_ps(book);
    g.book1 = _mm256_load_ps(book + 8);
  }
}

// The 8 centroids of the chunk whose codes start at p; W: 4-bit codes.
template <bool W>
inline __m256 decode8(const FusedSegment& g, const uint8_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), g.shift);
  if (!W) return _mm256_permutevar8x32_ps(g.book0, idx);
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(g.book0, idx), _mm256_permutevar8x32_ps(g.book1, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// fn(segment, W) per code segment, W (4-bit codes) as a type so each segment's loops are compiled for it.
template <typename F>
inline void for_segments(const FusedCodec& f, const F& fn) {
  for (int s = 0; s < f.nseg; ++s) {
    if (f.seg[s].b == 4)
      fn(f.seg[s], std::true_type());
    else
      fn(f.seg[s], std::false_type());
  }
}

constexpr int kScoreTokens = 8;  // tokens per fused_scores call: hsum8's lanes

// Sums of RB <= 4 query rows (q + r * dp) with the keys of 8 tokens (codes at ptrs[u] + offset, every pointer
// valid) -> s[r * ss + u], unscaled. TT tokens at a time: TT RB independent FMA chains hide the FMA latency, and
// each q chunk loaded serves TT tokens (8 rows of one token each were slower: loads, not FMAs, bound them).
template <int RB>
inline void fused_scores(const FusedCodec& f, const uint8_t* const* ptrs, int offset, const float* q, int64_t dp,
                         float* s, int64_t ss) {
  constexpr int TT = 8 / RB;
  __m256 part[RB][8];
#pragma GCC unroll 8
  for (int u0 = 0; u0 < 8; u0 += TT) {
    __m256 v[TT][RB];
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t)
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) v[t][r] = _mm256_setzero_ps();
    for_segments(f, [&](const FusedSegment& g, auto wide) {
      constexpr bool W = decltype(wide)::value;
      const int at = offset + g.byte0;
      for (int k = 0; k < g.nch; ++k) {
        __m256 kv[TT];
#pragma GCC unroll 8
        for (int t = 0; t < TT; ++t) kv[t] = decode8<W>(g, ptrs[u0 + t] + at + k * g.b);
#pragma GCC unroll 8
        for (int r = 0; r < RB; ++r) {
          const __m256 qv = _mm256_load_ps(q + r * dp + 8 * (g.c0 + k));
#pragma GCC unroll 8
          for (int t = 0; t < TT; ++t) v[t][r] = _mm256_fmadd_ps(qv, kv[t], v[t][r]);
        }
      }
    });
#pragma GCC unroll 8
    for (int t = 0; t < TT; ++t)
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) part[r][u0 + t] = v[t][r];
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r) _mm256_store_ps(s + r * ss, hsum8(part[r]));
}

// acc_r = acc_r * alpha[r] + sum_jj p[r * ps + jj] v_jj for RB rows (acc + r * dp) over tokens jj < nv (codes
// at ptrs[jj] + offset).
template <int RB>
inline void fused_accumulate_rows(const FusedCodec& f, const uint8_t* const* ptrs, int offset, int nv, const float* p,
                                  int64_t ps, const float* alpha, float* acc, int64_t dp) {
  // Chunk groups keep 2 RB CG accumulators within the 16 vector registers, with room for the decoded chunks.
  constexpr int CG = RB == 1 ? 4 : (RB == 2 ? 2 : 1);
  for_segments(f, [&](const FusedSegment& g, auto wide) {
    constexpr bool W = decltype(wide)::value;
    for_chunk_groups<CG>(g.nch, [&](int k0, auto nc) {
      const int at = offset + g.byte0 + k0 * g.b;
      accumulate_rows<RB, decltype(nc)::value>(acc + 8 * (g.c0 + k0), dp, alpha, p, ps, nv, [&](int jj, int c) {
        return decode8<W>(g, ptrs[jj] + at + c * g.b);
      });
    });
  });
}

}  // namespace

// The register-fused decode tile of the SIMD builds: a decode work item's tile over TurboQuant codes of at most
// 4 bits, each token's codes decoded in registers and used at once by every query row of its KV head, no float
// tile stored and reloaded. The ISA header before it (decode_avx512.h, decode_avx2.h) gives FusedCodec,
// make_fused, kScoreTokens (tokens per fused_scores call), fused_scores<RB> and fused_accumulate_rows<RB>, each
// summing in the general path's order; included by kernels_impl.h inside its ISA namespace.
#pragma once

namespace {

// Row blocks of up to 4 rows share each decoded token.
template <typename F>
inline void for_row_blocks(int rows, const F& fn) {
  for (int r0 = 0; r0 < rows; r0 += 4) {
    switch (rows - r0 < 4 ? rows - r0 : 4) {
      case 1: fn(r0, std::integral_constant<int, 1>()); break;
      case 2: fn(r0, std::integral_constant<int, 2>()); break;
      case 3: fn(r0, std::integral_constant<int, 3>()); break;
      default: fn(r0, std::integral_constant<int, 4>()); break;
    }
  }
}

// One tile of n context tokens [j0, j0 + n) (no sink among them) for the `rows` query rows of a decode item
// (query token tok, query heads qh0 + r): scores, online softmax (m, l per row), values into acc. t.ptrs past n
// are pointed at a valid row (their scores are computed and masked, as tile_scores does). kscale / vscale:
// kTile floats of scratch.
inline void fused_decode_tile(const AttnArgs& a, const FusedCodec& fk, const FusedCodec& fv, TileRows& t, int j0,
                              int n, int64_t tok, int qh0, int rows, const float* qr, int64_t dp, float* sc,
                              float* mrow, float* lrow, float* acc, float* kscale, float* vscale, float* alpha) {
  for (int jj = 0; jj < kTile; ++jj) {
    if (jj >= n) t.ptrs[jj] = t.ptrs[0];
    kscale[jj] = jj < n ? half_at(t.ptrs[jj] + fk.meta) : 0.f;
    vscale[jj] = jj < n ? half_at(t.ptrs[jj] + a.value_offset + fv.meta) : 0.f;
  }
  for_row_blocks(rows, [&](int r0, auto rb) {
    for (int g = 0; g < n; g += kScoreTokens)
      fused_scores<decltype(rb)::value>(fk, t.ptrs + g, 0, qr + r0 * dp, dp, sc + r0 * kTile + g, kTile);
  });
  for (int r = 0; r < rows; ++r) {
    scale_tile(sc + r * kTile, kscale);
    add_key_bias(a, tok, qh0 + r, j0, n, sc + r * kTile);
    alpha[r] = softmax_tile(sc + r * kTile, n, mrow + r, lrow + r);
    scale_tile(sc + r * kTile, vscale);  // after the normalizer took the weights: V's per-token scales
  }
  for_row_blocks(rows, [&](int r0, auto rb) {
    fused_accumulate_rows<decltype(rb)::value>(fv, t.ptrs, a.value_offset, n, sc + r0 * kTile, kTile, alpha + r0,
                                               acc + r0 * dp, dp);
  });
}

}  // namespace

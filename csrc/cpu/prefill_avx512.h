// Prefill work items (of sequences with two or more query tokens) on AVX-512, included by kernels_impl.h inside its ISA
// namespace (AVX-512 build only; the portable build runs prefill through attend_item's per-row loops).
//
// The item's rows (query tokens x the KV head's G query heads, at most 64) sit in vector lanes: the rotated
// queries are transposed once per item to (D, lanes), a tile's scores come out as (keys, lanes), the online
// softmax runs on whole vectors of rows (no horizontal reductions), and the output accumulates as
// (D, lanes). Both products are register-blocked (4 broadcast rows x up to 4 vectors of lanes per call), so
// every decoded K/V element loaded serves up to 64 rows.
//
// A row's result depends only on its query and its context, never on which other rows share its item: every
// lane runs the same sequence of float operations (dot products summed over d = 0, 1, ... in order, one tile
// after another from context token 0, keys past the row's position masked to weight exactly 0, a tile
// without a visible key leaving the row's state bit-for-bit unchanged). So a prefix-cache hit's suffix and a
// chunked prefill give the cold, one-chunk run's bits.
#pragma once

namespace {

constexpr int kMaxPrefillRows = 64;  // 4 vectors of lanes
constexpr int kBcast = 4;            // broadcast operand rows per lane_gemm call

// c[r][lanes] = (alpha ? c[r][lanes] * alpha[lanes] : 0) + sum_k x[r * xr + k * xk] * y[k * ys + lanes] for
// r < kBcast and NR vectors of lanes, k = 0 .. K-1 in order in every lane.
template <int NR>
inline void lane_gemm(float* c, int64_t cs, const float* x, int64_t xr, int64_t xk, const float* y, int64_t ys, int K,
                      const float* alpha) {
  __m512 acc[kBcast][NR];
#pragma GCC unroll 4
  for (int r = 0; r < kBcast; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v)
      acc[r][v] = alpha ? _mm512_mul_ps(_mm512_load_ps(c + r * cs + 16 * v), _mm512_load_ps(alpha + 16 * v))
                        : _mm512_setzero_ps();
  for (int k = 0; k < K; ++k) {
    __m512 yv[NR];
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) yv[v] = _mm512_load_ps(y + k * ys + 16 * v);
#pragma GCC unroll 4
    for (int r = 0; r < kBcast; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * xr + k * xk]);
#pragma GCC unroll 4
      for (int v = 0; v < NR; ++v) acc[r][v] = _mm512_fmadd_ps(xb, yv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kBcast; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NR; ++v) _mm512_store_ps(c + r * cs + 16 * v, acc[r][v]);
}

inline void lane_gemm_n(int nr, float* c, int64_t cs, const float* x, int64_t xr, int64_t xk, const float* y,
                        int64_t ys, int K, const float* alpha) {
  switch (nr) {
    case 1: lane_gemm<1>(c, cs, x, xr, xk, y, ys, K, alpha); break;
    case 2: lane_gemm<2>(c, cs, x, xr, xk, y, ys, K, alpha); break;
    case 3: lane_gemm<3>(c, cs, x, xr, xk, y, ys, K, alpha); break;
    default: lane_gemm<4>(c, cs, x, xr, xk, y, ys, K, alpha); break;
  }
}

// Score dot products sum in pieces of kScorePart coordinates, added pairwise (a tree over the pieces): one
// chain over all D coordinates rounds its running sum D times, which at D = 128 was enough to move the
// bf16 outputs measurably away from the reference's (and the old kernel's 16-way split) sums.
constexpr int kScorePart = 8;
inline int score_parts(int d) { return (d + kScorePart - 1) / kScorePart; }

// s[r][lanes] = q^T[.][lanes] . kt[r] for kBcast key rows r, via score_parts(d) partial sums in part.
inline void lane_scores(int nr, float* s, int64_t ls, const float* kt, int64_t dp, const float* qt, int d, float* part) {
  const int np = score_parts(d);
  const int64_t ps = kBcast * ls;  // one partial: kBcast rows of ls lanes
  for (int p = 0; p < np; ++p) {
    const int k0 = p * kScorePart, kn = d - k0 < kScorePart ? d - k0 : kScorePart;
    lane_gemm_n(nr, np == 1 ? s : part + p * ps, ls, kt + k0, dp, 1, qt + k0 * ls, ls, kn, nullptr);
  }
  if (np == 1) return;
  for (int stride = 1; stride < np; stride *= 2)
    for (int p = 0; p + stride < np; p += 2 * stride) {
      float* dst = stride * 2 >= np && p == 0 ? nullptr : part + p * ps;
      const float* a = part + p * ps;
      const float* b = part + (p + stride) * ps;
      for (int r = 0; r < kBcast; ++r)
        for (int v = 0; v < nr; ++v) {
          const __m512 x = _mm512_add_ps(_mm512_load_ps(a + r * ls + 16 * v), _mm512_load_ps(b + r * ls + 16 * v));
          _mm512_store_ps((dst ? dst : s) + r * ls + 16 * v, x);
        }
    }
}

// One tile's online softmax for 16 rows: st (keys, lanes) holds the raw scores of keys [j0, j0 + n);
// afterwards the weights times V's per-key factors. bias (null: none): the lanes' key-centring bias of each
// key of the tile (key_bias.h), ls apart. m, l, alpha: the lanes' running max, normalizer
// and the factor the accumulator takes for this tile.
inline void softmax_lanes(float* st, int64_t ls, int n, int j0, const float* kscale, const float* vscale,
                          const float* bias, __m512i pos, float* m, float* l, float* alpha) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 mt = ninf;
  for (int jj = 0; jj < n; ++jj) {
    __m512 s = _mm512_mul_ps(_mm512_load_ps(st + jj * ls), _mm512_set1_ps(kscale[jj]));
    if (bias) s = _mm512_add_ps(s, _mm512_load_ps(bias + jj * ls));
    const __mmask16 hidden = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(j0 + jj), pos);  // causal
    s = _mm512_mask_mov_ps(s, hidden, ninf);
    _mm512_store_ps(st + jj * ls, s);
    mt = _mm512_max_ps(mt, s);
  }
  const __m512 m_old = _mm512_load_ps(m);
  const __m512 m_new = _mm512_max_ps(m_old, mt);
  // A row that sees no key of this tile keeps its state exactly (factor 1, not exp(0) of a polynomial).
  const __mmask16 same = _mm512_cmp_ps_mask(m_new, m_old, _CMP_EQ_OQ);
  // A row that has seen no key yet (exclude_self at position 0) keeps m = -inf: its weights are taken
  // against 0 (exp512(-inf - -inf) would be NaN, clamped to exp(88)), so they stay exactly 0.
  const __m512 m_sub = _mm512_mask_mov_ps(m_new, _mm512_cmp_ps_mask(m_new, ninf, _CMP_EQ_OQ), _mm512_setzero_ps());
  // The rescaling factor scales every earlier tile's sums: libm's exp (16 calls a tile), not the polynomial.
  alignas(64) float d_m[16];
  _mm512_store_ps(d_m, _mm512_sub_ps(m_old, m_new));
  for (int i = 0; i < 16; ++i) d_m[i] = std::exp(d_m[i]);
  const __m512 al = _mm512_mask_mov_ps(_mm512_load_ps(d_m), same, _mm512_set1_ps(1.f));
  // Two chains (even and odd keys) for the tile's normalizer, added at the end.
  __m512 sum[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int jj = 0; jj < n; ++jj) {
    const __m512 p = exp512(_mm512_sub_ps(_mm512_load_ps(st + jj * ls), m_sub));  // hidden keys: exactly 0
    sum[jj & 1] = _mm512_add_ps(sum[jj & 1], p);
    _mm512_store_ps(st + jj * ls, _mm512_mul_ps(p, _mm512_set1_ps(vscale[jj])));
  }
  _mm512_store_ps(l, _mm512_add_ps(_mm512_mul_ps(_mm512_load_ps(l), al), _mm512_add_ps(sum[0], sum[1])));
  _mm512_store_ps(m, m_new);
  _mm512_store_ps(alpha, al);
}

// Query tokens [w.q0, w.q1) of one KV head against context [0, their positions] ([0, position) with
// exclude_self); w.split < 0, w.c0 == 0.
void attend_prefill_item(const AttnArgs& a, const WorkItem& w) {
  const int d = a.head_dim, g = a.group;
  const int s = w.seq;
  const int h = a.heads[w.hslot];
  const int len = a.seq_lens[s];
  const int q_start = a.qsl[s];
  const int ql = a.qsl[s + 1] - q_start;
  const int nq = w.q1 - w.q0;
  const int rows = nq * g;
  const int nr = (rows + 15) / 16;
  const int64_t lp = 16 * nr;  // lanes, padded
  const int first_pos = len - ql + (w.q0 - q_start);
  const int last_seen = first_pos - a.exclude_self;  // the first row's last visible key (-1: none)
  const int c_end = last_seen + nq;
  const int64_t dp = align16(d);
  const int64_t span = a.value_offset + a.v.nbytes;

  // Scratch (floats): Q^T, scores / weights (keys, lanes), acc^T, m, l, alpha, positions (int32), K tile,
  // V tile, per-key factors, two D rows, partial sums, then (key centring) the bias queries transposed and a
  // tile's key biases (keys, lanes), then slot copies.
  const size_t nbias = a.bias_q ? (static_cast<size_t>(dp) + kTile) * lp : 0;
  const size_t nf = 2 * static_cast<size_t>(dp) * lp + kTile * lp + 4 * lp + 2 * kTile * dp + 2 * kTile + 2 * dp +
                    static_cast<size_t>(score_parts(d)) * kBcast * lp + nbias;
  auto* base = static_cast<float*>(tls_scratch.get(sizeof(float) * nf + kTile * (align16(span) + 64)));
  float* qt = base;
  float* acc = qt + dp * lp;
  float* st = acc + dp * lp;
  float* mrow = st + kTile * lp;
  float* lrow = mrow + lp;
  float* alpha = lrow + lp;
  int32_t* pos = reinterpret_cast<int32_t*>(alpha + lp);
  float* kt = alpha + 2 * lp;
  float* vt = kt + kTile * dp;
  float* kscale = vt + kTile * dp;
  float* vscale = kscale + kTile;
  float* tmp = vscale + kTile;
  float* q = tmp + dp;
  float* part = q + dp;  // partial score sums (lane_scores), or one block of a tile's weighted values
  float* bqt = part + static_cast<size_t>(score_parts(d)) * kBcast * lp;  // (D, lanes) bias queries
  float* tbias = bqt + static_cast<size_t>(dp) * lp;                        // (kTile, lanes)
  uint8_t* copies = reinterpret_cast<uint8_t*>(base + nf);

  std::memset(qt, 0, sizeof(float) * 2 * dp * lp);  // Q^T (padding lanes: zero queries) and acc^T
  if (a.bias_q) {
    std::memset(bqt, 0, sizeof(float) * dp * lp);
    for (int r = 0; r < rows; ++r) {
      const float* b = a.bias_q + static_cast<int64_t>(w.q0 + r / g) * a.sbq_n + static_cast<int64_t>(h * g + r % g) * a.sbq_h;
      for (int i = 0; i < d; ++i) bqt[i * lp + r] = b[i];
    }
  }
  for (int r = 0; r < lp; ++r) {
    mrow[r] = -INFINITY;
    lrow[r] = 0.f;
    pos[r] = r < rows ? last_seen + r / g : c_end;
  }
  for (int r = 0; r < rows; ++r) {
    const int64_t qb = static_cast<int64_t>(w.q0 + r / g) * a.sqn + static_cast<int64_t>(h * g + r % g) * a.sqh;
    for (int i = 0; i < d; ++i) {
      const float v = load_elem(a.query, qb + i, a.dtype);
      tmp[i] = a.k_scale ? v * a.k_scale[h * d + i] : v;
    }
    rotate_apply(a.k.rot, tmp, q);
    for (int i = 0; i < d; ++i) qt[i * lp + r] = q[i] * a.scale;
  }

  const RowDecoder kd = make_decoder(a.k), vd = make_decoder(a.v);
  const uint8_t* head_base = a.cache + static_cast<int64_t>(h) * a.sH;
  const int32_t* bt = a.block_table + static_cast<int64_t>(s) * a.sbt;
  TileRows t;
  for (int j0 = 0; j0 < c_end; j0 += kTile) {
    const int n = c_end - j0 < kTile ? c_end - j0 : kTile;
    const bool any_sink = gather_tile(a, head_base, bt, j0, n, span, copies, t);
    decode_tile(kd, t.ptrs, n, 0, kt, dp, kscale);
    decode_tile(vd, t.ptrs, n, a.value_offset, vt, dp, vscale);
    if (any_sink) {
      patch_sinks(a, t, n, 0, kt, dp, kscale);
      patch_sinks(a, t, n, 1, vt, dp, vscale);
    }
    // Key rows past n (up to the next multiple of kBcast) hold an earlier tile's finite values: their
    // scores are computed and never read.
    for (int jj = 0; jj < n; jj += kBcast) lane_scores(nr, st + jj * lp, lp, kt + jj * dp, dp, qt, d, part);
    if (a.bias_q)
      for (int jj = 0; jj < n; ++jj) lane_key_bias(a, nr, bqt, lp, j0 + jj, tbias + jj * lp);
    for (int v = 0; v < nr; ++v)
      softmax_lanes(st + 16 * v, lp, n, j0, kscale, vscale, a.bias_q ? tbias + 16 * v : nullptr,
                    _mm512_loadu_si512(pos + 16 * v), mrow + 16 * v, lrow + 16 * v, alpha + 16 * v);
    // The tile's weighted values are summed on their own, then added to the rescaled accumulator (as the
    // reference does): the running sum is not the first term of a long chain of small products.
    for (int i = 0; i < d; i += kBcast) {
      lane_gemm_n(nr, part, lp, vt + i, 1, dp, st, lp, n, nullptr);
      for (int r = 0; r < kBcast; ++r)
        for (int v = 0; v < nr; ++v) {
          float* c = acc + (i + r) * lp + 16 * v;
          _mm512_store_ps(c, _mm512_add_ps(_mm512_mul_ps(_mm512_load_ps(c), _mm512_load_ps(alpha + 16 * v)),
                                           _mm512_load_ps(part + r * lp + 16 * v)));
        }
    }
  }

  for (int r = 0; r < rows; ++r) {
    write_lse(a, w.q0 + r / g, h * g + r % g, mrow[r], lrow[r]);
    if (lrow[r] == 0.f) {
      write_zero(a, w.q0 + r / g, h * g + r % g);
      continue;
    }
    const float l = lrow[r] > 1e-30f ? lrow[r] : 1e-30f;
    for (int i = 0; i < d; ++i) q[i] = acc[i * lp + r] / l;  // one rounding (the reference divides too)
    write_output(a, w.q0 + r / g, h * g + r % g, h, q, tmp);
  }
}

}  // namespace

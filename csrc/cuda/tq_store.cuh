// Quantize-on-write: one warp per (token, KV head) applies the head's state transform, rotates, normalizes,
// quantizes (TurboQuant cells or FibQuant nearest codewords, csrc/common/fibquant.h), bit-packs K and V and writes the slot chosen by
// slot_mapping, plus the block's sink record when the token is one of its first positions.
// Framework-agnostic (CUDA only).
#pragma once

#include "../common/fibquant.h"
#include "tq_common.cuh"

namespace kvq {

constexpr int kStoreWarps = 4;

// Encodes one vector of D coordinates into row[0 .. c.meta + 2). Lane l owns coordinates l, l + 32, ...
// (coalesced loads of x and of R^T's columns); codes meet in shared memory for packing. FibQuant's math (the
// nearest-codeword search, the scale, the index bit stream) is csrc/common/fibquant.h, shared with the CPU
// kernels; xs then holds the unit rotated vector and cw the codewords it picked. `sub` / `fac` are
// this head's state rows (or nulls); `sink_row`, when not null, is the first slot of the token's block and gets
// the bf16 rotated vector as record `sink_off`, half `half` (0 K, 1 V).
template <int D>
__device__ void encode_one(const void* x, int64_t base, DType t, const TqCodec& c, const float* sub, const float* fac,
                           uint8_t* row, int64_t sC, float* xs, float* cw, uint16_t* cs, int lane, uint8_t* sink_row,
                           const Sinks& sink, int64_t sT, int sink_off, int half) {
  constexpr int VPL = D / kWarp;
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int d = i * kWarp + lane;
    float v = load_as_float(x, base + d, t);
    if (sub != nullptr) v -= sub[d];
    if (fac != nullptr) v = __fdiv_rn(v, fac[d]);
    xs[d] = v;
    ss = fmaf(v, v, ss);
  }
  __syncwarp();
  const float norm = __fsqrt_rn(warp_sum(ss));
  const float safe = fmaxf(norm, 1e-30f);
  float y[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int d = i * kWarp + lane;
    float r = xs[d];
    if (c.rotate) {
      r = 0.f;
      for (int j = 0; j < D; ++j) r = fmaf(xs[j], c.rt[j * D + d], r);
    }
    if (sink_row != nullptr) store_sink(sink_row, sT, sC, sink, sink_off, half, d, D, r);
    y[i] = __fdiv_rn(r, safe);
  }
  if (c.kind == kKindFibQuant) {
    const int K = c.block;
    __syncwarp();  // every lane has read xs: it now holds y, so each block's coordinates meet in one lane
#pragma unroll
    for (int i = 0; i < VPL; ++i) xs[i * kWarp + lane] = y[i];
    __syncwarp();
    for (int j = lane; j < c.n0; j += kWarp) {
      const int q = fib_nearest(xs + j * K, K, c.tab0, c.tab1, c.w);
      cs[j] = static_cast<uint16_t>(q);
      for (int k = 0; k < K; ++k) cw[j * K + k] = c.tab0[q * K + k];
    }
    __syncwarp();
    if (lane == 0) {
      fib_pack(cs, c.n0, c.b0, row, sC);
      store_f16(row + static_cast<int64_t>(c.meta) * sC, sC, fib_scale(c.scale_mode, norm, xs, cw, D));
    }
    __syncwarp();  // xs, cw and cs are reused for the next vector
    return;
  }
  float c2 = 0.f, yc = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int d = i * kWarp + lane;
    int q = 0;
    for (int j = 0; j < c.w - 1; ++j) q += y[i] > c.tab1[d * c.w + j];  // torch.bucketize (right=False)
    cs[d] = static_cast<uint16_t>(q);
    const float cv = c.tab0[d * c.w + q];
    c2 = fmaf(cv, cv, c2);
    yc = fmaf(y[i], cv, yc);
  }
  c2 = fmaxf(warp_sum(c2), 1e-30f);
  yc = warp_sum(yc);
  float scale = norm;
  if (c.scale_mode == 1) scale = __fdiv_rn(norm, __fsqrt_rn(c2));
  if (c.scale_mode == 2) scale = __fdiv_rn(norm * yc, c2);
  __syncwarp();
  // Byte k collects the codes whose bit ranges overlap it; lanes own bytes k = lane, lane + 32, ...
  for (int k = lane; k < c.meta; k += kWarp) {
    const bool first = k < c.seg1;
    const int nb = first ? c.b0 : c.b1;
    const int bit0 = first ? 8 * k : 8 * (k - c.seg1);
    const int j0 = first ? 0 : c.n0;
    const int jend = first ? c.n0 : D;
    uint32_t byte = 0;
    for (int j = bit0 / nb; j <= (bit0 + 7) / nb && j0 + j < jend; ++j) {
      const int off = j * nb - bit0;
      const uint32_t v = cs[j0 + j];
      byte |= off >= 0 ? (v << off) : (v >> -off);
    }
    row[static_cast<int64_t>(k) * sC] = static_cast<uint8_t>(byte & 0xFF);
  }
  if (lane == 0) store_f16(row + static_cast<int64_t>(c.meta) * sC, sC, scale);
  __syncwarp();  // xs and cs are reused for the next vector
}

template <int D>
__global__ void __launch_bounds__(kStoreWarps * kWarp) tq_store_kernel(const StoreParams p) {
  __shared__ float xs[kStoreWarps][D];
  __shared__ float cw[kStoreWarps][D];
  __shared__ uint16_t cs[kStoreWarps][D];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kStoreWarps + warp;
  if (item >= static_cast<int64_t>(p.num_tokens) * p.num_group_heads) return;  // whole warps leave together
  const int64_t n = item / p.num_group_heads;
  const int gi = static_cast<int>(item % p.num_group_heads);  // row of the group's stacked state
  const int h = p.heads[gi];
  const int64_t slot = p.slot_mapping[n];
  if (slot < 0) return;
  const int off = static_cast<int>(slot % p.block_size);
  uint8_t* block_row = p.cache + (slot / p.block_size) * p.sB + h * p.sH;
  uint8_t* row = block_row + off * p.sT;
  uint8_t* sink_row = off < p.sink.tokens ? block_row : nullptr;
  const int64_t so = static_cast<int64_t>(gi) * D;
  encode_one<D>(p.key, n * p.skn + h * p.skh, p.in_dtype, p.k, p.ks.sub ? p.ks.sub + so : nullptr,
                p.ks.fac ? p.ks.fac + so : nullptr, row, p.sC, xs[warp], cw[warp], cs[warp], lane, sink_row, p.sink, p.sT, off, 0);
  encode_one<D>(p.value, n * p.svn + h * p.svh, p.in_dtype, p.v, p.vs.sub ? p.vs.sub + so : nullptr,
                p.vs.fac ? p.vs.fac + so : nullptr, row + static_cast<int64_t>(p.value_offset) * p.sC, p.sC, xs[warp],
                cw[warp], cs[warp], lane, sink_row, p.sink, p.sT, off, 1);
  // Zero the padding so pages compare (and hash) byte for byte; the sink area belongs to the block, not to
  // this slot, and is left alone.
  const int s0 = p.sink.tokens ? p.sink.offset : p.slot_bytes, s1 = p.sink.tokens ? p.sink.offset + p.sink.bytes : 0;
  for (int b = p.pad_begin + lane; b < p.slot_bytes; b += kWarp)
    if (b < s0 || b >= s1) row[static_cast<int64_t>(b) * p.sC] = 0;
}

}  // namespace kvq

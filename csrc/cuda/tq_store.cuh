// TurboQuant quantize-on-write: one warp per (token, KV head) rotates, normalizes, quantizes and bit-packs
// K and V and writes the slot chosen by slot_mapping. Framework-agnostic (CUDA only).
#pragma once

#include "tq_common.cuh"

namespace kvq {

constexpr int kStoreWarps = 4;

// Encodes one vector of D coordinates into row[0 .. c.meta + 2). Lane l owns coordinates l, l + 32, ...
// (coalesced loads of x and of R^T's columns); codes meet in shared memory for packing.
template <int D>
__device__ void tq_encode_one(const void* x, int64_t base, DType t, const TqCodec& c, uint8_t* row, int64_t sC,
                              float* xs, uint8_t* cs, int lane) {
  constexpr int VPL = D / kWarp;
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int d = i * kWarp + lane;
    const float v = load_as_float(x, base + d, t);
    xs[d] = v;
    ss = fmaf(v, v, ss);
  }
  __syncwarp();
  const float norm = __fsqrt_rn(warp_sum(ss));
  const float safe = fmaxf(norm, 1e-30f);
  float y[VPL], cv[VPL];
  float c2 = 0.f, yc = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int d = i * kWarp + lane;
    float r = xs[d];
    if (c.rotate) {
      r = 0.f;
      for (int j = 0; j < D; ++j) r = fmaf(xs[j], c.rt[j * D + d], r);
    }
    y[i] = __fdiv_rn(r, safe);
    int q = 0;
    for (int j = 0; j < c.w - 1; ++j) q += y[i] > c.thr[d * c.w + j];  // torch.bucketize (right=False)
    cs[d] = static_cast<uint8_t>(q);
    cv[i] = c.cent[d * c.w + q];
    c2 = fmaf(cv[i], cv[i], c2);
    yc = fmaf(y[i], cv[i], yc);
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
    const int d0 = first ? 0 : c.n0;
    const int dend = first ? c.n0 : D;
    uint32_t byte = 0;
    for (int j = bit0 / nb; j <= (bit0 + 7) / nb && d0 + j < dend; ++j) {
      const int off = j * nb - bit0;
      const uint32_t v = cs[d0 + j];
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
  __shared__ uint8_t cs[kStoreWarps][D];
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kStoreWarps + warp;
  if (item >= static_cast<int64_t>(p.num_tokens) * p.num_group_heads) return;  // whole warps leave together
  const int64_t n = item / p.num_group_heads;
  const int h = p.heads[item % p.num_group_heads];
  const int64_t slot = p.slot_mapping[n];
  if (slot < 0) return;
  uint8_t* row = p.cache + (slot / p.block_size) * p.sB + h * p.sH + (slot % p.block_size) * p.sT;
  tq_encode_one<D>(p.key, n * p.skn + h * p.skh, p.in_dtype, p.k, row, p.sC, xs[warp], cs[warp], lane);
  tq_encode_one<D>(p.value, n * p.svn + h * p.svh, p.in_dtype, p.v, row + static_cast<int64_t>(p.value_offset) * p.sC,
                   p.sC, xs[warp], cs[warp], lane);
  for (int b = p.pad_begin + lane; b < p.slot_bytes; b += kWarp) row[static_cast<int64_t>(b) * p.sC] = 0;
}

}  // namespace kvq

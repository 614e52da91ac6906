// TurboQuant paged decode attention. One block per (sequence, KV head, context split); its warps stride
// over the context one token each. Every lane owns D/32 consecutive coordinates, unpacks their codes, and
// gathers centroids from shared memory; each token's K and V codes are read once for all G query heads of
// the KV head's group. Scores are (q_rot . centroids) * fp16 scale; values accumulate in the rotated domain
// with the scale folded into the probability, and the output is rotated back once (in the merge kernel when
// the context is split). Framework-agnostic (CUDA only).
#pragma once

#include <math_constants.h>

#include "tq_common.cuh"

namespace kvq {

constexpr int kDecodeWarps = 4;
constexpr int kSmemCodebook = 16;  // widths up to 16 (4-bit codes) live in shared memory

// out[g][i] = sum_j src[g][j] * R[j][i] with R = rt^T, i.e. y @ R: the inverse rotation.
template <int D>
__device__ void unrotate_store(const DecodeParams& p, const float* src, int G, int64_t token, int kvh) {
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int g = idx / D, i = idx % D;
    float o = src[g * D + i];
    if (p.v.rotate) {
      o = 0.f;
      for (int j = 0; j < D; ++j) o = fmaf(src[g * D + j], p.v.rt[i * D + j], o);
    }
    store_from_float(p.out, token * p.son + static_cast<int64_t>(kvh * G + g) * p.soh + i, p.dtype, o);
  }
}

template <int D, int MAX_G>
__global__ void __launch_bounds__(kDecodeWarps * kWarp) tq_decode_kernel(const DecodeParams p) {
  constexpr int VPL = D / kWarp;
  __shared__ float qs[MAX_G * D];
  __shared__ float kcb[D * kSmemCodebook];
  __shared__ float vcb[D * kSmemCodebook];
  __shared__ float red[kDecodeWarps][MAX_G * D];
  __shared__ float red_m[kDecodeWarps][MAX_G];
  __shared__ float red_l[kDecodeWarps][MAX_G];

  const int s = blockIdx.x;
  const int kvh = p.heads[blockIdx.y];
  const int split = blockIdx.z;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int G = p.group;
  const float* kc = p.k.w <= kSmemCodebook ? kcb : p.k.cent;
  const float* vc = p.v.w <= kSmemCodebook ? vcb : p.v.cent;
  if (p.k.w <= kSmemCodebook)
    for (int i = threadIdx.x; i < D * p.k.w; i += blockDim.x) kcb[i] = p.k.cent[i];
  if (p.v.w <= kSmemCodebook)
    for (int i = threadIdx.x; i < D * p.v.w; i += blockDim.x) vcb[i] = p.v.cent[i];

  const int q_start = p.query_start_loc[s];
  const int q_len = p.query_start_loc[s + 1] - q_start;
  const int ctx = p.seq_lens[s];
  const float qscale = p.scale * 1.4426950408889634f;  // softmax on exp2
  // Decode has one query token; a longer query (not what vLLM sends here) is handled token by token.
  for (int t = 0; t < q_len; ++t) {
    const int64_t qtok = q_start + t;
    const int kv_end = ctx - q_len + t + 1;
    const int lo = split * p.split_tokens;
    const int hi = min(kv_end, lo + p.split_tokens);
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
      const int g = idx / D, i = idx % D;
      red[0][idx] = load_as_float(p.query, qtok * p.sqn + static_cast<int64_t>(kvh * G + g) * p.sqh + i, p.dtype);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {  // q_rot = q @ R^T, once per token
      const int g = idx / D, i = idx % D;
      float r = red[0][idx];
      if (p.k.rotate) {
        r = 0.f;
        for (int j = 0; j < D; ++j) r = fmaf(red[0][g * D + j], p.k.rt[j * D + i], r);
      }
      qs[idx] = r * qscale;
    }
    __syncthreads();

    float m[MAX_G], l[MAX_G], acc[MAX_G][VPL];
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      m[g] = -CUDART_INF_F;
      l[g] = 0.f;
#pragma unroll
      for (int i = 0; i < VPL; ++i) acc[g][i] = 0.f;
    }
    for (int pos = lo + warp; pos < hi; pos += kDecodeWarps) {
      const int64_t blk = p.block_table[s * p.sbt + pos / p.block_size];
      const uint8_t* row = p.cache + blk * p.sB + kvh * p.sH + static_cast<int64_t>(pos % p.block_size) * p.sT;
      const uint8_t* vrow = row + static_cast<int64_t>(p.value_offset) * p.sC;
      float kv[VPL], vv[VPL];
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const int d = lane * VPL + i;
        kv[i] = kc[d * p.k.w + load_code(row, p.sC, p.k, d)];
        vv[i] = vc[d * p.v.w + load_code(vrow, p.sC, p.v, d)];
      }
      const float ks = load_f16(row + static_cast<int64_t>(p.k.meta) * p.sC, p.sC);
      const float vs = load_f16(vrow + static_cast<int64_t>(p.v.meta) * p.sC, p.sC);
#pragma unroll
      for (int g = 0; g < MAX_G; ++g) {
        if (g >= G) break;
        float sc = 0.f;
#pragma unroll
        for (int i = 0; i < VPL; ++i) sc = fmaf(qs[g * D + lane * VPL + i], kv[i], sc);
        sc = warp_sum(sc) * ks;
        const float m_new = fmaxf(m[g], sc);
        const float alpha = exp2f(m[g] - m_new);
        const float pr = exp2f(sc - m_new);
        l[g] = l[g] * alpha + pr;
        const float pv = pr * vs;
#pragma unroll
        for (int i = 0; i < VPL; ++i) acc[g][i] = fmaf(acc[g][i], alpha, pv * vv[i]);
        m[g] = m_new;
      }
    }
    __syncthreads();  // red[0] held the raw query
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      if (g >= G) break;
      if (lane == 0) {
        red_m[warp][g] = m[g];
        red_l[warp][g] = l[g];
      }
#pragma unroll
      for (int i = 0; i < VPL; ++i) red[warp][g * D + lane * VPL + i] = acc[g][i];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
      const int g = idx / D, i = idx % D;
      float mx = -CUDART_INF_F;
      for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, red_m[w][g]);
      float sum_l = 0.f, a = 0.f;
      if (mx != -CUDART_INF_F) {
        for (int w = 0; w < kDecodeWarps; ++w) {
          const float f = exp2f(red_m[w][g] - mx);
          sum_l += red_l[w][g] * f;
          a += red[w][idx] * f;
        }
      }
      if (p.num_splits == 1) {
        qs[idx] = a / fmaxf(sum_l, 1e-30f);
      } else {
        const int64_t r = (static_cast<int64_t>(split) * p.num_tokens + qtok) * p.num_q_heads + kvh * G + g;
        p.partial[r * D + i] = a;
        if (i == 0) {
          p.ml[2 * r] = mx;
          p.ml[2 * r + 1] = sum_l;
        }
      }
    }
    if (p.num_splits == 1) {
      __syncthreads();
      unrotate_store<D>(p, qs, G, qtok, kvh);
    }
  }
}

// Merges the splits of one (query token, KV head) and rotates the output back.
template <int D, int MAX_G>
__global__ void __launch_bounds__(kDecodeWarps * kWarp) tq_merge_kernel(const DecodeParams p) {
  __shared__ float o[MAX_G * D];
  const int64_t n = blockIdx.x;
  const int kvh = p.heads[blockIdx.y];
  const int G = p.group;
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int g = idx / D, i = idx % D;
    const int64_t head = kvh * G + g;
    float mx = -CUDART_INF_F;
    for (int j = 0; j < p.num_splits; ++j) mx = fmaxf(mx, p.ml[2 * ((j * p.num_tokens + n) * p.num_q_heads + head)]);
    float sum_l = 0.f, a = 0.f;
    if (mx != -CUDART_INF_F) {
      for (int j = 0; j < p.num_splits; ++j) {
        const int64_t r = (j * p.num_tokens + n) * p.num_q_heads + head;
        const float f = exp2f(p.ml[2 * r] - mx);
        sum_l += p.ml[2 * r + 1] * f;
        a += p.partial[r * D + i] * f;
      }
    }
    o[idx] = a / fmaxf(sum_l, 1e-30f);
  }
  __syncthreads();
  unrotate_store<D>(p, o, G, n, kvh);
}

}  // namespace kvq

// Paged decode attention over TurboQuant and FibQuant codes. One block per (sequence, KV head, chunk of the
// head's query heads, context split); its warps stride over the context one token each. Each token's K and
// V codes are read once for all query heads of the chunk (all G of the GQA group unless a FibQuant table
// forces smaller chunks).
// - TurboQuant keys: every lane owns D/32 consecutive coordinates, unpacks their codes and gathers centroids
//   from shared memory; a score is (q_rot . centroids) * fp16 scale.
// - FibQuant keys (product-quantization lookup): the block first builds, per query head, the table of the
//   rotated query's block inner products with every codeword (D/k x 2^L floats in dynamic shared memory); a
//   score is then a sum of D/k table entries picked by the codes, times the fp16 scale.
// - Values accumulate in the rotated domain with the fp16 scale folded into the probability (TurboQuant:
//   centroid per coordinate; FibQuant: the coordinate of its block's codeword), the output is rotated back
//   once (in the merge kernel when the context is split) and mapped through the value state (o * fac + sub).
// - Sink records: a block's first positions read bf16 rotated K and V from its sink area (scale 1).
// Framework-agnostic (CUDA only).
#pragma once

#include "../common/fibquant.h"
#include "tq_common.cuh"

namespace kvq {

constexpr int kDecodeWarps = 4;
constexpr int kSmemCodebook = 16;  // decode tables of up to D * 16 floats live in static shared memory

// out[g0 + g][i] = (sum_j src[g][j] * R[j][i]) * fac[i] + sub[i] with R = rt^T, i.e. y @ R: the inverse
// rotation, then the value codec's output transform for head slot gi of the group.
template <int D>
__device__ void unrotate_store(const DecodeParams& p, const float* src, int G, int g0, int64_t token, int kvh, int gi) {
  const float* fac = p.vs.fac ? p.vs.fac + static_cast<int64_t>(gi) * D : nullptr;
  const float* sub = p.vs.sub ? p.vs.sub + static_cast<int64_t>(gi) * D : nullptr;
  for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {
    const int g = idx / D, i = idx % D;
    float o = src[g * D + i];
    if (p.v.rotate) {
      o = 0.f;
      for (int j = 0; j < D; ++j) o = fmaf(src[g * D + j], p.v.rt[i * D + j], o);
    }
    if (fac != nullptr) o *= fac[i];
    if (sub != nullptr) o += sub[i];
    store_from_float(p.out, token * p.son + static_cast<int64_t>(kvh * p.group + g0 + g) * p.soh + i, p.dtype, o);
  }
}

// One token's step of the online softmax (exp2 domain) for one query head: score sc, value vv * vs.
template <int VPL>
__device__ __forceinline__ void online_update(float sc, float vs, const float (&vv)[VPL], float& m, float& l,
                                              float (&acc)[VPL]) {
  const float m_new = fmaxf(m, sc);
  const float alpha = exp2f(m - m_new);
  const float pr = exp2f(sc - m_new);
  l = l * alpha + pr;
  const float pv = pr * vs;
#pragma unroll
  for (int i = 0; i < VPL; ++i) acc[i] = fmaf(acc[i], alpha, pv * vv[i]);
  m = m_new;
}

template <int D, int MAX_G, bool KFIB>
__device__ __forceinline__ void decode_body(const DecodeParams& p) {
  constexpr int VPL = D / kWarp;
  __shared__ float qs[MAX_G * D];
  __shared__ float kcb[KFIB ? 1 : D * kSmemCodebook];
  __shared__ float vcb[D * kSmemCodebook];
  __shared__ float red[kDecodeWarps][MAX_G * D];
  __shared__ float red_m[kDecodeWarps][MAX_G];
  __shared__ float red_l[kDecodeWarps][MAX_G];

  const int s = blockIdx.x;
  const int gi = blockIdx.y / p.head_chunks;  // head slot in the group: row of the stacked state
  const int g0 = (blockIdx.y % p.head_chunks) * p.chunk_heads;
  const int kvh = p.heads[gi];
  const int split = blockIdx.z;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int G = min(p.chunk_heads, p.group - g0);  // query heads of this block: kvh * group + g0 + [0, G)
  if (G <= 0) return;
  const bool k_smem = !KFIB && table_floats(p.k, D) <= D * kSmemCodebook;
  const bool v_smem = table_floats(p.v, D) <= D * kSmemCodebook;
  const float* kc = k_smem ? kcb : p.k.tab0;
  const float* vc = v_smem ? vcb : p.v.tab0;
  if (k_smem)
    for (int i = threadIdx.x; i < table_floats(p.k, D); i += blockDim.x) kcb[i] = p.k.tab0[i];
  if (v_smem)
    for (int i = threadIdx.x; i < table_floats(p.v, D); i += blockDim.x) vcb[i] = p.v.tab0[i];
  const float* kfac = p.ks.fac ? p.ks.fac + static_cast<int64_t>(gi) * D : nullptr;
  float* tab = dynamic_smem();  // KFIB: (G, M, W) score table
  const int M = p.k.n0, W = p.k.w, KB = p.k.block;

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
    for (int idx = threadIdx.x; idx < G * D; idx += blockDim.x) {  // the key codec's query transform: * fac
      const int g = idx / D, i = idx % D;
      const float q = load_as_float(p.query, qtok * p.sqn + static_cast<int64_t>(kvh * p.group + g0 + g) * p.sqh + i,
                                    p.dtype);
      red[0][idx] = kfac != nullptr ? q * kfac[i] : q;
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
    if (KFIB) {  // tab[(g * M + j) * W + w] = <q_rot[g] block j, codeword w>, one entry per thread and step
      for (int idx = threadIdx.x; idx < G * M * W; idx += blockDim.x) {
        const int w = idx % W, j = (idx / W) % M, g = idx / (W * M);
        // fibquant.h's table for one block (D = K) and one codeword (W = 1): the entry itself
        fib_query_table(qs + g * D + j * KB, KB, KB, p.k.tab0 + static_cast<int64_t>(w) * KB, 1, tab + idx);
      }
      __syncthreads();
    }

    float m[MAX_G], l[MAX_G], acc[MAX_G][VPL];
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
      m[g] = -CUDART_INF_F;
      l[g] = 0.f;
#pragma unroll
      for (int i = 0; i < VPL; ++i) acc[g][i] = 0.f;
    }
    for (int pos = lo + warp; pos < hi; pos += kDecodeWarps) {
      const int off = pos % p.block_size;
      const int64_t blk = p.block_table[s * p.sbt + pos / p.block_size];
      const uint8_t* block_row = p.cache + blk * p.sB + kvh * p.sH;
      const uint8_t* row = block_row + static_cast<int64_t>(off) * p.sT;
      const uint8_t* vrow = row + static_cast<int64_t>(p.value_offset) * p.sC;
      const bool sink = off < p.sink.tokens;  // the whole warp reads one token: a uniform branch
      float kv[VPL], vv[VPL], ks = 1.f, vs = 1.f;
      int kidx[VPL];  // KFIB: codes of blocks lane, lane + 32, ... (at most D / 32 per lane)
      if (sink) {
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
          kv[i] = load_sink(block_row, p.sT, p.sC, p.sink, off, 0, lane * VPL + i, D);
          vv[i] = load_sink(block_row, p.sT, p.sC, p.sink, off, 1, lane * VPL + i, D);
        }
      } else {
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
          const int d = lane * VPL + i;
          if (!KFIB) kv[i] = code_value(row, p.sC, p.k, kc, d);
          vv[i] = code_value(vrow, p.sC, p.v, vc, d);
          if (KFIB) kidx[i] = lane + i * kWarp < M ? load_code(row, p.sC, p.k, lane + i * kWarp) : 0;
        }
        ks = load_f16(row + static_cast<int64_t>(p.k.meta) * p.sC, p.sC);
        vs = load_f16(vrow + static_cast<int64_t>(p.v.meta) * p.sC, p.sC);
      }
      if (KFIB && !sink) {  // two loops, so the codes and the decoded keys are never live together
#pragma unroll
        for (int g = 0; g < MAX_G; ++g) {
          if (g >= G) break;
          float sc = 0.f;
#pragma unroll
          for (int i = 0; i < VPL; ++i)
            if (lane + i * kWarp < M) sc += tab[(g * M + lane + i * kWarp) * W + kidx[i]];
          online_update<VPL>(warp_sum(sc) * ks, vs, vv, m[g], l[g], acc[g]);
        }
      } else {
#pragma unroll
        for (int g = 0; g < MAX_G; ++g) {
          if (g >= G) break;
          float sc = 0.f;
#pragma unroll
          for (int i = 0; i < VPL; ++i) sc = fmaf(qs[g * D + lane * VPL + i], kv[i], sc);
          online_update<VPL>(warp_sum(sc) * ks, vs, vv, m[g], l[g], acc[g]);
        }
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
        const int64_t r = (static_cast<int64_t>(split) * p.num_tokens + qtok) * p.num_q_heads + kvh * p.group + g0 + g;
        p.partial[r * D + i] = a;
        if (i == 0) {
          p.ml[2 * r] = mx;
          p.ml[2 * r + 1] = sum_l;
        }
      }
    }
    if (p.num_splits == 1) {
      __syncthreads();
      unrotate_store<D>(p, qs, G, g0, qtok, kvh, gi);
    }
  }
}

// Two entry points, so each gets its own register budget: ptxas spills the FibQuant variant under the plain
// bound (its 128-thread blocks are limited to two per SM by the shared table anyway).
template <int D, int MAX_G>
__global__ void __launch_bounds__(kDecodeWarps * kWarp) tq_decode_kernel(const DecodeParams p) {
  decode_body<D, MAX_G, false>(p);
}

template <int D, int MAX_G>
__global__ void __launch_bounds__(kDecodeWarps * kWarp, 2) fib_decode_kernel(const DecodeParams p) {
  decode_body<D, MAX_G, true>(p);
}

// Merges the splits of one (query token, KV head) for all its query heads and rotates the output back.
template <int D, int MAX_G>
__global__ void __launch_bounds__(kDecodeWarps * kWarp) tq_merge_kernel(const DecodeParams p) {
  __shared__ float o[MAX_G * D];
  const int64_t n = blockIdx.x;
  const int gi = blockIdx.y;
  const int kvh = p.heads[gi];
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
  unrotate_store<D>(p, o, G, 0, n, kvh, gi);
}

}  // namespace kvq

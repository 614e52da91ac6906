// Host launchers of the CUDA store and decode kernels (framework-agnostic: raw pointers and a stream).
// Shapes these kernels do not cover are refused with cudaErrorInvalidValue so the caller can fall back.
#include "tq_decode.cuh"
#include "tq_params.h"
#include "tq_store.cuh"

namespace kvq {

namespace {

bool codec_ok(const TqCodec& c, int head_dim) {
  if (c.tab0 == nullptr || c.tab1 == nullptr || (c.rotate && c.rt == nullptr) || c.w < 2) return false;
  if (c.kind == kKindFibQuant)  // one segment of head_dim / block indices of up to 12 bits, w == 2**bits
    return c.block >= 1 && head_dim % c.block == 0 && c.n0 == head_dim / c.block && c.b0 >= 1 && c.b0 <= 12 &&
           c.b1 == c.b0 && c.w == (1 << c.b0) && c.seg1 == c.meta;
  return c.kind == kKindTurboQuant && c.block == 1 && c.b0 >= 1 && c.b0 <= 8 && c.b1 >= 1 && c.b1 <= 8 &&
         c.n0 > 0 && c.n0 <= head_dim;
}

bool sinks_ok(const Sinks& s, int head_dim, int block_size) {
  // Every record byte must land inside the block's area: tokens * 4D <= T * bytes.
  return s.tokens == 0 || (s.tokens > 0 && s.tokens <= block_size && s.bytes > 0 && s.offset >= 0 &&
                           static_cast<int64_t>(s.tokens) * 4 * head_dim <= static_cast<int64_t>(block_size) * s.bytes);
}

// Raises a kernel's dynamic shared memory limit once per size (a host call, made by the eager warm-up run
// before any CUDA-graph capture).
template <class K>
cudaError_t allow_smem(K kernel, int64_t bytes, int64_t& allowed) {
  if (bytes <= 48 * 1024 || bytes <= allowed) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) allowed = bytes;
  return err;
}

template <int D, int MAX_G, bool KFIB>
cudaError_t launch_decode_kernel(const DecodeParams& p, int64_t smem, cudaStream_t stream) {
  static int64_t allowed = 0;
  const auto kernel = KFIB ? fib_decode_kernel<D, MAX_G> : tq_decode_kernel<D, MAX_G>;
  const cudaError_t err = allow_smem(kernel, smem, allowed);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.num_seqs, p.num_group_heads * p.head_chunks, p.num_splits);
  kernel<<<grid, kDecodeWarps * kWarp, smem, stream>>>(p);
  return cudaGetLastError();
}

template <int D, bool KFIB>
cudaError_t launch_decode(const DecodeParams& p, int64_t smem, cudaStream_t stream) {
  cudaError_t err = p.chunk_heads <= 4 ? launch_decode_kernel<D, 4, KFIB>(p, smem, stream)
                                       : launch_decode_kernel<D, 8, KFIB>(p, smem, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const dim3 merge_grid(p.num_tokens, p.num_group_heads);
  if (p.group <= 4)
    tq_merge_kernel<D, 4><<<merge_grid, kDecodeWarps * kWarp, 0, stream>>>(p);
  else
    tq_merge_kernel<D, 8><<<merge_grid, kDecodeWarps * kWarp, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool tq_decode_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group >= 1 && group <= 8;
}

cudaError_t tq_store(const StoreParams& p, cudaStream_t stream) {
  if ((p.head_dim != 64 && p.head_dim != 128) || !codec_ok(p.k, p.head_dim) || !codec_ok(p.v, p.head_dim) ||
      !sinks_ok(p.sink, p.head_dim, p.block_size))
    return cudaErrorInvalidValue;
  const int64_t items = static_cast<int64_t>(p.num_tokens) * p.num_group_heads;
  if (items == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((items + kStoreWarps - 1) / kStoreWarps));
  if (p.head_dim == 64)
    tq_store_kernel<64><<<grid, kStoreWarps * kWarp, 0, stream>>>(p);
  else
    tq_store_kernel<128><<<grid, kStoreWarps * kWarp, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t tq_decode(const DecodeParams& params, cudaStream_t stream) {
  DecodeParams p = params;
  const int64_t smem = decode_plan(p);
  if (!tq_decode_supported(p.head_dim, p.group) || !codec_ok(p.k, p.head_dim) || !codec_ok(p.v, p.head_dim) ||
      !sinks_ok(p.sink, p.head_dim, p.block_size) || smem < 0 || p.num_splits < 1 ||
      (p.num_splits > 1 && (p.partial == nullptr || p.ml == nullptr)))
    return cudaErrorInvalidValue;
  if (p.num_seqs == 0 || p.num_tokens == 0) return cudaSuccess;
  const bool fib = p.k.kind == kKindFibQuant;
  if (p.head_dim == 64) return fib ? launch_decode<64, true>(p, smem, stream) : launch_decode<64, false>(p, smem, stream);
  return fib ? launch_decode<128, true>(p, smem, stream) : launch_decode<128, false>(p, smem, stream);
}

}  // namespace kvq

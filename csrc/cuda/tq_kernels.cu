// Host launchers of the TurboQuant CUDA kernels (framework-agnostic: raw pointers and a stream). Shapes
// these kernels do not cover are refused with cudaErrorInvalidValue so the caller can fall back.
#include "tq_decode.cuh"
#include "tq_params.h"
#include "tq_store.cuh"

namespace kvq {

namespace {

bool codec_ok(const TqCodec& c, int head_dim) {
  return c.b0 >= 1 && c.b0 <= 8 && c.b1 >= 1 && c.b1 <= 8 && c.n0 > 0 && c.n0 <= head_dim && c.w >= 2 &&
         c.cent != nullptr && c.thr != nullptr && (!c.rotate || c.rt != nullptr);
}

template <int D>
cudaError_t launch_decode(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_seqs, p.num_group_heads, p.num_splits);
  const dim3 merge_grid(p.num_tokens, p.num_group_heads);
  if (p.group <= 4) {
    tq_decode_kernel<D, 4><<<grid, kDecodeWarps * kWarp, 0, stream>>>(p);
    if (p.num_splits > 1) tq_merge_kernel<D, 4><<<merge_grid, kDecodeWarps * kWarp, 0, stream>>>(p);
  } else {
    tq_decode_kernel<D, 8><<<grid, kDecodeWarps * kWarp, 0, stream>>>(p);
    if (p.num_splits > 1) tq_merge_kernel<D, 8><<<merge_grid, kDecodeWarps * kWarp, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

bool tq_decode_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group >= 1 && group <= 8;
}

cudaError_t tq_store(const StoreParams& p, cudaStream_t stream) {
  if ((p.head_dim != 64 && p.head_dim != 128) || !codec_ok(p.k, p.head_dim) || !codec_ok(p.v, p.head_dim))
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

cudaError_t tq_decode(const DecodeParams& p, cudaStream_t stream) {
  if (!tq_decode_supported(p.head_dim, p.group) || !codec_ok(p.k, p.head_dim) || !codec_ok(p.v, p.head_dim) ||
      p.num_splits < 1 || (p.num_splits > 1 && (p.partial == nullptr || p.ml == nullptr)))
    return cudaErrorInvalidValue;
  if (p.num_seqs == 0 || p.num_tokens == 0) return cudaSuccess;
  return p.head_dim == 64 ? launch_decode<64>(p, stream) : launch_decode<128>(p, stream);
}

}  // namespace kvq

// Launch parameters of the TurboQuant CUDA kernels: plain structs and launcher prototypes, no framework
// types, so the torch binding (torch_bindings.cpp) and any other host can fill them.
//
// Layout conventions are those of vllm_kvq (see vllm_kvq/kv_format.py and vllm_kvq/codecs/packing.py):
// the cache is a (B blocks, Hk heads, T tokens, C slot bytes) uint8 view with arbitrary strides; a slot is
// [K codes | K fp16 scale | V codes | V fp16 scale | zero padding]. Code j of a b-bit segment starts at bit
// j * b of that segment, little-endian.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace kvq {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One TurboQuant codec: up to two code segments (fractional rates), fp16 scale at byte `meta`.
struct TqCodec {
  int b0, n0;       // bits and coordinates of segment 0
  int b1;           // bits of segment 1 (coordinates n0 .. head_dim); == b0 when there is one segment
  int seg1;         // byte offset of segment 1
  int meta;         // byte offset of the fp16 scale
  int w;            // centroid-table width, 2**max(b0, b1)
  int rotate;       // 0: identity rotation
  int scale_mode;   // 0 norm, 1 corrected, 2 lsq
  const float* rt;  // (D, D) R^T: x @ R^T rotates a row
  const float* cent;  // (D, w) centroid of code j at coordinate i
  const float* thr;   // (D, w) thresholds, +inf past each segment's 2**b - 1 entries
};

struct StoreParams {
  const void* key;  // (N, Hk, D)
  const void* value;
  int64_t skn, skh, svn, svh;  // element strides (last dim contiguous)
  DType in_dtype;
  uint8_t* cache;
  int64_t sB, sH, sT, sC;  // byte strides of the cache view
  const int64_t* slot_mapping;  // (N,) slot = block * T + offset; < 0 = padding
  const int32_t* heads;         // (gh,) KV heads of this head group
  int num_group_heads;
  int num_tokens;
  int block_size;
  int head_dim;
  int value_offset;  // K nbytes
  int pad_begin;     // K nbytes + V nbytes
  int slot_bytes;
  TqCodec k, v;
};

struct DecodeParams {
  const void* query;  // (N, Hq, D)
  int64_t sqn, sqh;
  void* out;  // (N, Hq, D), query's dtype
  int64_t son, soh;
  DType dtype;
  const uint8_t* cache;
  int64_t sB, sH, sT, sC;
  const int32_t* block_table;  // (S, max_blocks)
  int64_t sbt;
  const int32_t* seq_lens;         // (S,)
  const int32_t* query_start_loc;  // (S + 1,)
  const int32_t* heads;            // (gh,)
  int num_group_heads;
  int num_seqs;
  int num_tokens;
  int num_q_heads;
  int group;  // query heads per KV head
  int block_size;
  int head_dim;
  int value_offset;
  float scale;  // softmax scale
  int num_splits;
  int split_tokens;
  float* partial;  // (num_splits, N, Hq, D) when num_splits > 1
  float* ml;       // (num_splits, N, Hq, 2)
  TqCodec k, v;
};

// Both return cudaErrorInvalidValue for shapes they do not handle (head_dim not 64/128, group > 8), so
// callers fall back to another implementation.
cudaError_t tq_store(const StoreParams& p, cudaStream_t stream);
cudaError_t tq_decode(const DecodeParams& p, cudaStream_t stream);
bool tq_decode_supported(int head_dim, int group);

}  // namespace kvq

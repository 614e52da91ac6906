// Launch parameters of the CUDA store and decode kernels: plain structs and launcher prototypes, no framework
// types, so the torch binding (torch_bindings.cpp) and any other host can fill them.
//
// Layout conventions are those of vllm_kvq (see vllm_kvq/kv_format.py and vllm_kvq/codecs/packing.py):
// the cache is a (B blocks, Hk heads, T tokens, C slot bytes) uint8 view with arbitrary strides; a slot is
// [K codes | K fp16 scale | V codes | V fp16 scale | zero padding][sink area][padding]. Code j of a b-bit
// segment starts at bit j * b of that segment, little-endian.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace kvq {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum CodecKind : int { kKindTurboQuant = 0, kKindFibQuant = 1 };

// One codec. Both kinds are "rotate, normalize, code, one fp16 scale"; they differ in what a code indexes.
// TurboQuant: code j is coordinate j's Lloyd-Max cell, up to two segments (fractional rates), block == 1.
// FibQuant: code j (b0 == b1 index bits, n0 == D / block codes, one segment) is the index of rotated
// coordinates [j * block, (j + 1) * block) in one shared codebook of w codewords of block coordinates.
struct TqCodec {
  int b0, n0;       // bits and number of codes of segment 0
  int b1;           // bits of segment 1 (codes n0 .. ); == b0 when there is one segment
  int seg1;         // byte offset of segment 1
  int meta;         // byte offset of the fp16 scale
  int w;            // table width: centroids per coordinate (TurboQuant) or codewords (FibQuant)
  int rotate;       // 0: identity rotation
  int scale_mode;   // 0 norm, 1 corrected, 2 lsq
  int kind;         // CodecKind
  int block;        // coordinates per code (1 for TurboQuant)
  const float* rt;  // (D, D) R^T: x @ R^T rotates a row
  const float* tab0;  // TurboQuant: (D, w) centroid of code j at coordinate i; FibQuant: (w, block) codewords
  const float* tab1;  // TurboQuant: (D, w) thresholds, +inf past each segment's 2**b - 1; FibQuant: (w,)
                      // half squared norms of the codewords (the nearest-codeword criterion)
};

// Per-head state of one side of a head group (vllm_kvq/codecs/base.py): rows of (gh, D) float32 tensors
// stacked in the group's head order, or null when unbound. Stored bytes are encode((x - sub) / fac);
// attention multiplies queries by the key's fac and maps each output row o to o * fac + sub.
struct SideState {
  const float* sub;
  const float* fac;
};

// Sink records (vllm_kvq/kv_format.py): the first `tokens` positions of every block also keep bf16 rotated
// K ++ V (4 * D bytes each) in a per-block area of `bytes` bytes at byte `offset` of each of its T slots.
struct Sinks {
  int tokens;  // 0: no sink area
  int offset;
  int bytes;
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
  SideState ks, vs;
  Sinks sink;
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
  SideState ks, vs;  // ks.sub is never read (a key shift moves all of a query's scores equally)
  Sinks sink;
  int head_chunks;  // filled by decode_plan: each KV head's query heads are split over this many blocks
  int chunk_heads;  // ... of at most this many query heads each
};

// Shared memory a decode block may give the FibQuant score table (one float per (query head, code,
// codeword)): two blocks per SM fit beside the kernel's static arrays; one query head's table may take the
// larger single-head limit (one block per SM). vllm_kvq/kernels/cuda.py declines formats above it.
constexpr int kFibTableBudget = 64 * 1024;
constexpr int kFibTableMaxBytes = 160 * 1024;

// Bytes of one query head's FibQuant score table (0 for TurboQuant keys).
inline int64_t fib_table_bytes(const TqCodec& k) {
  return k.kind == kKindFibQuant ? static_cast<int64_t>(k.n0) * k.w * static_cast<int64_t>(sizeof(float)) : 0;
}

// Fills head_chunks / chunk_heads and returns the dynamic shared memory a decode block needs (-1 when the
// key codec's table does not fit). TurboQuant keys: one chunk of all G query heads, no dynamic memory.
inline int64_t decode_plan(DecodeParams& p) {
  const int64_t per_head = fib_table_bytes(p.k);
  if (per_head == 0) {
    p.head_chunks = 1;
    p.chunk_heads = p.group;
    return 0;
  }
  if (per_head > kFibTableMaxBytes) return -1;
  int most = static_cast<int>(kFibTableBudget / per_head);
  most = most < 1 ? 1 : most;
  p.head_chunks = (p.group + most - 1) / most;
  p.chunk_heads = (p.group + p.head_chunks - 1) / p.head_chunks;  // balanced chunks
  return per_head * p.chunk_heads;
}

// Both return cudaErrorInvalidValue for shapes they do not handle (head_dim not 64/128, group > 8, a table
// too large), so callers fall back to another implementation.
cudaError_t tq_store(const StoreParams& p, cudaStream_t stream);
cudaError_t tq_decode(const DecodeParams& p, cudaStream_t stream);
bool tq_decode_supported(int head_dim, int group);

}  // namespace kvq

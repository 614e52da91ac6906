// Framework-free interface between the torch binding (torch_bindings.cpp) and the per-ISA kernel builds
// (kernels_avx512.cpp, kernels_avx2.cpp, kernels_portable.cpp, all compiled from kernels_impl.h). Plain structs of pointers
// and strides, so the ISA translation units include no torch headers.
#pragma once

#include <atomic>
#include <cstdint>

#include "../common/codec_desc.h"

namespace kvq {
namespace cpu {

// Context tiles that decode items took through the register-fused decode (decode_fused.h), summed over the
// builds and threads (relaxed; one add per item): a debug count, so tests can tell that the fused path ran
// where it should (it gives the general path's bits, so outputs cannot tell). Defined in torch_bindings.cpp.
extern std::atomic<int64_t> fused_decode_tiles;

enum InDType : int { kF32 = 0, kF16 = 1, kBF16In = 2 };

// The per-block sink area (vllm_kvq/kv_format.py): the record of the token at block offset j < tokens is
// bf16(R_K k') ++ bf16(R_V v') (4 D bytes); its byte b sits at area offset o = j * 4D + b, i.e. in slot
// o / bytes of the block at slot byte offset + o % bytes. tokens == 0: no sinks.
struct Sinks {
  int tokens, offset, bytes;
};

struct StoreArgs {
  const void* key;  // (N, Hk, D), last dim contiguous
  const void* value;
  int dtype;  // InDType of key and value
  int64_t skn, skh, svn, svh;
  uint8_t* cache;  // (B, Hk, T, C) bytes, any strides
  int64_t sB, sH, sT, sC;
  const int64_t* slots;  // (N,) slot = block * T + offset; < 0 skipped
  const int32_t* heads;  // (gh,) KV heads of this head group
  int gh;
  int block_size;
  int slot_bytes;
  int value_offset;  // K nbytes
  int pad_begin;     // K nbytes + V nbytes: bytes [pad_begin, slot_bytes) are zeroed, the sink area aside
  const float* k_shift;  // (Hk, D) or null: stored keys are (k - k_shift) / k_scale
  const float* k_scale;
  const float* v_shift;  // stored values are (v - v_shift) / v_scale
  const float* v_scale;
  Sinks sinks;
  CodecDesc k, v;
};

// One unit of attention work: KV head heads[hslot] of sequence seq, query tokens [q0, q1) (absolute rows of
// the query tensor) against context tokens [c0, c1). split < 0: the item covers the whole context and writes
// the output; otherwise it writes its partial softmax state to the split workspace.
struct WorkItem {
  int32_t seq, hslot, q0, q1, c0, c1, split;
};

struct AttnArgs {
  const void* query;  // (N, Hq, D), last dim contiguous
  int dtype;          // InDType of query and out
  int64_t sqn, sqh;
  void* out;
  int64_t son, soh;
  const uint8_t* cache;
  int64_t sB, sH, sT, sC;
  const int32_t* block_table;  // (S, max_blocks)
  int64_t sbt;
  const int32_t* seq_lens;  // (S,)
  const int32_t* qsl;       // (S + 1,)
  const int32_t* heads;
  int gh;
  int group;  // query heads per KV head
  int block_size;
  int head_dim;
  int value_offset;
  float scale;
  const float* k_scale;  // (Hk, D) or null: queries are multiplied by it
  const float* v_shift;  // (Hk, D) or null: output rows are o * v_scale + v_shift
  const float* v_scale;  // (Hk, D) or null
  // Position-aware key centring (key_bias.h), or null: query row (t, qh) adds bias_q[t, qh] . bias_table[p]
  // to its score of the key at position p.
  const float* bias_q;  // (N, Hq, D), last dim contiguous, times the softmax scale
  int64_t sbq_n, sbq_h;
  const float* bias_table;  // (P, D) contiguous, P >= every context length + 15: [cos(p f), sin(p f), 0...]
  int bias_half;            // h: rotate-half pairs (the table's nonzero columns are 2h)
  const float* bias_et;     // (2h, 16), 64-byte aligned: table rows 0..15 transposed
  Sinks sinks;
  int lut_from;  // decode items over >= this many context tokens score FibQuant keys by table lookups
                 // and sum FibQuant values as codeword histograms (< 0: never)
  int num_tokens;
  int num_q_heads;
  // 1: a query row at position p attends positions j < p only (exact_self: vllm_kvq.ops merges its own
  // token exactly); a row left with no key gets output 0 and lse -inf. 0: j <= p.
  int exclude_self;
  float* lse;  // (N, Hq), heads contiguous, or null: each row's log-sum-exp of the scores it attended
  int64_t slse_n;
  // 1: decode items take the general path (tiles decoded to float in memory) where the register-fused one
  // (decode_fused.h) would run; a debug knob, so tests can compare the two bit for bit.
  int general_decode;
  float* partial;  // (splits, N, Hq, D) when splitting
  float* ml;       // (splits, N, Hq, 2): running max and normalizer
  CodecDesc k, v;
};

#define KVQ_DECLARE_ISA(isa)                                                                  \
  namespace isa {                                                                             \
  void store_range(const StoreArgs& a, int64_t begin, int64_t end);                           \
  void attend_item(const AttnArgs& a, const WorkItem& w);                                     \
  void merge_splits(const AttnArgs& a, int splits, const int32_t* rows, int64_t begin, int64_t end); \
  void decode_context(const AttnArgs& a, int s, int hslot, int c0, int c1, float* kout, float* vout); \
  bool supports(const CodecDesc& k, const CodecDesc& v, int head_dim);                        \
  bool fused_decode(const CodecDesc& k, const CodecDesc& v);                                  \
  }

constexpr int kMaxBiasHalf = 256;  // rotate-half pairs key centring supports (head size <= 512)

KVQ_DECLARE_ISA(portable)
KVQ_DECLARE_ISA(avx512)
KVQ_DECLARE_ISA(avx2)

#undef KVQ_DECLARE_ISA

}  // namespace cpu
}  // namespace kvq

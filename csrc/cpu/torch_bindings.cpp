// torch.library registration of the CPU kernels as vllm_kvq_cpu::store and vllm_kvq_cpu::paged_attention,
// the run-time ISA choice (AVX-512 when the CPU has it, else AVX2, else portable C++) and the work split over threads
// (at::parallel_for, so the kernels run on the OpenMP threads vLLM-CPU binds). Shapes are validated in
// Python (vllm_kvq/kernels/cpu.py); here only what the kernels would silently misread is checked.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <vector>

#include "../common/fibquant.h"
#include "kernels.h"

namespace {

using kvq::CodecDesc;
using kvq::cpu::AttnArgs;
using kvq::cpu::StoreArgs;
using kvq::cpu::WorkItem;

enum Isa : int64_t { kBest = 0, kPortable = 1, kAvx512 = 2, kAvx2 = 3 };

bool cpu_has_avx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  }();
  return has;
}

// AVX2 + FMA + F16C: every x86-64 CPU since Haswell / Zen 1 (the portable code compiled for it).
bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi2");
  }();
  return has;
}

Isa best() { return cpu_has_avx512() ? kAvx512 : cpu_has_avx2() ? kAvx2 : kPortable; }

// The build to run: the requested one (checked against the CPU), or the best this CPU has. ``simd_ok``: the
// AVX-512 build takes the codecs (it declines some; the AVX2 and portable builds take every codec).
Isa resolve(int64_t isa, bool simd_ok = true) {
  TORCH_CHECK(isa == kBest || isa == kPortable || isa == kAvx512 || isa == kAvx2, "vllm_kvq_cpu: isa must be 0 "
              "(best), 1 (portable), 2 (avx512) or 3 (avx2), got ", isa);
  TORCH_CHECK(isa != kAvx512 || cpu_has_avx512(), "vllm_kvq_cpu: isa=avx512 requested but this CPU lacks AVX-512");
  TORCH_CHECK(isa != kAvx2 || cpu_has_avx2(), "vllm_kvq_cpu: isa=avx2 requested but this CPU lacks AVX2/FMA/F16C");
  Isa which = isa == kBest ? best() : static_cast<Isa>(isa);
  if (which == kAvx512 && !simd_ok) which = cpu_has_avx2() ? kAvx2 : kPortable;
  return which;
}

// Calls kvq::cpu::<isa>::fn(args...) for the build ``which``.
#define KVQ_DISPATCH(which, fn, ...)                  \
  do {                                                \
    switch (which) {                                  \
      case kAvx512: kvq::cpu::avx512::fn(__VA_ARGS__); break; \
      case kAvx2: kvq::cpu::avx2::fn(__VA_ARGS__); break;     \
      default: kvq::cpu::portable::fn(__VA_ARGS__); break;    \
    }                                                 \
  } while (0)

bool has_isa(int64_t isa) {
  switch (isa) {
    case kBest: case kPortable: return true;
    case kAvx512: return cpu_has_avx512();
    case kAvx2: return cpu_has_avx2();
    default: return false;
  }
}

std::string best_isa() {
  switch (best()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "portable";
  }
}

int dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kvq::cpu::kF32;
    case at::kHalf: return kvq::cpu::kF16;
    case at::kBFloat16: return kvq::cpu::kBF16In;
    default: TORCH_CHECK(false, "vllm_kvq_cpu: expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

const float* table_ptr(const at::Tensor& t, int64_t need, const char* what) {
  if (need == 0) return nullptr;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() >= need,
              "vllm_kvq_cpu: codec table ", what, " must be a contiguous CPU float32 tensor of >= ", need,
              " elements, got ", t.scalar_type(), " ", t.sizes());
  return t.data_ptr<float>();
}

// spec = [kind, dim, nbytes, b0, n0, b1, seg1, meta, gs, smode, rotation]; tables = [cent0, cent1, thr0,
// thr1, signs, matrix] (vllm_kvq/kernels/cpu.py: codec_args).
CodecDesc codec_of(at::IntArrayRef spec, at::TensorList tabs) {
  TORCH_CHECK(spec.size() == 11 && tabs.size() == 6, "vllm_kvq_cpu: codec spec needs 11 ints and 6 tables, got ",
              spec.size(), " and ", tabs.size());
  CodecDesc c{};
  c.kind = static_cast<int>(spec[0]);
  c.dim = static_cast<int>(spec[1]);
  c.nbytes = static_cast<int>(spec[2]);
  c.b0 = static_cast<int>(spec[3]);
  c.n0 = static_cast<int>(spec[4]);
  c.b1 = static_cast<int>(spec[5]);
  c.seg1 = static_cast<int>(spec[6]);
  c.meta = static_cast<int>(spec[7]);
  c.gs = static_cast<int>(spec[8]);
  c.smode = static_cast<int>(spec[9]);
  TORCH_CHECK(c.kind >= kvq::kTurboQuant && c.kind <= kvq::kFibQuant, "vllm_kvq_cpu: unknown codec kind ", c.kind);
  TORCH_CHECK(c.dim > 0 && c.dim <= 1024, "vllm_kvq_cpu: head size ", c.dim, " out of range");
  const bool tq = c.kind == kvq::kTurboQuant;
  if (tq || c.kind == kvq::kUniform) {
    TORCH_CHECK(c.b0 >= 1 && c.b0 <= 8 && c.b1 >= 1 && c.b1 <= 8 && c.n0 >= 1 && c.n0 <= c.dim,
                "vllm_kvq_cpu: bad code segments");
  }
  if (c.kind == kvq::kUniform) TORCH_CHECK(c.gs > 0 && c.dim % c.gs == 0, "vllm_kvq_cpu: bad uniform group size");
  const bool fib = c.kind == kvq::kFibQuant;
  if (fib) {  // b0 = index bits L, n0 = block size K (codec_desc.h)
    TORCH_CHECK(c.b0 >= 1 && c.b0 <= kvq::kFibMaxIndexBits && c.n0 >= 1 && c.dim % c.n0 == 0 &&
                    c.meta == (c.dim / c.n0 * c.b0 + 7) / 8 && c.nbytes == c.meta + 2,
                "vllm_kvq_cpu: bad FibQuant layout (index bits ", c.b0, ", block ", c.n0, ", head size ", c.dim, ")");
  }
  c.cent0 = table_ptr(tabs[0], tq ? (1 << c.b0) : (fib ? (int64_t{1} << c.b0) * c.n0 : 0), "cent0");
  c.cent1 = table_ptr(tabs[1], tq ? (1 << c.b1) : 0, "cent1");
  c.thr0 = table_ptr(tabs[2], tq ? (1 << c.b0) - 1 : (fib ? (1 << c.b0) : 0), "thr0");
  c.thr1 = table_ptr(tabs[3], tq ? (1 << c.b1) - 1 : 0, "thr1");
  c.rot.kind = static_cast<int>(spec[10]);
  c.rot.dim = c.dim;
  TORCH_CHECK(c.rot.kind >= kvq::kRotIdentity && c.rot.kind <= kvq::kRotDense, "vllm_kvq_cpu: unknown rotation");
  c.rot.signs = table_ptr(tabs[4], c.rot.kind == kvq::kRotHadamard ? c.dim : 0, "signs");
  c.rot.mat = table_ptr(tabs[5], c.rot.kind == kvq::kRotDense ? static_cast<int64_t>(c.dim) * c.dim : 0, "matrix");
  TORCH_CHECK(c.rot.kind != kvq::kRotHadamard || (c.dim & (c.dim - 1)) == 0,
              "vllm_kvq_cpu: a Hadamard rotation needs a power-of-two head size, got ", c.dim);
  c.rot.norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.dim)));
  return c;
}

const float* optional_ptr(const c10::optional<at::Tensor>& t, int64_t hk, int64_t d, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == hk &&
                  t->size(1) == d,
              "vllm_kvq_cpu: ", what, " must be contiguous float32 (", hk, ", ", d, "), got ", t->sizes());
  return t->data_ptr<float>();
}

// sinks = [tokens, area offset, area bytes] (vllm_kvq/kv_format.py); the area must hold every record.
kvq::cpu::Sinks sinks_of(at::IntArrayRef sinks, const at::Tensor& cache, int64_t d) {
  TORCH_CHECK(sinks.size() == 3, "vllm_kvq_cpu: sinks needs [tokens, offset, bytes], got ", sinks.size(), " ints");
  kvq::cpu::Sinks s{static_cast<int>(sinks[0]), static_cast<int>(sinks[1]), static_cast<int>(sinks[2])};
  if (s.tokens == 0) return s;
  TORCH_CHECK(s.tokens > 0 && s.tokens <= cache.size(2) && s.bytes > 0 && s.offset >= 0 &&
                  s.offset + s.bytes <= cache.size(3) && s.bytes * cache.size(2) >= s.tokens * 4 * d,
              "vllm_kvq_cpu: sink area [", s.offset, ", +", s.bytes, ") for ", s.tokens, " records of ", 4 * d,
              " bytes does not fit blocks of ", cache.size(2), " slots of ", cache.size(3), " bytes");
  return s;
}

void check_cache(const at::Tensor& cache) {
  TORCH_CHECK(cache.device().is_cpu() && cache.dim() == 4 && cache.scalar_type() == at::kByte,
              "vllm_kvq_cpu: cache must be a 4-D uint8 CPU tensor");
}

void check_heads(const at::Tensor& heads, int64_t hk) {
  TORCH_CHECK(heads.scalar_type() == at::kInt && heads.is_contiguous(), "vllm_kvq_cpu: heads must be contiguous int32");
  const int32_t* h = heads.data_ptr<int32_t>();
  for (int64_t i = 0; i < heads.numel(); ++i)
    TORCH_CHECK(h[i] >= 0 && h[i] < hk, "vllm_kvq_cpu: head index ", h[i], " out of range for ", hk, " KV heads");
}

// Runs fn(i) for i in [0, n) on at::parallel_for's threads, handing out indices one at a time (items
// differ in cost: causal prefill chunks, ragged sequence lengths).
template <typename F>
void parallel_items(int64_t n, const F& fn) {
  if (n <= 0) return;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

// One head group's store with its codecs parsed (the ``store`` op and ``FormatPlan``'s ``forward`` share it).
void store_group(const at::Tensor& key, const at::Tensor& value, at::Tensor& cache, const at::Tensor& slot_mapping,
                 const at::Tensor& heads, int64_t value_offset, int64_t pad_begin, const CodecDesc& k_codec,
                 const CodecDesc& v_codec, const c10::optional<at::Tensor>& k_shift,
                 const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_shift,
                 const c10::optional<at::Tensor>& v_scale, at::IntArrayRef sinks, int64_t isa) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key.stride(2) == 1 && value.stride(2) == 1 &&
                  key.scalar_type() == value.scalar_type() && key.device().is_cpu(),
              "vllm_kvq_cpu::store: key/value must be CPU (N, Hk, D) of one dtype with a contiguous last dim");
  check_cache(cache);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == key.size(0),
              "vllm_kvq_cpu::store: slot_mapping must be contiguous int64 (N,)");
  const int64_t hk = cache.size(1), d = key.size(2);
  check_heads(heads, hk);
  StoreArgs a{};
  a.key = key.data_ptr();
  a.value = value.data_ptr();
  a.dtype = dtype_of(key);
  a.skn = key.stride(0);
  a.skh = key.stride(1);
  a.svn = value.stride(0);
  a.svh = value.stride(1);
  a.cache = cache.data_ptr<uint8_t>();
  a.sB = cache.stride(0);
  a.sH = cache.stride(1);
  a.sT = cache.stride(2);
  a.sC = cache.stride(3);
  a.slots = slot_mapping.data_ptr<int64_t>();
  a.heads = heads.data_ptr<int32_t>();
  a.gh = static_cast<int>(heads.numel());
  a.block_size = static_cast<int>(cache.size(2));
  a.slot_bytes = static_cast<int>(cache.size(3));
  a.value_offset = static_cast<int>(value_offset);
  a.pad_begin = static_cast<int>(pad_begin);
  a.k_shift = optional_ptr(k_shift, hk, d, "k_shift");
  a.k_scale = optional_ptr(k_scale, hk, d, "k_scale");
  a.v_shift = optional_ptr(v_shift, hk, d, "v_shift");
  a.v_scale = optional_ptr(v_scale, hk, d, "v_scale");
  a.sinks = sinks_of(sinks, cache, d);
  a.k = k_codec;
  a.v = v_codec;
  TORCH_CHECK(a.k.dim == d && a.v.dim == d && a.value_offset == a.k.nbytes && a.pad_begin == a.k.nbytes + a.v.nbytes &&
                  a.pad_begin <= a.slot_bytes,
              "vllm_kvq_cpu::store: codec sizes do not match the key and the cache slot");
  const int64_t max_slot = cache.size(0) * cache.size(2);
  for (int64_t i = 0; i < key.size(0); ++i)
    TORCH_CHECK(a.slots[i] < max_slot, "vllm_kvq_cpu::store: slot ", a.slots[i], " beyond the cache's ", max_slot);
  const Isa which = resolve(isa);
  const int64_t total = key.size(0) * a.gh;
  at::parallel_for(0, total, 16, [&](int64_t b, int64_t e) { KVQ_DISPATCH(which, store_range, a, b, e); });
}

void store(const at::Tensor& key, const at::Tensor& value, at::Tensor& cache, const at::Tensor& slot_mapping,
           const at::Tensor& heads, int64_t value_offset, int64_t pad_begin, at::IntArrayRef k_spec,
           at::TensorList k_tabs, at::IntArrayRef v_spec, at::TensorList v_tabs,
           const c10::optional<at::Tensor>& k_shift, const c10::optional<at::Tensor>& k_scale,
           const c10::optional<at::Tensor>& v_shift, const c10::optional<at::Tensor>& v_scale,
           at::IntArrayRef sinks, int64_t isa) {
  store_group(key, value, cache, slot_mapping, heads, value_offset, pad_begin, codec_of(k_spec, k_tabs),
              codec_of(v_spec, v_tabs), k_shift, k_scale, v_shift, v_scale, sinks, isa);
}

// One head group's attention with its codecs parsed (the ``paged_attention`` op and ``FormatPlan``'s
// ``forward`` share it).
void attend_group(const at::Tensor& query, at::Tensor& out, const at::Tensor& cache, const at::Tensor& block_table,
                  const at::Tensor& seq_lens, const at::Tensor& query_start_loc, const at::Tensor& heads,
                  int64_t value_offset, double scale, const CodecDesc& k_codec, const CodecDesc& v_codec,
                  const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_shift,
                  const c10::optional<at::Tensor>& v_scale, at::IntArrayRef sinks, int64_t lut_from,
                  int64_t num_splits, int64_t skip_from, int64_t isa, const c10::optional<at::Tensor>& bias_q,
                  const c10::optional<at::Tensor>& bias_table, bool exclude_self,
                  const c10::optional<at::Tensor>& lse, bool general_decode) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && out.sizes() == query.sizes() && out.stride(2) == 1 &&
                  out.scalar_type() == query.scalar_type() && query.device().is_cpu(),
              "vllm_kvq_cpu::paged_attention: query/out must be CPU (N, Hq, D) of one dtype, last dim contiguous");
  check_cache(cache);
  for (const at::Tensor* t : {&block_table, &seq_lens, &query_start_loc})
    TORCH_CHECK(t->scalar_type() == at::kInt, "vllm_kvq_cpu::paged_attention: index tensors must be int32");
  TORCH_CHECK(block_table.dim() == 2 && block_table.stride(1) == 1 && seq_lens.is_contiguous() &&
                  query_start_loc.is_contiguous() && query_start_loc.numel() == seq_lens.numel() + 1 &&
                  block_table.size(0) >= seq_lens.numel(),
              "vllm_kvq_cpu::paged_attention: bad block_table / seq_lens / query_start_loc shapes");
  const int64_t hk = cache.size(1), d = query.size(2), hq = query.size(1);
  TORCH_CHECK(hq % hk == 0, "vllm_kvq_cpu::paged_attention: Hq must be a multiple of Hk");
  check_heads(heads, hk);
  AttnArgs a{};
  a.query = query.data_ptr();
  a.dtype = dtype_of(query);
  a.sqn = query.stride(0);
  a.sqh = query.stride(1);
  a.out = out.data_ptr();
  a.son = out.stride(0);
  a.soh = out.stride(1);
  a.cache = cache.data_ptr<uint8_t>();
  a.sB = cache.stride(0);
  a.sH = cache.stride(1);
  a.sT = cache.stride(2);
  a.sC = cache.stride(3);
  a.block_table = block_table.data_ptr<int32_t>();
  a.sbt = block_table.stride(0);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.qsl = query_start_loc.data_ptr<int32_t>();
  a.heads = heads.data_ptr<int32_t>();
  a.gh = static_cast<int>(heads.numel());
  a.group = static_cast<int>(hq / hk);
  a.block_size = static_cast<int>(cache.size(2));
  a.head_dim = static_cast<int>(d);
  a.value_offset = static_cast<int>(value_offset);
  a.scale = static_cast<float>(scale);
  a.k_scale = optional_ptr(k_scale, hk, d, "k_scale");
  a.v_shift = optional_ptr(v_shift, hk, d, "v_shift");
  a.v_scale = optional_ptr(v_scale, hk, d, "v_scale");
  a.sinks = sinks_of(sinks, cache, d);
  int64_t bias_rows = 0;  // table rows: every context must lie within them
  std::vector<float> bias_et;  // table rows 0..15 transposed (key_bias.h), 64-byte aligned inside
  TORCH_CHECK(bias_q.has_value() == bias_table.has_value(),
              "vllm_kvq_cpu::paged_attention: key centring needs both bias_q and bias_table");
  if (bias_q.has_value()) {
    TORCH_CHECK(bias_q->scalar_type() == at::kFloat && bias_q->device().is_cpu() && bias_q->sizes() == query.sizes() &&
                    bias_q->stride(2) == 1,
                "vllm_kvq_cpu::paged_attention: bias_q must be CPU float32 ", query.sizes(),
                " with a contiguous last dim, got ", bias_q->scalar_type(), " ", bias_q->sizes());
    TORCH_CHECK(bias_table->scalar_type() == at::kFloat && bias_table->device().is_cpu() && bias_table->is_contiguous() &&
                    bias_table->dim() == 2 && bias_table->size(1) == d && bias_table->size(0) >= 16,
                "vllm_kvq_cpu::paged_attention: bias_table must be contiguous CPU float32 (P >= 16, ", d, "), got ",
                bias_table->scalar_type(), " ", bias_table->sizes());
    a.bias_q = bias_q->data_ptr<float>();
    a.sbq_n = bias_q->stride(0);
    a.sbq_h = bias_q->stride(1);
    a.bias_table = bias_table->data_ptr<float>();
    bias_rows = bias_table->size(0);
    // The table is key_centre's position table: row 0 = [cos 0 = 1] * h, [sin 0 = 0] * h, 0 past the rotary
    // channels; h (its rotate-half pairs) is read from it and checked.
    const float* row0 = a.bias_table;
    int h = 0;
    while (h < d && row0[h] == 1.f) ++h;
    bool zeros = true;
    for (int64_t i = h; i < d; ++i) zeros = zeros && row0[i] == 0.f;
    TORCH_CHECK(h >= 1 && 2 * h <= d && h <= kvq::cpu::kMaxBiasHalf && zeros,
                "vllm_kvq_cpu::paged_attention: bias_table is not a key-centring position table (row 0 must be "
                "h ones then zeros, 2h <= head size ", d, ")");
    a.bias_half = h;
    bias_et.assign(static_cast<size_t>(2 * h) * 16 + 16, 0.f);
    float* et = bias_et.data();
    et += (16 - (reinterpret_cast<uintptr_t>(et) / sizeof(float)) % 16) % 16;  // 64-byte aligned
    for (int i = 0; i < 2 * h; ++i)
      for (int r = 0; r < 16; ++r) et[i * 16 + r] = a.bias_table[static_cast<int64_t>(r) * d + i];
    a.bias_et = et;
  }
  // The dense long-prefill path (skip_from) attends its rows in Python without exclusion or lse.
  TORCH_CHECK(skip_from <= 0 || (!exclude_self && !lse.has_value()),
              "vllm_kvq_cpu::paged_attention: skip_from does not combine with exclude_self or lse");
  a.exclude_self = exclude_self ? 1 : 0;
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->device().is_cpu() && lse->dim() == 2 &&
                    lse->size(0) == query.size(0) && lse->size(1) == hq && lse->stride(1) == 1,
                "vllm_kvq_cpu::paged_attention: lse must be CPU float32 (", query.size(0), ", ", hq,
                ") with contiguous heads, got ", lse->scalar_type(), " ", lse->sizes());
    a.lse = lse->data_ptr<float>();
    a.slse_n = lse->stride(0);
  }
  a.lut_from = static_cast<int>(std::max<int64_t>(-1, std::min<int64_t>(lut_from, INT32_MAX)));
  a.general_decode = general_decode ? 1 : 0;
  a.num_tokens = static_cast<int>(query.size(0));
  a.num_q_heads = static_cast<int>(hq);
  a.k = k_codec;
  a.v = v_codec;
  TORCH_CHECK(a.k.dim == d && a.v.dim == d && a.value_offset == a.k.nbytes &&
                  a.value_offset + a.v.nbytes <= cache.size(3),
              "vllm_kvq_cpu::paged_attention: codec sizes do not match the query and the cache slot");

  // Work items: decode sequences (one new token) split their context so a few long sequences still fill
  // every thread; prefill sequences are cut into chunks of query tokens that share each decoded tile.
  const int64_t s_count = seq_lens.numel();
  const int64_t threads = at::get_num_threads();
  const int max_blocks = static_cast<int>(block_table.size(1));
  std::vector<int32_t> decode_rows;
  int max_decode_len = 0;
  for (int64_t s = 0; s < s_count; ++s) {
    const int ql = a.qsl[s + 1] - a.qsl[s];
    const int len = a.seq_lens[s];
    TORCH_CHECK(ql >= 0 && ql <= len && a.qsl[s + 1] <= a.num_tokens && len <= static_cast<int64_t>(max_blocks) * a.block_size,
                "vllm_kvq_cpu::paged_attention: sequence ", s, " has ", ql, " new tokens, length ", len,
                " and room for ", static_cast<int64_t>(max_blocks) * a.block_size);
    TORCH_CHECK(!a.bias_q || len <= bias_rows, "vllm_kvq_cpu::paged_attention: sequence ", s, " of length ",
                len, " lies past the key-centring table's ", bias_rows, " positions");
    if (ql == 1) {
      decode_rows.push_back(a.qsl[s]);
      max_decode_len = std::max(max_decode_len, len);
    }
  }
  int64_t splits = num_splits;
  if (splits <= 0) {
    const int64_t base = static_cast<int64_t>(decode_rows.size()) * a.gh;
    // one thread has nothing to balance: a split only adds partial writes and the merge
    splits = base == 0 || threads <= 1
                 ? 1
                 : std::max<int64_t>(1, std::min<int64_t>((4 * threads + base - 1) / base, max_decode_len / 512));
  }
  const int64_t split_tokens = (max_decode_len + splits - 1) / splits;
  const int64_t split_aligned = std::max<int64_t>(32, (split_tokens + 31) / 32 * 32);
  at::Tensor partial, ml;
  if (splits > 1 && !decode_rows.empty()) {
    partial = at::empty({splits, a.num_tokens, hq, d}, query.options().dtype(at::kFloat));
    ml = at::empty({splits, a.num_tokens, hq, 2}, query.options().dtype(at::kFloat));
    a.partial = partial.data_ptr<float>();
    a.ml = ml.data_ptr<float>();
  }
  const int qchunk = std::max(1, 64 / a.group);
  std::vector<WorkItem> items;
  std::vector<int64_t> cost;
  for (int64_t s = 0; s < s_count; ++s) {
    const int q0 = a.qsl[s], q1 = a.qsl[s + 1], len = a.seq_lens[s];
    if (skip_from > 0 && q1 - q0 >= skip_from) continue;  // the caller attends these (long prefills) itself
    for (int h = 0; h < a.gh; ++h) {
      if (q1 - q0 == 1 && splits > 1) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int c0 = static_cast<int>(std::min<int64_t>(sp * split_aligned, len));
          const int c1 = static_cast<int>(std::min<int64_t>(c0 + split_aligned, len));
          items.push_back({static_cast<int32_t>(s), h, q0, q1, c0, c1, static_cast<int32_t>(sp)});
          cost.push_back(c1 - c0);
        }
      } else {
        for (int c = q0; c < q1; c += qchunk) {
          const int ce = std::min(q1, c + qchunk);
          items.push_back({static_cast<int32_t>(s), h, c, ce, 0, len, -1});
          cost.push_back(static_cast<int64_t>(len - (q1 - ce)) * (ce - c));
        }
      }
    }
  }
  // Longest first, so the last items handed out are the short ones.
  std::vector<int64_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  const Isa which = resolve(isa, kvq::cpu::avx512::supports(a.k, a.v, a.head_dim));
  parallel_items(static_cast<int64_t>(items.size()), [&](int64_t i) { KVQ_DISPATCH(which, attend_item, a, items[order[i]]); });
  if (splits > 1 && !decode_rows.empty()) {
    const int64_t total = static_cast<int64_t>(decode_rows.size()) * a.gh * a.group;
    at::parallel_for(0, total, 4, [&](int64_t b, int64_t e) {
      KVQ_DISPATCH(which, merge_splits, a, static_cast<int>(splits), decode_rows.data(), b, e);
    });
  }
}

void paged_attention(const at::Tensor& query, at::Tensor& out, const at::Tensor& cache, const at::Tensor& block_table,
                     const at::Tensor& seq_lens, const at::Tensor& query_start_loc, const at::Tensor& heads,
                     int64_t value_offset, double scale, at::IntArrayRef k_spec, at::TensorList k_tabs,
                     at::IntArrayRef v_spec, at::TensorList v_tabs, const c10::optional<at::Tensor>& k_scale,
                     const c10::optional<at::Tensor>& v_shift, const c10::optional<at::Tensor>& v_scale,
                     at::IntArrayRef sinks, int64_t lut_from, int64_t num_splits, int64_t skip_from, int64_t isa,
                     const c10::optional<at::Tensor>& bias_q, const c10::optional<at::Tensor>& bias_table,
                     bool exclude_self, const c10::optional<at::Tensor>& lse, bool general_decode) {
  attend_group(query, out, cache, block_table, seq_lens, query_start_loc, heads, value_offset, scale,
               codec_of(k_spec, k_tabs), codec_of(v_spec, v_tabs), k_scale, v_shift, v_scale, sinks, lut_from,
               num_splits, skip_from, isa, bias_q, bias_table, exclude_self, lse, general_decode);
}

// A format's arguments parsed once (vllm_kvq/kernels/cpu.py: format_plan): its head groups' codecs and the
// tensors they point into (kept alive here), the per-head shifts and scales, the sink area. vLLM-CPU's
// per-layer hot path then passes one object instead of ~20 arguments and re-parses nothing.
struct FormatPlan : torch::CustomClassHolder {
  struct Group {
    at::Tensor heads;
    int64_t value_offset, pad_begin;
    CodecDesc k, v;
    std::vector<at::Tensor> tables;  // what k and v point into
  };
  std::vector<Group> groups;
  c10::optional<at::Tensor> k_shift, k_scale, v_shift, v_scale;
  std::vector<int64_t> sinks;
  // Formats with position-aware key centring (forward then needs each stored key's centre and the queries'
  // bias) and with exact_self (attention leaves each row's own position out and merges the step's exact key
  // and value in): forward refuses calls that would drop either.
  bool centred = false, exact_self = false;
  c10::optional<at::Tensor> self_fixed;  // (Hk, D) the key mean the own-token score leaves out, if any

  FormatPlan(c10::optional<at::Tensor> k_shift_, c10::optional<at::Tensor> k_scale_,
             c10::optional<at::Tensor> v_shift_, c10::optional<at::Tensor> v_scale_, std::vector<int64_t> sinks_)
      : k_shift(std::move(k_shift_)), k_scale(std::move(k_scale_)), v_shift(std::move(v_shift_)),
        v_scale(std::move(v_scale_)), sinks(std::move(sinks_)) {
    TORCH_CHECK(sinks.size() == 3, "vllm_kvq_cpu::FormatPlan: sinks needs [tokens, offset, bytes]");
  }

  void add_group(at::Tensor heads, int64_t value_offset, int64_t pad_begin, std::vector<int64_t> k_spec,
                 std::vector<at::Tensor> k_tabs, std::vector<int64_t> v_spec, std::vector<at::Tensor> v_tabs) {
    TORCH_CHECK(heads.scalar_type() == at::kInt && heads.is_contiguous() && heads.dim() == 1 && heads.numel() > 0,
                "vllm_kvq_cpu::FormatPlan: heads must be a non-empty contiguous int32 vector");
    Group g{heads, value_offset, pad_begin, codec_of(k_spec, k_tabs), codec_of(v_spec, v_tabs), {}};
    g.tables.insert(g.tables.end(), k_tabs.begin(), k_tabs.end());
    g.tables.insert(g.tables.end(), v_tabs.begin(), v_tabs.end());
    groups.push_back(std::move(g));
  }

  int64_t num_groups() const { return static_cast<int64_t>(groups.size()); }

  void set_features(bool centred_, bool exact_self_, c10::optional<at::Tensor> self_fixed_) {
    centred = centred_;
    exact_self = exact_self_;
    self_fixed = std::move(self_fixed_);
  }
};

// exact_self's two-part softmax merge (vllm_kvq/ops: _merge_self): out holds attention over every position
// but each row's own, lse its log-sum-exp (-inf: no other key); the row's own key k (minus the fixed mean the
// scores leave out) gives s = scale q . k, and out becomes lerp(out, v, sigmoid(s - lse)). Rows [0, rows).
void merge_self(const at::Tensor& query, at::Tensor& out, const at::Tensor& key, const at::Tensor& value,
                const at::Tensor& lse, const c10::optional<at::Tensor>& fixed, double scale, int64_t rows) {
  const int64_t hq = query.size(1), hk = key.size(1), d = query.size(2), g = hq / hk;
  // contiguous: the loop reads each row's D coordinates with unit stride (a strided float32 view is copied)
  const at::Tensor q = query.to(at::kFloat).contiguous(), k = key.to(at::kFloat).contiguous(),
                   v = value.to(at::kFloat).contiguous();
  const at::Tensor f = fixed.has_value() ? fixed->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor o = out.narrow(0, 0, rows).to(at::kFloat);  // a copy when out is not float32
  const float* fp = f.defined() ? f.data_ptr<float>() : nullptr;
  const float* lp = lse.data_ptr<float>();
  at::parallel_for(0, rows * hq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / hq, qh = i % hq, h = qh / g;
      const float* qr = q.data_ptr<float>() + t * q.stride(0) + qh * q.stride(1);
      const float* kr = k.data_ptr<float>() + t * k.stride(0) + h * k.stride(1);
      const float* vr = v.data_ptr<float>() + t * v.stride(0) + h * v.stride(1);
      float* orow = o.data_ptr<float>() + t * o.stride(0) + qh * o.stride(1);
      float dot = 0.f;
      for (int64_t j = 0; j < d; ++j) dot += qr[j] * (fp ? kr[j] - fp[h * d + j] : kr[j]);
      const float z = static_cast<float>(scale) * dot - lp[t * hq + qh];
      const float w = 1.f / (1.f + std::exp(-z));  // 1 for a row with no other key (lse = -inf)
      for (int64_t j = 0; j < d; ++j) orow[j] += w * (vr[j] - orow[j]);
    }
  });
  if (out.scalar_type() != at::kFloat) out.narrow(0, 0, rows).copy_(o);
}

// vLLM-CPU's attention layer in one call: stores the step's key/value (when given) into their slots, then
// attends every query row over the packed cache, writing out (N, Hq, D) (every row a sequence owns; rows
// past query_start_loc[-1] are left as they are). Same kernels and bytes as ``store`` + ``paged_attention``.
void forward(const at::Tensor& query, at::Tensor& out, const c10::optional<at::Tensor>& key,
             const c10::optional<at::Tensor>& value, at::Tensor& cache, const at::Tensor& slot_mapping,
             const at::Tensor& block_table, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
             const c10::intrusive_ptr<FormatPlan>& plan, double scale, int64_t lut_from, int64_t isa,
             const c10::optional<at::Tensor>& centre, const c10::optional<at::Tensor>& bias_q,
             const c10::optional<at::Tensor>& bias_table) {
  TORCH_CHECK(plan->num_groups() > 0, "vllm_kvq_cpu::forward: the plan has no head groups");
  TORCH_CHECK(key.has_value() == value.has_value(), "vllm_kvq_cpu::forward: pass both key and value, or neither");
  TORCH_CHECK(!plan->exact_self || key.has_value(),
              "vllm_kvq_cpu::forward: the format attends each row's own token exactly (exact_self): pass the step's "
              "key and value");
  const bool storing = key.has_value() && key->size(0) > 0;
  TORCH_CHECK(plan->centred == bias_q.has_value() && (!plan->centred || !storing || centre.has_value()) &&
                  (plan->centred || !centre.has_value()),
              "vllm_kvq_cpu::forward: a format with position-aware key centring takes the stored keys' centre and "
              "the queries' bias (bias_q, bias_table); other formats take neither");
  if (plan->exact_self) {  // checked before anything is written
    const int64_t rows = query_start_loc.numel() ? query_start_loc.to(at::kLong)[-1].item<int64_t>() : 0;
    TORCH_CHECK(key->dim() == 3 && key->size(0) >= rows && value->sizes() == key->sizes() &&
                    key->size(1) == cache.size(1) && key->size(2) == query.size(2),
                "vllm_kvq_cpu::forward: exact_self needs the step's key and value (N, Hk, D) for every query row");
    TORCH_CHECK(!plan->self_fixed.has_value() ||
                    plan->self_fixed->sizes() == at::IntArrayRef({cache.size(1), query.size(2)}),
                "vllm_kvq_cpu::forward: the plan's fixed key mean must be (Hk, D)");
  }
  if (storing) {
    const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();  // no copy when already so
    at::Tensor k = *key;
    if (centre.has_value()) {
      TORCH_CHECK(centre->sizes() == key->sizes(), "vllm_kvq_cpu::forward: centre must be shaped like key ",
                  key->sizes(), ", got ", centre->sizes());
      k = key->to(at::kFloat) - *centre;  // as ops.store: the float key minus its position's centre
    }
    const at::Tensor v = k.scalar_type() == value->scalar_type() ? *value : value->to(k.scalar_type());
    for (const auto& g : plan->groups)
      store_group(k, v, cache, slots, g.heads, g.value_offset, g.pad_begin, g.k, g.v,
                  plan->k_shift, plan->k_scale, plan->v_shift, plan->v_scale, plan->sinks, isa);
  }
  if (query.size(0) == 0 || seq_lens.numel() == 0) return;
  // vLLM-CPU's metadata is int32 with a contiguous block table row; anything else is converted, not refused.
  const auto as_int = [](const at::Tensor& t) { return t.scalar_type() == at::kInt ? t : t.to(at::kInt); };
  const at::Tensor bt = block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.stride(1) == 1
                            ? block_table
                            : as_int(block_table).contiguous();
  const at::Tensor lens = as_int(seq_lens).contiguous(), qsl = as_int(query_start_loc).contiguous();
  c10::optional<at::Tensor> lse;
  if (plan->exact_self) lse = at::full({query.size(0), query.size(1)}, -INFINITY, query.options().dtype(at::kFloat));
  for (const auto& g : plan->groups)
    attend_group(query, out, cache, bt, lens, qsl, g.heads, g.value_offset, scale, g.k,
                 g.v, plan->k_scale, plan->v_shift, plan->v_scale, plan->sinks, lut_from, 0, 0, isa, bias_q,
                 bias_table, plan->exact_self, lse, false);
  if (plan->exact_self)  // the rows sequences own
    merge_self(query, out, *key, *value, *lse, plan->self_fixed, scale, qsl.data_ptr<int32_t>()[qsl.numel() - 1]);
}

// Decodes context tokens [0, length) of sequence seq for the head group into float32 (gh, length, D) K and V
// in the codecs' rotated domains (scales applied): the operands of a dense attention for long prefills.
void decode_context(const at::Tensor& cache, const at::Tensor& block_table, int64_t seq, int64_t length,
                    const at::Tensor& heads, int64_t value_offset, at::IntArrayRef k_spec, at::TensorList k_tabs,
                    at::IntArrayRef v_spec, at::TensorList v_tabs, at::IntArrayRef sinks, at::Tensor& k_out,
                    at::Tensor& v_out, int64_t isa) {
  check_cache(cache);
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.stride(1) == 1 &&
                  seq >= 0 && seq < block_table.size(0) && length >= 0 &&
                  length <= block_table.size(1) * cache.size(2),
              "vllm_kvq_cpu::decode_context: bad block_table, seq or length");
  check_heads(heads, cache.size(1));
  const int64_t gh = heads.numel();
  AttnArgs a{};
  a.k = codec_of(k_spec, k_tabs);
  a.v = codec_of(v_spec, v_tabs);
  const int64_t d = a.k.dim;
  for (const at::Tensor* t : {&k_out, &v_out})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == gh &&
                    t->size(1) == length && t->size(2) == d,
                "vllm_kvq_cpu::decode_context: outputs must be contiguous float32 (", gh, ", ", length, ", ", d, ")");
  TORCH_CHECK(a.v.dim == d && value_offset == a.k.nbytes && value_offset + a.v.nbytes <= cache.size(3),
              "vllm_kvq_cpu::decode_context: codec sizes do not match the cache slot");
  a.cache = cache.data_ptr<uint8_t>();
  a.sB = cache.stride(0);
  a.sH = cache.stride(1);
  a.sT = cache.stride(2);
  a.sC = cache.stride(3);
  a.block_table = block_table.data_ptr<int32_t>();
  a.sbt = block_table.stride(0);
  a.heads = heads.data_ptr<int32_t>();
  a.gh = static_cast<int>(gh);
  a.block_size = static_cast<int>(cache.size(2));
  a.head_dim = static_cast<int>(d);
  a.value_offset = static_cast<int>(value_offset);
  a.sinks = sinks_of(sinks, cache, d);
  const Isa which = resolve(isa, kvq::cpu::avx512::supports(a.k, a.v, a.head_dim));
  constexpr int64_t kPiece = 256;
  const int64_t pieces = (length + kPiece - 1) / kPiece;
  float* ko = k_out.data_ptr<float>();
  float* vo = v_out.data_ptr<float>();
  at::parallel_for(0, gh * pieces, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int hs = static_cast<int>(i / pieces);
      const int c0 = static_cast<int>((i % pieces) * kPiece);
      const int c1 = static_cast<int>(std::min<int64_t>(length, c0 + kPiece));
      float* kp = ko + (hs * length + c0) * d;
      float* vp = vo + (hs * length + c0) * d;
      KVQ_DISPATCH(which, decode_context, a, static_cast<int>(seq), hs, c0, c1, kp, vp);
    }
  });
}

// Whether decode items over these codecs decode their codes in registers (csrc/cpu/decode_fused.h) in the
// build ``isa`` resolves to for them, rather than through float tiles: what the tests check they exercise.
bool fused_decode(at::IntArrayRef k_spec, at::TensorList k_tabs, at::IntArrayRef v_spec, at::TensorList v_tabs,
                  int64_t isa) {
  const CodecDesc k = codec_of(k_spec, k_tabs), v = codec_of(v_spec, v_tabs);
  switch (resolve(isa, kvq::cpu::avx512::supports(k, v, k.dim))) {
    case kAvx512: return kvq::cpu::avx512::fused_decode(k, v);
    case kAvx2: return kvq::cpu::avx2::fused_decode(k, v);
    default: return kvq::cpu::portable::fused_decode(k, v);
  }
}

// y = R x (or R^T x with inverse) row by row for a codec's rotation: x, y contiguous float32 (M, D).
void rotate(const at::Tensor& x, at::Tensor& y, at::IntArrayRef spec, at::TensorList tabs, bool inverse) {
  const CodecDesc c = codec_of(spec, tabs);
  for (const at::Tensor* t : {&x, static_cast<const at::Tensor*>(&y)})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(1) == c.dim,
                "vllm_kvq_cpu::rotate: x and y must be contiguous float32 (M, ", c.dim, ")");
  TORCH_CHECK(x.size(0) == y.size(0) && x.data_ptr() != y.data_ptr(), "vllm_kvq_cpu::rotate: y must be a separate (M, D)");
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t d = c.dim;
  at::parallel_for(0, x.size(0), 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      if (inverse)
        kvq::rotate_inverse(c.rot, xp + i * d, yp + i * d);
      else
        kvq::rotate_apply(c.rot, xp + i * d, yp + i * d);
    }
  });
}

}  // namespace

namespace kvq {
namespace cpu {
std::atomic<int64_t> fused_decode_tiles{0};
}  // namespace cpu
}  // namespace kvq

namespace {
int64_t fused_decode_tiles_read() { return kvq::cpu::fused_decode_tiles.load(); }
}  // namespace

TORCH_LIBRARY(vllm_kvq_cpu, m) {
  m.class_<FormatPlan>("FormatPlan")
      .def(torch::init<c10::optional<at::Tensor>, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                       c10::optional<at::Tensor>, std::vector<int64_t>>())
      .def("add_group", &FormatPlan::add_group)
      .def("num_groups", &FormatPlan::num_groups)
      .def("set_features", &FormatPlan::set_features);
  m.def(
      "store(Tensor key, Tensor value, Tensor(a!) cache, Tensor slot_mapping, Tensor heads, int value_offset, "
      "int pad_begin, int[] k_spec, Tensor[] k_tabs, int[] v_spec, Tensor[] v_tabs, Tensor? k_shift, "
      "Tensor? k_scale, Tensor? v_shift, Tensor? v_scale, int[] sinks, int isa) -> ()");
  m.def(
      "paged_attention(Tensor query, Tensor(a!) out, Tensor cache, Tensor block_table, Tensor seq_lens, "
      "Tensor query_start_loc, Tensor heads, int value_offset, float scale, int[] k_spec, Tensor[] k_tabs, "
      "int[] v_spec, Tensor[] v_tabs, Tensor? k_scale, Tensor? v_shift, Tensor? v_scale, int[] sinks, int lut_from, "
      "int num_splits, int skip_from, int isa, Tensor? bias_q=None, Tensor? bias_table=None, bool exclude_self=False, "
      "Tensor(b!)? lse=None, bool general_decode=False) -> ()");
  m.def(
      "decode_context(Tensor cache, Tensor block_table, int seq, int length, Tensor heads, int value_offset, "
      "int[] k_spec, Tensor[] k_tabs, int[] v_spec, Tensor[] v_tabs, int[] sinks, Tensor(a!) k_out, Tensor(b!) v_out, "
      "int isa) -> ()");
  m.def(
      "forward(Tensor query, Tensor(a!) out, Tensor? key, Tensor? value, Tensor(b!) cache, Tensor slot_mapping, "
      "Tensor block_table, Tensor seq_lens, Tensor query_start_loc, __torch__.torch.classes.vllm_kvq_cpu.FormatPlan plan, "
      "float scale, int lut_from, int isa, Tensor? centre=None, Tensor? bias_q=None, Tensor? bias_table=None) -> ()");
  m.def("rotate(Tensor x, Tensor(a!) y, int[] spec, Tensor[] tabs, bool inverse) -> ()");
  m.def("fused_decode(int[] k_spec, Tensor[] k_tabs, int[] v_spec, Tensor[] v_tabs, int isa) -> bool");
  m.def("best_isa() -> str", &best_isa);
  m.def("fused_decode_tiles() -> int", &fused_decode_tiles_read);
  m.def("has_isa(int isa) -> bool", &has_isa);
}

TORCH_LIBRARY_IMPL(vllm_kvq_cpu, CPU, m) {
  m.impl("store", &store);
  m.impl("paged_attention", &paged_attention);
  m.impl("decode_context", &decode_context);
  m.impl("rotate", &rotate);
  m.impl("forward", &forward);
  m.impl("fused_decode", &fused_decode);
}

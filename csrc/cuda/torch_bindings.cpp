// torch.library registration of the CUDA kernels (TurboQuant and FibQuant codecs, per-head state, sink records) as vllm_kvq::tq_store and vllm_kvq::tq_decode.
// Both mutate tensors they are given (the cache; the output and split workspaces) and return nothing, so
// they allocate nothing and can be captured in CUDA graphs. Shapes are validated in Python
// (vllm_kvq/kernels/cuda.py); here only what the kernels would silently misread is checked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "tq_params.h"

namespace {

kvq::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kvq::DType::kFloat32;
    case at::kHalf: return kvq::DType::kFloat16;
    case at::kBFloat16: return kvq::DType::kBFloat16;
    default: TORCH_CHECK(false, "vllm_kvq: expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// spec = [b0, n0, b1, seg1, meta, w, rotate, scale_mode, kind, block] (vllm_kvq/kernels/cuda.py, codec_spec).
kvq::TqCodec codec_of(at::IntArrayRef spec, const at::Tensor& rt, const at::Tensor& tab0, const at::Tensor& tab1,
                      int64_t d) {
  TORCH_CHECK(spec.size() == 10, "vllm_kvq: codec spec needs 10 ints, got ", spec.size());
  for (const at::Tensor* t : {&rt, &tab0, &tab1})
    TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "vllm_kvq: codec tables must be contiguous float32 CUDA tensors");
  kvq::TqCodec c;
  c.b0 = static_cast<int>(spec[0]);
  c.n0 = static_cast<int>(spec[1]);
  c.b1 = static_cast<int>(spec[2]);
  c.seg1 = static_cast<int>(spec[3]);
  c.meta = static_cast<int>(spec[4]);
  c.w = static_cast<int>(spec[5]);
  c.rotate = static_cast<int>(spec[6]);
  c.scale_mode = static_cast<int>(spec[7]);
  c.kind = static_cast<int>(spec[8]);
  c.block = static_cast<int>(spec[9]);
  c.rt = rt.data_ptr<float>();
  c.tab0 = tab0.data_ptr<float>();
  c.tab1 = tab1.data_ptr<float>();
  // The kernels index the tables without bounds: check their sizes here.
  const int64_t want0 = c.kind == kvq::kKindFibQuant ? int64_t{c.w} * c.block : int64_t{c.w} * d;
  TORCH_CHECK(tab0.numel() >= want0 && tab1.numel() >= (c.kind == kvq::kKindFibQuant ? c.w : want0) &&
                  (!c.rotate || rt.numel() >= d * d),
              "vllm_kvq: codec tables are smaller than the spec says");
  return c;
}

// Optional (gh, D) float32 state rows of a head group.
const float* state_of(const std::optional<at::Tensor>& t, int64_t gh, int64_t d, const char* what) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == gh * d,
              "vllm_kvq: state ", what, " must be a contiguous float32 CUDA tensor of (heads in group, D)");
  return t->data_ptr<float>();
}

// sink = [tokens, offset, bytes] (kv_format.KVFormat: sink_tokens, sink_offset, sink_bytes).
kvq::Sinks sinks_of(at::IntArrayRef sink) {
  TORCH_CHECK(sink.size() == 3, "vllm_kvq: sink spec needs 3 ints, got ", sink.size());
  return kvq::Sinks{static_cast<int>(sink[0]), static_cast<int>(sink[1]), static_cast<int>(sink[2])};
}

void check_call(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "vllm_kvq: ", what, " failed: ", cudaGetErrorString(err));
}

void tq_store(const at::Tensor& key, const at::Tensor& value, at::Tensor& cache, const at::Tensor& slot_mapping,
              const at::Tensor& heads, int64_t value_offset, int64_t pad_begin, at::IntArrayRef k_spec,
              const at::Tensor& k_rt, const at::Tensor& k_tab0, const at::Tensor& k_tab1, at::IntArrayRef v_spec,
              const at::Tensor& v_rt, const at::Tensor& v_tab0, const at::Tensor& v_tab1,
              const std::optional<at::Tensor>& k_sub, const std::optional<at::Tensor>& k_fac,
              const std::optional<at::Tensor>& v_sub, const std::optional<at::Tensor>& v_fac, at::IntArrayRef sink) {
  TORCH_CHECK(key.dim() == 3 && value.sizes() == key.sizes() && key.stride(2) == 1 && value.stride(2) == 1 &&
                  key.scalar_type() == value.scalar_type(),
              "vllm_kvq::tq_store: key/value must be (N, Hk, D) of one dtype with a contiguous last dim");
  TORCH_CHECK(cache.dim() == 4 && cache.scalar_type() == at::kByte, "vllm_kvq::tq_store: cache must be uint8 4-D");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "vllm_kvq::tq_store: slot_mapping must be contiguous int64");
  TORCH_CHECK(heads.scalar_type() == at::kInt && heads.is_contiguous(), "vllm_kvq::tq_store: heads must be int32");
  const c10::cuda::OptionalCUDAGuard guard(cache.device());
  kvq::StoreParams p;
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.skn = key.stride(0);
  p.skh = key.stride(1);
  p.svn = value.stride(0);
  p.svh = value.stride(1);
  p.in_dtype = dtype_of(key);
  p.cache = cache.data_ptr<uint8_t>();
  p.sB = cache.stride(0);
  p.sH = cache.stride(1);
  p.sT = cache.stride(2);
  p.sC = cache.stride(3);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.heads = heads.data_ptr<int32_t>();
  p.num_group_heads = static_cast<int>(heads.numel());
  p.num_tokens = static_cast<int>(key.size(0));
  p.block_size = static_cast<int>(cache.size(2));
  p.head_dim = static_cast<int>(key.size(2));
  p.value_offset = static_cast<int>(value_offset);
  p.pad_begin = static_cast<int>(pad_begin);
  p.slot_bytes = static_cast<int>(cache.size(3));
  p.k = codec_of(k_spec, k_rt, k_tab0, k_tab1, p.head_dim);
  p.v = codec_of(v_spec, v_rt, v_tab0, v_tab1, p.head_dim);
  const int64_t gh = heads.numel(), d = key.size(2);
  p.ks = kvq::SideState{state_of(k_sub, gh, d, "k_sub"), state_of(k_fac, gh, d, "k_fac")};
  p.vs = kvq::SideState{state_of(v_sub, gh, d, "v_sub"), state_of(v_fac, gh, d, "v_fac")};
  p.sink = sinks_of(sink);
  check_call(kvq::tq_store(p, c10::cuda::getCurrentCUDAStream().stream()), "tq_store");
}

void tq_decode(const at::Tensor& query, at::Tensor& out, const at::Tensor& cache, const at::Tensor& block_table,
               const at::Tensor& seq_lens, const at::Tensor& query_start_loc, const at::Tensor& heads,
               int64_t value_offset, double scale, int64_t num_splits, int64_t split_tokens, at::Tensor& partial,
               at::Tensor& ml, at::IntArrayRef k_spec, const at::Tensor& k_rt, const at::Tensor& k_tab0,
               const at::Tensor& k_tab1, at::IntArrayRef v_spec, const at::Tensor& v_rt, const at::Tensor& v_tab0,
               const at::Tensor& v_tab1, const std::optional<at::Tensor>& k_fac, const std::optional<at::Tensor>& v_sub,
               const std::optional<at::Tensor>& v_fac, at::IntArrayRef sink) {
  TORCH_CHECK(query.dim() == 3 && query.stride(2) == 1 && out.sizes() == query.sizes() && out.stride(2) == 1 &&
                  out.scalar_type() == query.scalar_type(),
              "vllm_kvq::tq_decode: query/out must be (N, Hq, D) of one dtype with a contiguous last dim");
  TORCH_CHECK(cache.dim() == 4 && cache.scalar_type() == at::kByte, "vllm_kvq::tq_decode: cache must be uint8 4-D");
  for (const at::Tensor* t : {&block_table, &seq_lens, &query_start_loc, &heads})
    TORCH_CHECK(t->scalar_type() == at::kInt, "vllm_kvq::tq_decode: index tensors must be int32");
  TORCH_CHECK(block_table.stride(1) == 1 && seq_lens.is_contiguous() && query_start_loc.is_contiguous(),
              "vllm_kvq::tq_decode: index tensors must be contiguous along their last dim");
  TORCH_CHECK(num_splits == 1 || (partial.scalar_type() == at::kFloat && ml.scalar_type() == at::kFloat &&
                                  partial.is_contiguous() && ml.is_contiguous()),
              "vllm_kvq::tq_decode: split workspaces must be contiguous float32");
  const c10::cuda::OptionalCUDAGuard guard(query.device());
  kvq::DecodeParams p;
  p.query = query.data_ptr();
  p.sqn = query.stride(0);
  p.sqh = query.stride(1);
  p.out = out.data_ptr();
  p.son = out.stride(0);
  p.soh = out.stride(1);
  p.dtype = dtype_of(query);
  p.cache = cache.data_ptr<uint8_t>();
  p.sB = cache.stride(0);
  p.sH = cache.stride(1);
  p.sT = cache.stride(2);
  p.sC = cache.stride(3);
  p.block_table = block_table.data_ptr<int32_t>();
  p.sbt = block_table.stride(0);
  p.seq_lens = seq_lens.data_ptr<int32_t>();
  p.query_start_loc = query_start_loc.data_ptr<int32_t>();
  p.heads = heads.data_ptr<int32_t>();
  p.num_group_heads = static_cast<int>(heads.numel());
  p.num_seqs = static_cast<int>(seq_lens.numel());
  p.num_tokens = static_cast<int>(query.size(0));
  p.num_q_heads = static_cast<int>(query.size(1));
  p.group = static_cast<int>(query.size(1) / cache.size(1));
  p.block_size = static_cast<int>(cache.size(2));
  p.head_dim = static_cast<int>(query.size(2));
  p.value_offset = static_cast<int>(value_offset);
  p.scale = static_cast<float>(scale);
  p.num_splits = static_cast<int>(num_splits);
  p.split_tokens = static_cast<int>(split_tokens);
  p.partial = num_splits > 1 ? partial.data_ptr<float>() : nullptr;
  p.ml = num_splits > 1 ? ml.data_ptr<float>() : nullptr;
  p.k = codec_of(k_spec, k_rt, k_tab0, k_tab1, p.head_dim);
  p.v = codec_of(v_spec, v_rt, v_tab0, v_tab1, p.head_dim);
  const int64_t gh = heads.numel(), d = query.size(2);
  p.ks = kvq::SideState{nullptr, state_of(k_fac, gh, d, "k_fac")};
  p.vs = kvq::SideState{state_of(v_sub, gh, d, "v_sub"), state_of(v_fac, gh, d, "v_fac")};
  p.sink = sinks_of(sink);
  check_call(kvq::tq_decode(p, c10::cuda::getCurrentCUDAStream().stream()), "tq_decode");
}

}  // namespace

TORCH_LIBRARY(vllm_kvq, m) {
  m.def(
      "tq_store(Tensor key, Tensor value, Tensor(a!) cache, Tensor slot_mapping, Tensor heads, int value_offset, "
      "int pad_begin, int[] k_spec, Tensor k_rt, Tensor k_tab0, Tensor k_tab1, int[] v_spec, Tensor v_rt, "
      "Tensor v_tab0, Tensor v_tab1, Tensor? k_sub, Tensor? k_fac, Tensor? v_sub, Tensor? v_fac, int[] sink) -> ()");
  m.def(
      "tq_decode(Tensor query, Tensor(a!) out, Tensor cache, Tensor block_table, Tensor seq_lens, "
      "Tensor query_start_loc, Tensor heads, int value_offset, float scale, int num_splits, int split_tokens, "
      "Tensor(b!) partial, Tensor(c!) ml, int[] k_spec, Tensor k_rt, Tensor k_tab0, Tensor k_tab1, int[] v_spec, "
      "Tensor v_rt, Tensor v_tab0, Tensor v_tab1, Tensor? k_fac, Tensor? v_sub, Tensor? v_fac, int[] sink) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_kvq, CUDA, m) {
  m.impl("tq_store", &tq_store);
  m.impl("tq_decode", &tq_decode);
}

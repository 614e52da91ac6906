// torch.library registration of the TurboQuant CUDA kernels as vllm_kvq::tq_store and vllm_kvq::tq_decode.
// Both mutate tensors they are given (the cache; the output and split workspaces) and return nothing, so
// they allocate nothing and can be captured in CUDA graphs. Shapes are validated in Python
// (vllm_kvq/kernels/cuda.py); here only what the kernels would silently misread is checked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

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

// spec = [b0, n0, b1, seg1, meta, w, rotate, scale_mode] (vllm_kvq.kernels.triton.codec_spec.CodecSpec).
kvq::TqCodec codec_of(at::IntArrayRef spec, const at::Tensor& rt, const at::Tensor& cent, const at::Tensor& thr) {
  TORCH_CHECK(spec.size() == 8, "vllm_kvq: codec spec needs 8 ints, got ", spec.size());
  for (const at::Tensor* t : {&rt, &cent, &thr})
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
  c.rt = rt.data_ptr<float>();
  c.cent = cent.data_ptr<float>();
  c.thr = thr.data_ptr<float>();
  return c;
}

void check_call(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "vllm_kvq: ", what, " failed: ", cudaGetErrorString(err));
}

void tq_store(const at::Tensor& key, const at::Tensor& value, at::Tensor& cache, const at::Tensor& slot_mapping,
              const at::Tensor& heads, int64_t value_offset, int64_t pad_begin, at::IntArrayRef k_spec,
              const at::Tensor& k_rt, const at::Tensor& k_cent, const at::Tensor& k_thr, at::IntArrayRef v_spec,
              const at::Tensor& v_rt, const at::Tensor& v_cent, const at::Tensor& v_thr) {
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
  p.k = codec_of(k_spec, k_rt, k_cent, k_thr);
  p.v = codec_of(v_spec, v_rt, v_cent, v_thr);
  check_call(kvq::tq_store(p, c10::cuda::getCurrentCUDAStream().stream()), "tq_store");
}

void tq_decode(const at::Tensor& query, at::Tensor& out, const at::Tensor& cache, const at::Tensor& block_table,
               const at::Tensor& seq_lens, const at::Tensor& query_start_loc, const at::Tensor& heads,
               int64_t value_offset, double scale, int64_t num_splits, int64_t split_tokens, at::Tensor& partial,
               at::Tensor& ml, at::IntArrayRef k_spec, const at::Tensor& k_rt, const at::Tensor& k_cent,
               const at::Tensor& k_thr, at::IntArrayRef v_spec, const at::Tensor& v_rt, const at::Tensor& v_cent,
               const at::Tensor& v_thr) {
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
  p.k = codec_of(k_spec, k_rt, k_cent, k_thr);
  p.v = codec_of(v_spec, v_rt, v_cent, v_thr);
  check_call(kvq::tq_decode(p, c10::cuda::getCurrentCUDAStream().stream()), "tq_decode");
}

}  // namespace

TORCH_LIBRARY(vllm_kvq, m) {
  m.def(
      "tq_store(Tensor key, Tensor value, Tensor(a!) cache, Tensor slot_mapping, Tensor heads, int value_offset, "
      "int pad_begin, int[] k_spec, Tensor k_rt, Tensor k_cent, Tensor k_thr, int[] v_spec, Tensor v_rt, "
      "Tensor v_cent, Tensor v_thr) -> ()");
  m.def(
      "tq_decode(Tensor query, Tensor(a!) out, Tensor cache, Tensor block_table, Tensor seq_lens, "
      "Tensor query_start_loc, Tensor heads, int value_offset, float scale, int num_splits, int split_tokens, "
      "Tensor(b!) partial, Tensor(c!) ml, int[] k_spec, Tensor k_rt, Tensor k_cent, Tensor k_thr, int[] v_spec, "
      "Tensor v_rt, Tensor v_cent, Tensor v_thr) -> ()");
}

TORCH_LIBRARY_IMPL(vllm_kvq, CUDA, m) {
  m.impl("tq_store", &tq_store);
  m.impl("tq_decode", &tq_decode);
}

"""vLLM 0.33 (pure-Python sources) grouping + capacity for a quantized full-attention layer next to a bf16
sliding-window companion with an equal page: which groups, block sizes, bytes per block, KV tokens."""
import sys, torch, vllm
from vllm.config import VllmConfig, ModelConfig, CacheConfig, SchedulerConfig
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec
print("vllm", vllm.__version__, vllm.__file__)
from vllm.v1.core import kv_cache_planning as P
from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config, resolve_kv_cache_block_sizes

L, Hk, D, slot, Tq, W = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), 128, int(sys.argv[5])
page = Hk * Tq * slot
Tsw = page // (Hk * 4 * D) // 16 * 16
specs = {}
for i in range(L):
    specs[f"model.layers.{i}.self_attn.attn"] = FullAttentionSpec(block_size=Tq, num_kv_heads=Hk, head_size=D, dtype=torch.uint8, state_content_bytes=slot)
for i in range(L):
    specs[f"model.layers.{i}.self_attn.attn.kvq_window"] = SlidingWindowSpec(block_size=Tsw, num_kv_heads=Hk, head_size=D, dtype=torch.bfloat16, sliding_window=W, page_size_padded=page)
class VC:  # the fields grouping reads
    pass
try:
    vc = VllmConfig()
except Exception as e:
    print("VllmConfig() failed:", repr(e)[:300]); raise
import os
vc.cache_config.kv_cache_layout = os.environ.get("LAYOUT", "LBNHC")
print("layout", vc.cache_config.get_resolved_kv_cache_layout() if hasattr(vc.cache_config, "get_resolved_kv_cache_layout") else None)
groups = P.get_kv_cache_groups(vc, dict(specs))
for g in groups:
    print(type(g.kv_cache_spec).__name__, "block", g.kv_cache_spec.block_size, "page", g.kv_cache_spec.page_size_bytes, "layers", len(g.layer_names))

cfg = P.get_kv_cache_config_from_groups(vc, groups, 1 << 30) if "available_memory" in P.get_kv_cache_config_from_groups.__code__.co_varnames else None
print("config_from_groups args", P.get_kv_cache_config_from_groups.__code__.co_varnames[:4])

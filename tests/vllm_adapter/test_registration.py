"""Registration against the installed vLLM (0.32 here): the patches' symbols, idempotence, validation,
the CLI's choices, and backend routing. No model runs here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from vllm_kvq.vllm import registration  # noqa: E402
from vllm_kvq.vllm.dtypes import KVQ_DTYPES  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def registered():
    registration.register()


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "vllm_kvq"]
    assert eps and eps[0].value == "vllm_kvq.vllm.plugin:register"
    eps[0].load()()  # loading and calling it again must be harmless


def test_patched_symbols_still_exist():
    """Fails loudly when vLLM moves something a patch relies on."""
    import vllm.config.cache as cache_mod
    import vllm.v1.attention.selector as selector_mod
    from vllm.platforms import current_platform

    from vllm.model_executor.layers.attention.attention import Attention

    assert hasattr(selector_mod, "_cached_get_attn_backend")
    assert hasattr(type(current_platform), "get_attn_backend_cls")
    assert getattr(Attention.get_kv_cache_spec, "_vllm_kvq_wrapped", False)  # per-layer slots (patches.py)
    if not hasattr(cache_mod, "register_kv_cache_dtype"):
        assert "cache_dtype" in cache_mod.CacheConfig.__dataclass_fields__
        assert hasattr(selector_mod, "CacheDType")


def test_register_is_idempotent():
    from typing import get_args

    import vllm.config.cache as cache_mod

    registration._done = False
    registration.register()
    registration._done = False
    registration.register()
    names = list(get_args(cache_mod.CacheDType)) if not hasattr(cache_mod, "KV_CACHE_DTYPES") else cache_mod.KV_CACHE_DTYPES
    for d in KVQ_DTYPES:
        assert names.count(d) == 1


@pytest.mark.parametrize("dtype", KVQ_DTYPES)
def test_cache_config_accepts_our_dtypes(dtype):
    from vllm.config.cache import CacheConfig
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    assert CacheConfig(cache_dtype=dtype).cache_dtype == dtype
    assert STR_DTYPE_TO_TORCH_DTYPE[dtype] == torch.uint8


def test_cache_config_rejects_unknown_dtype():
    from vllm.config.cache import CacheConfig

    with pytest.raises(Exception) as e:
        CacheConfig(cache_dtype="turboquant5")
    assert "turboquant3" in str(e.value)  # the error lists the valid names, ours included


def test_cli_lists_our_dtypes_and_rejects_unknown():
    """The real `vllm` CLI (argparse built after the plugin loaded)."""
    ok = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "--help=cache"],
                        capture_output=True, text=True, timeout=300)
    assert "turboquant3" in ok.stdout + ok.stderr
    bad = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "x", "--kv-cache-dtype",
                          "turboquant5"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    err = bad.stderr
    assert "turboquant5" in err and "turboquant3" in err and "uniform4" in err


@pytest.mark.parametrize("dtype", ["turboquant3", "turboquant2.5", "kvq"])
def test_selector_routes_our_dtypes(dtype):
    from vllm.v1.attention.selector import AttentionSelectorConfig, _cached_get_attn_backend

    from vllm.config import VllmConfig, set_current_vllm_config

    sel = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype=dtype, block_size=None)
    with set_current_vllm_config(VllmConfig(additional_config={"kvq_config": "turboquant3"})):
        backend = _cached_get_attn_backend(None, sel)
    assert backend.kvq_dtype == dtype and backend.get_name() == "CUSTOM"
    other = _cached_get_attn_backend(None, sel._replace(kv_cache_dtype="auto"))
    assert not hasattr(other, "kvq_dtype")


@pytest.mark.parametrize("field,value,needle", [
    ("use_mla", True, "MLA"),
    ("has_sliding_window", True, "sliding-window"),
    ("has_sink", True, "sinks"),
    ("head_size", 48, "head size 48"),
])
def test_selector_rejects_unsupported_layers(field, value, needle):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_kvq.vllm.selection import UnsupportedLayerError, choose_backend

    sel = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="turboquant3", block_size=None)
    with pytest.raises(UnsupportedLayerError) as e:
        choose_backend(sel._replace(**{field: value}))
    msg = str(e.value)
    assert needle in msg and "turboquant3" in msg
    if field != "head_size":
        assert "--kv-cache-dtype-skip-layers" in msg
    else:
        assert "64" in msg and "128" in msg  # lists the supported sizes


V033 = ROOT / ".cache" / "vllm-0.33"
V033_SCRIPT = r'''
import sys, torch
import vllm
assert vllm.__version__.startswith("0.33"), vllm.__version__
import vllm.config.cache as cc
assert hasattr(cc, "register_kv_cache_dtype")
from vllm_kvq.vllm import registration
from vllm_kvq.vllm.dtypes import KVQ_DTYPES
registration.register(); registration.register()
assert all(cc.KV_CACHE_DTYPES.count(d) == 1 for d in KVQ_DTYPES), cc.KV_CACHE_DTYPES
assert cc.CacheConfig(cache_dtype="turboquant3").cache_dtype == "turboquant3"
from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
assert STR_DTYPE_TO_TORCH_DTYPE["turboquant3"] == torch.uint8
from vllm.v1.attention.selector import AttentionSelectorConfig, _cached_get_attn_backend
sel = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="turboquant3", block_size=None)
b = _cached_get_attn_backend(None, sel)
assert b.kvq_dtype == "turboquant3", b
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVQuantMode, get_kv_quant_mode, is_quantized_kv_cache
# Our dtypes read as unquantized to vLLM's generic paths: FlashAttention's builder for bf16 skip layers
# (flash_attn.py: fp8 FA3 schedule when the run-wide dtype "is quantized"), FA4's refusal (fa_utils.py) and the
# fp8 KV-scale loader (quantization/kv_cache.py) all ask is_quantized_kv_cache(cache_config.cache_dtype).
for d in KVQ_DTYPES:
    mode = get_kv_quant_mode(d)
    assert mode == KVQuantMode.NONE and not mode.is_octave and not is_quantized_kv_cache(d), (d, mode)
spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.uint8,
                         kv_quant_mode=get_kv_quant_mode("turboquant3"))
ours = b.customize_spec(spec).page_size_bytes  # no vLLM config current: the backend's own config sizes it
skip = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.bfloat16,
                         kv_quant_mode=get_kv_quant_mode("auto"))
assert b.customize_spec(skip) == skip, "a bf16 skip layer's spec must keep its own page"
base = skip.page_size_bytes
print("RATIO", base / ours)
'''


@pytest.mark.skipif(os.environ.get("VLLM_KVQ_SKIP_V033") == "1", reason="VLLM_KVQ_SKIP_V033=1")
def test_vllm_033_official_registration_path(tiny_model):
    """vLLM 0.33's pure-Python modules (from its CUDA wheel) against our registration."""
    assert (V033 / "vllm" / "config" / "cache.py").exists(), "vLLM 0.33 sources missing: run scripts/setup_env.sh"

    env = {**os.environ, "PYTHONPATH": f"{V033}{os.pathsep}{ROOT}"}
    p = subprocess.run([sys.executable, "-c", V033_SCRIPT, tiny_model], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ratio = float(p.stdout.split("RATIO")[1])
    assert ratio == pytest.approx(256 / 52)

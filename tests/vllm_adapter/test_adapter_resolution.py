"""The adapter's decisions that a GPU deployment exercises and a single-process CPU engine does not:
speculative draft layers, pipeline and tensor parallelism, a standalone draft model, selector flags,
skip-layer specs, CUDA-graph metadata. Real vLLM classes and configs, no engine (seconds, not minutes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm_kvq import config as _config  # noqa: E402
from vllm_kvq.kv_format import formats_from_config  # noqa: E402
from vllm_kvq.vllm import registration  # noqa: E402
from vllm_kvq.vllm.formats import ModelShape, ServedFormats, slot_bytes  # noqa: E402

PER_HEAD_YAML = """
name: per-head
key: turboquant3
value: turboquant3
overrides:
  - heads: 1
    key: uniform8
    value: uniform8
"""
LATE_LAYERS_YAML = """
name: late-layers
key: turboquant3
value: turboquant3
overrides:
  - layers: "2:"
    key: uniform8
"""


@pytest.fixture(scope="module", autouse=True)
def registered():
    registration.register()


@pytest.fixture(scope="module")
def tiny_model_3layers(tmp_path_factory) -> str:
    from vllm_kvq.eval.models import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny3"), num_layers=3))


def _vllm_config(model: str, additional: dict | None = None):
    from vllm.config import ModelConfig, VllmConfig

    return VllmConfig(model_config=ModelConfig(model=model, dtype="bfloat16"), additional_config=additional or {})


def _backend(dtype: str, additional: dict | None = None, vc=None):
    """Our backend class exactly as vLLM's selector picks it (inside the model's config when given)."""
    from vllm.config import set_current_vllm_config
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_kvq.vllm.selection import choose_backend

    sel = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype=dtype, block_size=None)
    if vc is None:
        return resolve_obj_by_qualname(choose_backend(sel))
    with set_current_vllm_config(vc):
        return resolve_obj_by_qualname(choose_backend(sel))


def _impl(backend, vc, num_kv_heads: int = 2):
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(vc):
        return backend.get_impl_cls()(num_heads=4, head_size=64, scale=0.125, num_kv_heads=num_kv_heads,
                                      kv_cache_dtype=backend.kvq_dtype)


def _layer(i: int, prefix: str = "model"):
    return SimpleNamespace(layer_name=f"{prefix}.layers.{i}.self_attn.attn")


def _spec(dtype: torch.dtype, num_kv_heads: int = 2, head_size: int = 64):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec(block_size=16, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype)


# 1. Speculative decoding: EAGLE/EAGLE3/MTP draft layers are numbered after the target's.

def test_draft_layers_get_the_default_codecs_at_their_own_slot(tiny_model, tmp_path):
    yaml = tmp_path / "late.yaml"
    yaml.write_text(LATE_LAYERS_YAML.replace('"2:"', "-1"))  # the target's last layer (1) is wider
    vc = _vllm_config(tiny_model, {"kvq_config": str(yaml)})
    impl = _impl(_backend("kvq", vc=vc), vc)
    last = impl._format(_layer(1))
    draft = _impl(_backend("kvq", vc=vc), vc)._format(_layer(2))  # tiny_model has layers 0 and 1: index 2 is an EAGLE draft layer
    assert draft.slot_bytes == 52 < last.slot_bytes  # turboquant3 K+V; the last layer's uint8 keys are wider
    assert [c.name for c in draft.keys] == ["turboquant3"] * 2 and last.keys[0].name == "uniform8"
    assert draft.num_kv_heads == 2


# 2. Pipeline parallelism: layer names keep global indices on every stage.

def test_pipeline_stage_resolves_against_the_whole_model(tiny_model_3layers, tmp_path):
    yaml = tmp_path / "last.yaml"
    yaml.write_text(LATE_LAYERS_YAML.replace('"2:"', "-1"))
    vc = _vllm_config(tiny_model_3layers, {"kvq_config": str(yaml)})
    vc.parallel_config.pipeline_parallel_size = 2
    vc.parallel_config.rank = 1  # stage 1 of 2: layers 2.. of 3; vLLM's per-stage count would be 1
    assert vc.model_config.get_num_layers(vc.parallel_config) == 1
    impl = _impl(_backend("kvq", vc=vc), vc)
    fmt = impl._format(_layer(2))
    assert fmt.keys[0].name == "uniform8"  # layers: -1 is the model's last layer, not the stage's


# 3. Tensor parallelism: YAML heads and calibration are global; each rank takes its own heads.

@pytest.mark.parametrize("total,tp,expected", [
    (8, 2, [(0, 1, 2, 3), (4, 5, 6, 7)]),
    (2, 2, [(0,), (1,)]),
    (2, 4, [(0,), (0,), (1,), (1,)]),  # replicated KV heads (TP > KV heads)
    (1, 2, [(0,), (0,)]),
])
def test_rank_heads_follow_vllms_sharding(total, tp, expected):
    assert [ModelShape(4, total, 64, r, tp).rank_heads() for r in range(tp)] == expected


def test_tp_rank_resolves_global_heads(tiny_model, tmp_path, monkeypatch):
    from vllm.distributed import parallel_state

    yaml = tmp_path / "per_head.yaml"
    yaml.write_text(PER_HEAD_YAML)
    vc = _vllm_config(tiny_model, {"kvq_config": str(yaml)})
    backend = _backend("kvq", vc=vc)
    vc.parallel_config.tensor_parallel_size = 2
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: True)
    fmts = {}
    for rank in (0, 1):
        monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda r=rank: r)
        fmts[rank] = _impl(backend, vc, num_kv_heads=1)._format(_layer(0))
    assert fmts[0].keys[0].name == "turboquant3" and fmts[1].keys[0].name == "uniform8"  # heads: 1 is global
    page = backend.customize_spec(_spec(torch.uint8, num_kv_heads=1)).page_size_bytes
    assert fmts[0].slot_bytes == fmts[1].slot_bytes == page // 16  # one page size on every rank


def test_tp_calibration_checks_the_checkpoint_shape_and_slices_heads():
    cfg = _config.load(str(_config.preset_dir() / "calibration" / "smollm2-135m-tq3.yaml"))
    whole = formats_from_config(cfg, num_layers=30, num_kv_heads=3, head_size=64)
    rank1 = ServedFormats(cfg, ModelShape(30, 3, 64, tp_rank=1, tp_size=3))
    for layer in (0, 29):
        f = rank1.for_layer(layer)
        assert f.num_kv_heads == 1
        assert torch.equal(f.k_scale, whole[layer].k_scale[1:2]) and torch.equal(f.v_shift, whole[layer].v_shift[1:2])
        # the shipped file centres keys by position: this rank's head of the pre-RoPE key mean
        assert torch.equal(f.key_rope.mu, whole[layer].key_rope.mu[1:2])
    assert rank1.slot_bytes == slot_bytes(cfg, 64)


def test_tp_rank_keeps_position_aware_key_centring(tmp_path):
    """A calibration with RoPE frequencies (`vllm-kvq calibrate`'s default) keeps its position-aware key mean in
    the formats vLLM serves: every rank's heads of it, padded formats included."""
    from vllm_kvq.calibration import CalibrationStats

    g = torch.Generator().manual_seed(0)
    CalibrationStats(torch.randn(30, 3, 64, generator=g), torch.randn(30, 3, 64, generator=g),
                     torch.rand(30, 3, 64, generator=g) + 0.5,
                     rope_freq=1e5 ** (-torch.arange(32) / 32)).save(tmp_path / "c.safetensors")
    (tmp_path / "c.yaml").write_text("key: turboquant4\nvalue: turboquant4\ncalibration: c.safetensors\n"
                                     "smooth_keys: true\nsink_tokens: 1\n")
    cfg = _config.load(str(tmp_path / "c.yaml"))
    whole = formats_from_config(cfg, num_layers=30, num_kv_heads=3, head_size=64, block_size=16)
    rank1 = ServedFormats(cfg, ModelShape(30, 3, 64, tp_rank=1, tp_size=3), block_size=16)
    for layer in (0, 29):
        f = rank1.for_layer(layer)
        assert f.key_rope is not None and f.k_shift is None
        assert torch.equal(f.key_rope.mu, whole[layer].key_rope.mu[1:2])
        assert rank1.for_layer(layer, cache_slot=f.slot_bytes + 8).key_rope is f.key_rope


# 4. Selector flags our kernels cannot honour.

@pytest.mark.parametrize("flag,needle", [
    ("use_mm_prefix", "multimodal"), ("use_non_causal", "non-causal"), ("use_rswa", "reverse sliding"),
    ("use_dcp", "decode context parallelism"), ("use_pcp", "prefill context parallelism"),
    ("use_batch_invariant", "batch-invariant"), ("use_adaptive_verification", "adaptive"),
    ("use_mla", "MLA"), ("use_sparse", "sparse"),
])
def test_selector_rejects_each_unsupported_flag(flag, needle):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_kvq.vllm.selection import UnsupportedLayerError, choose_backend

    sel = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="turboquant3", block_size=None)
    assert choose_backend(sel)  # the plain layer is ours
    with pytest.raises(UnsupportedLayerError) as e:
        choose_backend(sel._replace(**{flag: True}))
    assert needle in str(e.value) and "turboquant3" in str(e.value)


# 5. Only our own specs get our slot; block sizes align with FlashAttention's.

def test_customize_spec_leaves_other_specs_alone():
    backend = _backend("turboquant3")
    bf16 = _spec(torch.bfloat16)
    assert backend.customize_spec(bf16) == bf16  # a bf16 skip layer keeps its own page
    ours = backend.customize_spec(_spec(torch.uint8))
    assert ours.state_content_bytes == 52 and ours.page_size_bytes == 16 * 2 * 52


def test_kernel_block_sizes_align_with_flash_attention():
    from vllm.v1.attention.backend import MultipleOf

    sizes = _backend("turboquant3").get_supported_kernel_block_sizes()
    assert len(sizes) == 1 and isinstance(sizes[0], MultipleOf) and sizes[0].base == 16


# 7. Pages come from the backend's own config, never from "the last model this process saw".

def test_standalone_draft_and_target_each_resolve_their_own_model(tiny_model, tiny_model_3layers, tmp_path):
    yaml = tmp_path / "late.yaml"
    yaml.write_text(LATE_LAYERS_YAML.replace('"2:"', "-1"))
    additional = {"kvq_config": str(yaml)}
    target_vc, draft_vc = _vllm_config(tiny_model_3layers, additional), _vllm_config(tiny_model, additional)
    backend = _backend("kvq", vc=target_vc)
    target = [_impl(backend, target_vc)._format(_layer(i)) for i in range(3)]
    draft = [_impl(backend, draft_vc)._format(_layer(i, "draft_model.model")) for i in range(2)]
    assert [f.keys[0].name for f in target] == ["turboquant3", "turboquant3", "uniform8"]
    assert [f.keys[0].name for f in draft] == ["turboquant3", "uniform8"]  # -1 is the draft's own last layer
    # vLLM asks for the page outside any config, after the draft was built last.
    assert backend.customize_spec(_spec(torch.uint8)).state_content_bytes == target[2].slot_bytes


TARGET_LAYERS_YAML = """
name: target-layers
key: turboquant3
value: turboquant3
overrides:
  - layers: [0, 2]
    key: uniform8
"""


def _draft_vllm_config(draft: str, target: str, additional: dict):
    """The config vLLM makes current while it builds a standalone draft model (``draft_model.py``): the
    draft's model config, with the speculative config naming draft and target."""
    from vllm.config import ModelConfig

    vc = _vllm_config(draft, additional)
    vc.speculative_config = SimpleNamespace(draft_model_config=vc.model_config,
                                            target_model_config=ModelConfig(model=target, dtype="bfloat16"))
    return vc


def test_standalone_draft_drops_layers_only_the_target_has(tiny_model, tiny_model_3layers, tmp_path):
    """The YAML is written for the target, and vLLM hands it to the draft too: a layer the draft lacks is
    dropped from its override (the rest applies), instead of failing start-up. A plain
    2-layer model served with the same YAML still gets the error (a typo must not pass)."""
    yaml = tmp_path / "target.yaml"
    yaml.write_text(TARGET_LAYERS_YAML)
    additional = {"kvq_config": str(yaml)}
    target_vc = _vllm_config(tiny_model_3layers, additional)
    backend = _backend("kvq", vc=target_vc)
    target = [_impl(backend, target_vc)._format(_layer(i)) for i in range(3)]
    draft_vc = _draft_vllm_config(tiny_model, tiny_model_3layers, additional)
    draft = [_impl(backend, draft_vc)._format(_layer(i, "draft_model.model")) for i in range(2)]
    assert [f.keys[0].name for f in target] == ["uniform8", "turboquant3", "uniform8"]
    assert [f.keys[0].name for f in draft] == ["uniform8", "turboquant3"]
    assert [f.slot_bytes for f in draft] == [f.slot_bytes for f in target[:2]]  # same codecs, same slots
    with pytest.raises(_config.ConfigError, match="layer index 2 out of range"):
        _impl(backend, _vllm_config(tiny_model, additional))


def test_standalone_draft_detection_leaves_eagle_and_mtp_alone(tiny_model, tiny_model_3layers):
    from vllm.config import ModelConfig

    from vllm_kvq.vllm.backend import standalone_draft

    target = _vllm_config(tiny_model_3layers)
    assert not standalone_draft(target)
    assert standalone_draft(_draft_vllm_config(tiny_model, tiny_model_3layers, {}))
    # EAGLE: built under the target's model config; MTP: the draft is the target's own checkpoint.
    target.speculative_config = SimpleNamespace(draft_model_config=ModelConfig(model=tiny_model, dtype="bfloat16"),
                                                target_model_config=target.model_config)
    assert not standalone_draft(target)
    target.speculative_config = SimpleNamespace(draft_model_config=target.model_config,
                                                target_model_config=target.model_config)
    assert not standalone_draft(target)


CUSTOMIZE_WITHOUT_MODEL = r"""
import torch
from vllm_kvq.vllm import registration
registration.register()
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm_kvq.vllm.backend import KVQBackend_turboquant3 as B
spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.uint8)
print("SLOT", B.customize_spec(spec).state_content_bytes)
"""


def test_customize_spec_needs_no_model_in_the_process():
    """vLLM sizes pages (platforms' block alignment, the engine's spec collection) where no model was built
    and no config is current."""
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", CUSTOMIZE_WITHOUT_MODEL], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert int(p.stdout.split("SLOT")[1]) == 52


# 9. CUDA graphs: what the builder declares and what building metadata does on the host.

def test_builder_declares_single_token_decode_graphs():
    from vllm.v1.attention.backend import AttentionCGSupport

    builder = _backend("turboquant3").get_builder_cls()
    assert builder.get_cudagraph_support(None, None) == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


def test_decode_metadata_reads_nothing_back_to_the_host(monkeypatch):
    builder_cls = _backend("turboquant3").get_builder_cls()
    builder = builder_cls(_spec(torch.uint8), ["model.layers.0.self_attn.attn"], None, torch.device("cpu"))
    s = 4
    cam = SimpleNamespace(num_reqs=s, seq_lens=torch.tensor([5, 9, 1, 30, 0, 0], dtype=torch.int32),
                          query_start_loc=torch.arange(s + 3, dtype=torch.int32),
                          block_table_tensor=torch.zeros(s + 2, 8, dtype=torch.int32),
                          slot_mapping=torch.arange(s, dtype=torch.int64), num_actual_tokens=s, max_query_len=1,
                          max_seq_len=30)

    def forbidden(*a, **k):
        raise AssertionError("metadata building read a device value on the host (a sync; breaks capture)")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    md = builder.build(0, cam)
    monkeypatch.undo()
    assert md.seq_lens.data_ptr() == cam.seq_lens.data_ptr()  # views of vLLM's persistent buffers
    assert md.block_table.data_ptr() == cam.block_table_tensor.data_ptr()
    assert md.seq_lens.shape == (s,) and md.query_start_loc.shape == (s + 1,) and md.block_table.shape[0] == s


# Issue 8: one source of truth for served dtypes, no import cycle.

def test_served_dtypes_are_the_presets():
    from vllm_kvq.vllm.dtypes import CONFIG_DTYPE, KVQ_DTYPES, NAMED_DTYPES

    assert set(NAMED_DTYPES) == set(_config.preset_names()) and KVQ_DTYPES == NAMED_DTYPES + (CONFIG_DTYPE,)


@pytest.mark.parametrize("name", ["fp8_mine", "nvfp4x", "turboquant_5bit", "octave_k2", "int8_per_token_head",
                                  "my_ds_mla", "auto", "kvq"])
def test_a_preset_whose_name_collides_with_vllm_is_refused(tmp_path, name):
    from vllm_kvq.vllm.dtypes import served_dtypes

    (tmp_path / "turboquant3.yaml").write_text("name: t\nkey: turboquant3\nvalue: turboquant3\n")
    assert served_dtypes(tmp_path) == ("turboquant3",)
    (tmp_path / f"{name}.yaml").write_text("name: t\nkey: turboquant3\nvalue: turboquant3\n")
    with pytest.raises(_config.ConfigError) as e:
        served_dtypes(tmp_path)
    assert name in str(e.value) and "Rename" in str(e.value)


def test_selection_does_not_import_the_backend():
    import subprocess
    import sys

    code = ("import sys, vllm_kvq.vllm.selection, vllm_kvq.vllm.dtypes, vllm_kvq.vllm.formats; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith(('vllm.', 'vllm_kvq.vllm.backend'))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"  # neither vLLM nor our backend until a layer is routed


def test_each_engine_gets_its_own_kvq_yaml(tmp_path):
    """vLLM memoizes backend choice per selector config, which does not hold additional_config."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.v1.attention.selector import AttentionSelectorConfig, _cached_get_attn_backend

    sel = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="kvq", block_size=None)
    chosen = []
    for preset in ("turboquant3", "turboquant4"):
        with set_current_vllm_config(VllmConfig(additional_config={"kvq_config": preset})):
            chosen.append(_cached_get_attn_backend(None, sel))
    assert [b.kvq_config.name for b in chosen] == ["turboquant3", "turboquant4"]
    assert _cached_get_attn_backend(None, sel._replace(kv_cache_dtype="turboquant3")).kvq_dtype == "turboquant3"


def test_no_host_context_bound_is_baked_into_a_captured_graph(monkeypatch):
    """Split-K sized from max_seq_len at capture would drop the tokens of longer contexts at replay."""
    from vllm_kvq.vllm.backend import replay_safe_max_seq_len

    md = SimpleNamespace(max_seq_len=300)
    cuda_query = SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert replay_safe_max_seq_len(cuda_query, md) is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert replay_safe_max_seq_len(cuda_query, md) == 300  # eager steps keep the tighter split-K sizing


def test_cpu_backends_store_inside_forward():
    """On vLLM-CPU the backend stores the step's K/V in ``forward`` (vLLM then skips its separate
    ``unified_kv_cache_update`` op: one custom-op dispatch less per layer); elsewhere vLLM calls
    ``do_kv_cache_update`` first. The engine tests check the outputs of this path."""
    from vllm.platforms import current_platform

    from vllm_kvq.vllm.backend import backend_for

    cls = backend_for("turboquant3", _config.load("turboquant3"))
    assert current_platform.is_cpu()
    assert cls.forward_includes_kv_cache_update is True and cls.get_impl_cls().store_in_forward is True

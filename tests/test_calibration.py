"""Calibrated formats: statistics from a model, the config key, store/attention with shifted and scaled K/V.

The attention check decodes the cache by hand and adds back *everything* (keys ``* k_scale + k_shift``,
values ``+ v_shift``) before a dense reference, so it also checks the claim that leaving ``k_shift`` out of
the scores changes nothing.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from vllm_kvq import calibration, cli, codecs, config, ops
from vllm_kvq.calibration import CalibrationStats
from vllm_kvq.kv_format import KVFormat, formats_from_config, kv_format
from vllm_kvq.testing import paged_reference, random_paged_batch, relative_error

CALIB_DIR = Path(__file__).resolve().parents[1] / "configs" / "calibration"


# ---- statistics from a model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama (4 query / 2 KV heads, head_dim 64) in float32, eager attention."""
    from transformers import AutoModelForCausalLM

    from vllm_kvq.eval.models import make_tiny_llama

    torch.set_num_threads(min(2, torch.get_num_threads()))
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=300)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return path, model


def _layer0_qkv_by_hand(model, ids):
    """Post-RoPE queries (Hq, N, D), keys and values (Hk, N, D) of layer 0 from the weights: independent of
    the cache and attention paths."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = model.model
    attn = m.layers[0].self_attn
    with torch.no_grad():
        h = m.layers[0].input_layernorm(m.embed_tokens(ids[None]))
        hq, hk, d = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim
        q = attn.q_proj(h).view(1, -1, hq, d).transpose(1, 2)
        k = attn.k_proj(h).view(1, -1, hk, d).transpose(1, 2)
        v = attn.v_proj(h).view(1, -1, hk, d).transpose(1, 2)
        cos, sin = m.rotary_emb(h, torch.arange(ids.numel())[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q[0], k[0], v[0]


def _layer0_kv_by_hand(model, ids):
    """Post-RoPE keys and values of layer 0 from the weights, (Hk, N, D)."""
    return _layer0_qkv_by_hand(model, ids)[1:]


def test_compute_shapes_and_centred_statistics(tiny):
    _, model = tiny
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    st = calibration.compute(model, ids, skip_first=4, smooth_alpha=0.5)
    assert st.shape == (2, 2, 64) and st.mu_k.dtype == torch.float32
    st.check(2, 2, 64)
    k, v = _layer0_kv_by_hand(model, ids)
    k, v = k[:, 4:], v[:, 4:]
    # the means are the means of what attention caches (after RoPE), first positions excluded ...
    torch.testing.assert_close(st.mu_k[0], k.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.mu_v[0], v.mean(1), atol=1e-5, rtol=1e-5)
    assert (k - st.mu_k[0][:, None]).mean(1).abs().max() < 1e-5
    assert st.mu_k[0].norm() > 0.1  # RoPE'd random keys have a mean to remove: the check is not vacuous
    # ... and the key scale is (rms(centred k) / rms(q)) ** 0.5, the KV head's query heads' mean squares
    # averaged, normalised to geometric mean 1 per head
    q = _layer0_qkv_by_hand(model, ids)[0][:, 4:]
    q_ms = q.pow(2).mean(1).reshape(2, -1, 64).mean(1)
    k_ms = (k - k.mean(1, keepdim=True)).pow(2).mean(1)
    s = (k_ms / q_ms) ** 0.25
    torch.testing.assert_close(st.k_smooth[0], s / s.log().mean(-1, keepdim=True).exp(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st.k_smooth.log().mean(-1), torch.zeros(2, 2), atol=1e-5, rtol=0)
    assert dict(st.metadata)["smooth_queries"] == "1"
    # key-only: rms(centred k) ** 0.5
    ko = calibration.compute(model, ids, skip_first=4, smooth_alpha=0.5, smooth_queries=False)
    s = k_ms ** 0.25
    torch.testing.assert_close(ko.k_smooth[0], s / s.log().mean(-1, keepdim=True).exp(), atol=1e-5, rtol=1e-5)
    assert (ko.k_smooth - st.k_smooth).abs().max() > 0.05  # the queries moved the scales: not vacuous
    assert model.config._attn_implementation == "eager"  # recording the queries left the model as it was
    flat = calibration.compute(model, ids, smooth_alpha=0.0)
    assert torch.equal(flat.k_smooth, torch.ones(2, 2, 64))
    with pytest.raises(ValueError, match="more than skip_first=4"):
        calibration.compute(model, ids[:4])


def test_cli_writes_a_loadable_file(tiny, tmp_path, capsys):
    path, _ = tiny
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    out = tmp_path / "sub" / "c.safetensors"
    assert cli.main(["calibrate", str(path), "--text", str(text), "--tokens", "48", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "layer   1" in err and "wrote" in err
    st = CalibrationStats.load(out)
    assert st.shape == (2, 2, 64) and dict(st.metadata)["tokens"] == "48"
    assert dict(st.metadata)["smooth_queries"] == "1"
    ko = tmp_path / "key-only.safetensors"
    assert cli.main(["calibrate", str(path), "--text", str(text), "--tokens", "48", "--out", str(ko),
                     "--no-smooth-queries"]) == 0
    st_ko = CalibrationStats.load(ko)
    assert dict(st_ko.metadata)["smooth_queries"] == "0"
    assert torch.equal(st_ko.mu_k, st.mu_k) and not torch.allclose(st_ko.k_smooth, st.k_smooth)


def test_compute_refuses_query_weighting_without_the_queries(tiny, monkeypatch):
    """A model whose layers do not attend through transformers' attention interface gives no queries: compute
    says so and names the key-only way out, which does not touch the model's attention at all."""
    import contextlib

    from vllm_kvq import fake_quant

    _, model = tiny
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))

    @contextlib.contextmanager
    def sees_nothing(model, skip_first=0):
        yield {}

    monkeypatch.setattr(fake_quant, "recording_query_energy", sees_nothing)
    with pytest.raises(ValueError, match="saw the queries of 0 of 2 layers.*--no-smooth-queries"):
        calibration.compute(model, ids)

    def must_not_record(*a, **k):
        raise AssertionError("key-only calibration recorded queries")

    monkeypatch.setattr(fake_quant, "recording_query_energy", must_not_record)
    assert calibration.compute(model, ids, smooth_queries=False).shape == (2, 2, 64)


# ---- attention with a calibrated format ---------------------------------------------------------------

def _calibrated_format(keys, values, gen, *, smooth=True):
    hk, d = len(keys), keys[0].head_dim
    return KVFormat(d, keys, values, name="cal",
                    k_shift=torch.randn(hk, d, generator=gen) * 3,
                    v_shift=torch.randn(hk, d, generator=gen),
                    k_scale=torch.rand(hk, d, generator=gen) * 1.5 + 0.25 if smooth else None)


def _decode_by_hand(fmt, cache, slots):
    """(L, Hk, D) keys and values as the cache holds them, with every calibration term added back."""
    t = cache.shape[2]
    rows = cache[slots // t, :, slots % t]  # (L, Hk, C)
    k = torch.stack([fmt.keys[h].decode(rows[:, h, :fmt.keys[h].nbytes].contiguous())
                     for h in range(fmt.num_kv_heads)], 1)
    v = torch.stack([fmt.values[h].decode(rows[:, h, fmt.keys[h].nbytes:
                                                   fmt.keys[h].nbytes + fmt.values[h].nbytes].contiguous())
                     for h in range(fmt.num_kv_heads)], 1)
    if fmt.k_scale is not None:
        k = k * fmt.k_scale
    return k + fmt.k_shift, v + fmt.v_shift


@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed-codecs"])
@pytest.mark.parametrize("smooth", [True, False], ids=["smooth", "centre-only"])
def test_reference_attention_equals_dense_on_decoded_kv(gen, mixed, smooth):
    d, hk, hq = 64, 2, 6
    tq3, tq4 = codecs.get("turboquant3", head_dim=d), codecs.get("turboquant4", head_dim=d)
    keys = [tq3, tq4] if mixed else [tq3, tq3]
    fmt = _calibrated_format(keys, [tq3, tq3], gen, smooth=smooth)
    assert fmt.calibrated and len(fmt.groups) == (2 if mixed else 1)
    batch = random_paged_batch([37, 16, 9], [37, 1, 4], 16, generator=gen)  # prefill, decode, chunked
    total = int(batch.seq_lens.sum())
    k = torch.randn(total, hk, d, generator=gen) + 4  # a large common mean, as real keys have
    v = torch.randn(total, hk, d, generator=gen) - 2
    cache = fmt.allocate(batch.num_blocks, batch.block_size)
    ops.store(k, v, cache, batch.ctx_slots, fmt)
    # the stored codes are the codec's bytes of the shifted and scaled rows
    kc = (k[:, 1] - fmt.k_shift[1]) / (fmt.k_scale[1] if smooth else 1)
    slot0 = cache[batch.ctx_slots // 16, 1, batch.ctx_slots % 16]
    assert torch.equal(slot0[:, :keys[1].nbytes], keys[1].encode(kc))
    q = torch.randn(batch.num_tokens, hq, d, generator=gen)
    scale = 1 / math.sqrt(d)
    out = ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt, scale=scale)
    k_hat, v_hat = _decode_by_hand(fmt, cache, batch.ctx_slots)
    ref = paged_reference(q, k_hat, v_hat, batch, scale)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_calibration_beats_plain_on_offset_outlier_kv(gen):
    """Keys with a large common mean and a few strong channels, values with a common mean: what calibration
    is for. Statistics come from one sample, the error is measured on another."""
    d, hk, hq, n = 64, 2, 4, 256
    mean_k = torch.randn(hk, d, generator=gen) * 4
    mean_v = torch.randn(hk, d, generator=gen) * 2
    spread = torch.ones(hk, d)
    spread[:, :4] = 8.0  # outlier channels

    def sample():
        k = torch.randn(n, hk, d, generator=gen) * spread + mean_k
        return k, torch.randn(n, hk, d, generator=gen) + mean_v

    rows = [calibration.statistics(*(x.transpose(0, 1) for x in sample()))]
    mu_k, mu_v, s = rows[0]
    tq3 = codecs.get("turboquant3", head_dim=d)
    plain = KVFormat(d, [tq3] * hk, [tq3] * hk)
    centred = KVFormat(d, [tq3] * hk, [tq3] * hk, k_shift=mu_k, v_shift=mu_v)
    smoothed = KVFormat(d, [tq3] * hk, [tq3] * hk, k_shift=mu_k, v_shift=mu_v, k_scale=s)
    k, v = sample()
    batch = random_paged_batch([n], [n], 16, generator=gen)
    # queries not aligned with the key outliers: smoothing trades key error in strong channels for error in
    # weak ones, which pays when the query weighs channels evenly (it hurts when q peaks on the outliers too)
    q = torch.randn(n, hq, d, generator=gen) / 2
    scale = 1 / math.sqrt(d)
    exact = paged_reference(q, k, v, batch, scale)
    err = {}
    for name, fmt in (("plain", plain), ("centred", centred), ("smoothed", smoothed)):
        cache = fmt.allocate(batch.num_blocks, 16)
        ops.store(k, v, cache, batch.ctx_slots, fmt)
        out = ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt,
                                  scale=scale)
        err[name] = relative_error(out, exact)
    assert err["centred"] < 0.5 * err["plain"], err
    assert err["smoothed"] < 0.9 * err["centred"], err  # measured 0.090 / 0.031 / 0.026


# ---- dispatch -----------------------------------------------------------------------------------------

def test_dispatch_skips_impls_that_decline_a_format(gen, monkeypatch):
    """ops dispatch asks each implementation's ``why_not``: one that declines bound state is skipped (and
    named with its reason when asked for explicitly)."""
    calls = []

    def why_not(fmt, op, decode, group):
        return "no per-head state here" if fmt.calibrated else None

    fast = ops.Impl("fast", lambda *a, **k: calls.append(1), None, why_not)
    table = ops._table()
    monkeypatch.setattr(ops, "_table", lambda: {**table, "fast": fast})
    monkeypatch.setitem(ops.ORDER, "cpu", ("fast", "reference"))
    monkeypatch.setattr(ops, "IMPLS", ops.IMPLS + ("fast",))
    tq3 = codecs.get("turboquant3", head_dim=64)
    plain = KVFormat(64, [tq3], [tq3])
    cal = _calibrated_format([tq3], [tq3], gen)
    assert ops.plan(cal, "cpu", "store") == {"fast": "no per-head state here", "reference": None}
    k = torch.randn(3, 1, 64, generator=gen)
    for fmt in (plain, cal):
        cache = fmt.allocate(1, 16)
        ops.store(k, k, cache, torch.arange(3), fmt)
    assert len(calls) == 1  # the plain format ran the fast one, the calibrated one the reference
    assert cache.any()  # ... which wrote the calibrated format's cache
    with pytest.raises(ValueError, match="impl 'fast' cannot run store for format 'cal': no per-head state"):
        ops.store(k, k, cache, torch.arange(3), cal, impl="fast")


def test_dispatch_choice_is_made_per_call_shape(gen, monkeypatch):
    """The hot path remembers its choice per format, op, decode-or-not and query heads per KV head: a
    format's decode call and prefill call still go where each is taken."""
    calls = []

    def why_not(fmt, op, decode, group):
        return None if decode and group == 2 else "decode steps of 2 query heads per KV head only"

    def fast(query, *a, **k):
        calls.append(query.shape[0])
        return torch.zeros(query.shape, dtype=query.dtype)

    fast_impl = ops.Impl("fast", None, fast, why_not)
    table = ops._table()
    monkeypatch.setattr(ops, "_table", lambda: {**table, "fast": fast_impl})
    monkeypatch.setitem(ops.ORDER, "cpu", ("fast", "reference"))
    tq3 = codecs.get("turboquant3", head_dim=64)
    fmt = KVFormat(64, [tq3], [tq3])
    cache = fmt.allocate(2, 16)
    ops.store(torch.randn(20, 1, 64, generator=gen), torch.randn(20, 1, 64, generator=gen), cache,
              torch.arange(20), fmt)
    bt, lens = torch.tensor([[0, 1]]), torch.tensor([20])

    def attend(n, hq):
        return ops.paged_attention(torch.randn(n, hq, 64, generator=gen), cache, bt, lens, torch.tensor([0, n]), fmt,
                                   scale=0.125)

    for _ in range(2):
        attend(1, 2)  # decode, group 2: fast
        ref = attend(4, 2)  # a prefill chunk: the reference
        attend(1, 3)  # decode, group 3: the reference
    assert calls == [1, 1]
    assert ref.abs().sum() > 0  # the reference attended (fast would give zeros)
    # a new dispatch order is a new choice
    monkeypatch.setitem(ops.ORDER, "cpu", ("reference",))
    attend(1, 2)
    assert calls == [1, 1]


def test_format_validates_calibration_tensors():
    tq3 = codecs.get("turboquant3", head_dim=64)
    with pytest.raises(ValueError, match=r"k_shift: expected \(2, 64\), got \(2, 32\)"):
        KVFormat(64, [tq3] * 2, [tq3] * 2, k_shift=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="k_scale must be positive"):
        KVFormat(64, [tq3], [tq3], k_scale=torch.zeros(1, 64))
    assert not KVFormat(64, [tq3], [tq3]).calibrated


# ---- config -------------------------------------------------------------------------------------------

def _write_stats(path, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    CalibrationStats(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g),
                     torch.rand(*shape, generator=g) + 0.5).save(path)
    return path


def test_config_calibration_relative_path_and_formats(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    st_path = _write_stats(tmp_path / "cfg" / "m.safetensors", (3, 2, 64))
    y = tmp_path / "cfg" / "c.yaml"
    y.write_text("name: c\nkey: turboquant3\nvalue: turboquant4\ncalibration: m.safetensors\n")
    monkeypatch.chdir(tmp_path)  # relative to the YAML file, not to the working directory
    cfg = config.load("cfg/c.yaml")
    assert Path(cfg.calibration).resolve() == st_path.resolve() and cfg.smooth_keys
    st = CalibrationStats.load(st_path)
    fmts = formats_from_config(cfg, num_layers=3, num_kv_heads=2, head_size=64, uniform_slot=True)
    assert all(f.calibrated for f in fmts)
    assert torch.equal(fmts[2].k_shift, st.mu_k[2]) and torch.equal(fmts[2].v_shift, st.mu_v[2])
    assert torch.equal(fmts[2].k_scale, st.k_smooth[2])
    assert "state per head (no cache bytes): K stored as (k - shift) / scale, V as v - shift" in fmts[0].describe()
    one = kv_format(cfg, 64, 2, layer=1, num_layers=3)
    assert torch.equal(one.v_shift, st.mu_v[1])
    with pytest.raises(ValueError, match="pass num_layers"):
        kv_format(cfg, 64, 2)
    no_smooth = config.from_dict({**cfg.model_dump(exclude={"key", "value"}), "key": "turboquant3",
                                  "value": "turboquant3", "smooth_keys": False})
    f = formats_from_config(no_smooth, num_layers=3, num_kv_heads=2, head_size=64)[0]
    assert f.k_scale is None and f.k_shift is not None
    # uncalibrated configs build uncalibrated formats
    assert not formats_from_config(config.load("turboquant3"), num_layers=3, num_kv_heads=2, head_size=64)[0].calibrated


def test_config_calibration_errors(tmp_path):
    base = {"key": "turboquant3", "value": "turboquant3"}
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(config.ConfigError, match=r"calibration: cannot read calibration file.*nope\.safetensors"):
        config.from_dict({**base, "calibration": missing})
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a tensor file")
    with pytest.raises(config.ConfigError, match="calibration: not a calibration file"):
        config.from_dict({**base, "calibration": str(junk)})
    with pytest.raises(config.ConfigError, match="calibration: Input should be a valid string"):
        config.from_dict({**base, "calibration": 3})
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file({"mu_k": torch.zeros(1, 1, 4)}, str(other))
    with pytest.raises(config.ConfigError, match=r"missing tensors \['mu_v', 'k_smooth'\]"):
        config.from_dict({**base, "calibration": str(other)})
    cfg = config.from_dict({**base, "calibration": str(_write_stats(tmp_path / "s.safetensors", (30, 3, 64)))})
    with pytest.raises(config.ConfigError, match=r"calibration: expected \(layers, kv_heads, head_size\) = "
                                                  r"\(4, 8, 128\) for every tensor, got mu_k \(30, 3, 64\)"):
        formats_from_config(cfg, num_layers=4, num_kv_heads=8, head_size=128)


@pytest.mark.parametrize("path", sorted(CALIB_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_calibrated_configs(path):
    """configs/calibration/ holds model-specific configs (not presets: they fit one model's shape)."""
    cfg = config.load(path)
    assert cfg.name == path.stem and cfg.description and cfg.calibration
    assert os.path.getsize(cfg.calibration) < 100_000
    fmts = formats_from_config(cfg, num_layers=30, num_kv_heads=3, head_size=64, uniform_slot=True, block_size=128)
    assert all(f.calibrated for f in fmts) and len(fmts) == 30
    assert path.stem not in config.preset_names()
    if cfg.sink_tokens:  # the description quotes the bytes at vLLM-CPU's 128-token blocks
        assert f"{fmts[0].slot_bytes} bytes per token per KV head" in " ".join(cfg.description.split())


CALIBRATED_PRESETS = [n for n in config.preset_names() if config.load(n).calibration == config.MODEL_CALIBRATION]


def test_calibrated_presets_read_the_models_own_file(tmp_path):
    """`calibration: model` presets serve any model `vllm-kvq calibrate MODEL_DIR` has written statistics
    into; without them the error names the model, the file and the command."""
    assert {"k4v4-cal-sink", "k3.5v3-cal-sink", "k3v3-cal-sink", "fib2-cal-sink"} <= set(CALIBRATED_PRESETS)
    model = tmp_path / "m"
    model.mkdir()
    for name in CALIBRATED_PRESETS:
        cfg = config.load(name)
        with pytest.raises(config.ConfigError, match=rf"needs calibration statistics of the model '{model}'.*"
                                                     rf"kvq/calibration\.safetensors.*vllm-kvq calibrate {model}"):
            formats_from_config(cfg, num_layers=3, num_kv_heads=2, head_size=64, block_size=128, model=str(model))
        with pytest.raises(config.ConfigError, match="no model directory is known"):
            formats_from_config(cfg, num_layers=3, num_kv_heads=2, head_size=64, block_size=128)
    config.model_calibration_path(model).parent.mkdir()
    st = CalibrationStats.load(_write_stats(config.model_calibration_path(model), (3, 2, 64)))
    for name in CALIBRATED_PRESETS:
        fmts = formats_from_config(config.load(name), num_layers=3, num_kv_heads=2, head_size=64, block_size=128,
                                   model=str(model))
        assert all(f.calibrated for f in fmts) and torch.equal(fmts[1].k_shift, st.mu_k[1])
        assert fmts[0].sink_tokens == 1
    with pytest.raises(config.ConfigError, match=r"expected \(layers, kv_heads, head_size\) = \(4, 2, 64\)"):
        formats_from_config(config.load(CALIBRATED_PRESETS[0]), num_layers=4, num_kv_heads=2, head_size=64,
                            block_size=128, model=str(model))


def test_cli_default_output_is_the_models_calibration(tiny, tmp_path):
    import shutil

    path, _ = tiny
    model = tmp_path / "copy"
    shutil.copytree(path, model)
    text = tmp_path / "t.txt"
    text.write_text("Out, out, brief candle! Life's but a walking shadow. " * 20)
    assert cli.main(["calibrate", str(model), "--text", str(text), "--tokens", "48"]) == 0
    st = CalibrationStats.load(config.model_calibration_path(model))
    assert st.shape == (2, 2, 64)
    # position-aware key centring by default for a RoPE model: the file carries the RoPE frequencies
    assert dict(st.metadata)["key_centre"] == "rope" and st.rope_freq is not None and st.rope_freq.shape == (32,)
    fmts = formats_from_config(config.load("k4v4-cal-sink"), num_layers=2, num_kv_heads=2, head_size=64,
                               block_size=16, model=str(model))
    assert torch.equal(fmts[0].v_shift, st.mu_v[0]) and fmts[0].key_rope is not None and fmts[0].k_shift is None
    # the fixed mean on request: RoPE-aware over the model's trained context (4096 for the tiny model)
    assert cli.main(["calibrate", str(model), "--text", str(text), "--tokens", "48", "--key-centre", "fixed"]) == 0
    st = CalibrationStats.load(config.model_calibration_path(model))
    assert dict(st.metadata)["rope_horizon"] == "4096" and st.rope_freq is None
    with pytest.raises(SystemExit, match="fixed only"):
        cli.main(["calibrate", str(model), "--text", str(text), "--tokens", "48", "--rope-horizon", "100"])


def test_demo_model_gets_the_shipped_calibration(tmp_path, monkeypatch):
    """`vllm-kvq model smollm2` installs configs/calibration/smollm2-135m.safetensors as the model's own, so
    `make serve` can serve the calibrated presets; a model's own statistics are never overwritten."""
    from vllm_kvq.eval import models

    model = tmp_path / "smollm2"
    model.mkdir()
    models._install_calibration(model)
    dst = config.model_calibration_path(model)
    assert dst.read_bytes() == (CALIB_DIR / models.SMOLLM2_CALIBRATION).read_bytes()
    dst.write_bytes(b"mine")
    models._install_calibration(model)
    assert dst.read_bytes() == b"mine"
    # an earlier shipped file (known by its hash) is updated; the current one is not in that list
    import hashlib

    shipped = (CALIB_DIR / models.SMOLLM2_CALIBRATION).read_bytes()
    assert hashlib.sha256(shipped).hexdigest() not in models.SHIPPED_CALIBRATIONS_BEFORE
    monkeypatch.setattr(models, "SHIPPED_CALIBRATIONS_BEFORE", frozenset({hashlib.sha256(b"mine").hexdigest()}))
    models._install_calibration(model)
    assert dst.read_bytes() == shipped


def _rope_keys(n_pos: int, head_dim: int = 64, theta: float = 1e5, seed: int = 0) -> torch.Tensor:
    """(1, n_pos, D) post-RoPE keys (rotate-half layout) of one fixed pre-RoPE key plus small noise."""
    g = torch.Generator().manual_seed(seed)
    half = head_dim // 2
    freq = theta ** (-2 * torch.arange(half, dtype=torch.float64) / head_dim)
    ang = torch.arange(n_pos, dtype=torch.float64)[:, None] * freq[None]
    k0 = torch.randn(head_dim, generator=g, dtype=torch.float64) * 3 + 2
    x1, x2 = k0[:half], k0[half:]
    rot = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    return (rot + 0.3 * torch.randn(n_pos, head_dim, generator=g, dtype=torch.float64)).float()[None]


def test_rope_aware_key_mean_holds_at_later_positions():
    """A key mean taken over positions 0..1024 is wrong at position 3000+ for RoPE pairs that turn in between:
    subtracting it there lengthens the stored keys. The RoPE-aware mean keeps only the pairs that do not turn
    over the horizon, so the stored keys at every position up to it are shorter than the raw ones."""
    from types import SimpleNamespace

    keys = _rope_keys(4096)
    cfg = SimpleNamespace(rope_parameters={"rope_theta": 1e5, "rope_type": "default"})
    rope = calibration.rope_frequencies(cfg, 64)
    assert rope is not None and rope[1] == 64
    calib = keys[:, 4:1024]
    plain = calibration.statistics(calib, calib, 0.5)
    aware = calibration.statistics(calib, calib, 0.5, rope, 4096)
    late = keys[0, 3000:]
    raw = late.pow(2).sum(-1).mean()
    plain_late = (late - plain[0][0]).pow(2).sum(-1).mean()
    aware_late = (late - aware[0][0]).pow(2).sum(-1).mean()
    assert plain_late > raw, "the 1024-position mean must hurt late positions in this setup, or the test shows nothing"
    assert aware_late < 0.85 * raw and aware_late < 0.75 * plain_late, (raw, plain_late, aware_late)
    early = keys[0, 4:1024]
    assert (early - aware[0][0]).pow(2).sum(-1).mean() < 0.85 * early.pow(2).sum(-1).mean()  # still centres
    mask = calibration.rope_mask(*rope, 64, 4096)
    assert mask[:23].sum() == 0 and mask[23:32].sum() == 9 and torch.equal(mask[:32], mask[32:])
    s = aware[2][0]
    assert torch.allclose(s[:32], s[32:])  # a pair shares one scale: its energy does not depend on position
    assert calibration.rope_frequencies(SimpleNamespace(), 64) is None
    partial = calibration.rope_frequencies(SimpleNamespace(rope_theta=1e4, partial_rotary_factor=0.5), 64)
    assert partial[1] == 32 and calibration.rope_mask(*partial, 64, 4096)[32:].sum() == 32


def test_query_weighted_key_scales_cut_the_score_error():
    """The module docstring's claim, measured through the package's 4-bit codec: on keys and queries whose
    channel energies differ (a query's strong channels are not the key's), scales from both
    (``channel_scale(k_ms, q_ms)``) give a smaller mean squared score error q . (k - k_hat) than key-only
    scales, which beat no scales; and alpha = 0.5 beats its neighbours (the Cauchy-Schwarz optimum)."""
    from vllm_kvq import codecs

    g = torch.Generator().manual_seed(0)
    d, n = 64, 4096
    k_rms = torch.logspace(0, 1.2, d)[torch.randperm(d, generator=g)]  # 16x spread, shuffled
    q_rms = torch.logspace(0, 1.2, d)[torch.randperm(d, generator=g)]
    k = torch.randn(n, d, generator=g) * k_rms
    q = torch.randn(n, d, generator=g) * q_rms
    k_ms, q_ms = k.pow(2).mean(0, keepdim=True), q.pow(2).mean(0, keepdim=True)
    codec = codecs.get("turboquant4", head_dim=d)

    def score_mse(s):  # the cache stores k / s, the query is multiplied by s
        s = s.reshape(1, d)
        k_hat = codec.dequantize(codec.quantize(k / s)) * s
        return ((q * (k - k_hat)).sum(-1)).pow(2).mean().item()

    both = score_mse(calibration.channel_scale(k_ms, q_ms, 0.5))
    key_only = score_mse(calibration.channel_scale(k_ms, None, 0.5))
    none = score_mse(torch.ones(d))
    assert both < 0.8 * key_only and key_only < none, (both, key_only, none)
    for alpha in (0.25, 0.75):
        assert score_mse(calibration.channel_scale(k_ms, q_ms, alpha)) > both, alpha
    s = calibration.channel_scale(k_ms, q_ms, 0.5)
    torch.testing.assert_close(s.log().mean(-1), torch.zeros(1), atol=1e-5, rtol=0)  # geometric mean 1

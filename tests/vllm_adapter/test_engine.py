"""End to end through real vLLM with tiny random models: every dtype serves, capacity grows as vLLM itself
counts it, prefill reads the quantized cache (prefix-cache hit == cold run, chunked == unchunked), the
error messages a user sees. One probe process runs all engines of the module."""

from __future__ import annotations

import pytest

from tests.vllm_adapter.conftest import run_probe
from vllm_kvq import config as _config
from vllm_kvq.vllm.dtypes import KVQ_DTYPES


def _fits_tiny(dtype: str) -> bool:
    """Presets with per-layer rules for bigger models (kvq-mixed-example names layer 2) do not fit the
    2-layer tiny model; they get their own error test below."""
    if dtype == "kvq":
        return True
    try:
        _config.resolve(_config.load(dtype), 2, 2)
    except _config.ConfigError:
        return False
    return True


TINY_DTYPES = tuple(d for d in KVQ_DTYPES if _fits_tiny(d))
TOO_BIG = tuple(d for d in KVQ_DTYPES if not _fits_tiny(d))

PROMPT = [3 + (i * 37) % 400 for i in range(150)]  # 150 token ids of the tiny vocab, no special tokens
KV_BYTES = 1 << 26
MIXED_YAML = """
name: tiny-mixed
key: turboquant3
value: turboquant3
overrides:
  - layers: 0
    key: turboquant4
    value: turboquant4
  - layers: -1
    heads: 1
    key: {codec: uniform, bits: 8}
"""
CAPACITY_TARGETS = {"turboquant4": 3.7, "turboquant3": 4.5, "turboquant2": 6.5}


def _job(model, dtype, mixed=None, **kw):
    job = {"model": model, "dtype": dtype, "prompts": [PROMPT], "max_tokens": 8, "kv_bytes": KV_BYTES,
           "prompt_logprobs": True, "llm": {"block_size": 32}}
    if dtype == "kvq":
        job["llm"]["additional_config"] = {"kvq_config": mixed}
    for k, v in kw.items():
        if k == "llm":
            job["llm"].update(v)
        else:
            job[k] = v
    return job


@pytest.fixture(scope="module")
def results(tiny_model, tiny_model_128, tiny_model_48, tiny_sliding_window_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("name: bad\nkey: turboquant3\nvalue: {codec: turboquant, bits: 9}\n")
    mixed = tmp / "mixed.yaml"
    mixed.write_text(MIXED_YAML)
    jobs = {}
    for d in ("auto",) + TINY_DTYPES:
        jobs[("all", d)] = _job(tiny_model, d, mixed=str(mixed))
    for d in TOO_BIG:
        jobs[("error", d)] = _job(tiny_model, d)
    for d in ("auto", "turboquant3"):  # layer 0 in the default cache: vLLM pads or scales the pages
        jobs[("skip0", d)] = _job(tiny_model, d, prompt_logprobs=False, max_tokens=2,
                                  llm={"kv_cache_dtype_skip_layers": ["0"]})
    for d in ("auto", "turboquant4", "turboquant3", "turboquant2"):
        jobs[("d128", d)] = _job(tiny_model_128, d, prompt_logprobs=False, max_tokens=2)
    for d in ("auto", "turboquant3"):
        jobs[("prefix", d)] = _job(tiny_model, d, repeat=2, prompt_logprobs=False,
                                   llm={"enable_prefix_caching": True})
    jobs[("chunked", "turboquant3")] = _job(tiny_model, "turboquant3", max_tokens=2,
                                            llm={"enable_chunked_prefill": True, "max_num_batched_tokens": 32})
    jobs[("error", "kvq-no-config")] = _job(tiny_model, "kvq", llm={"additional_config": {}})
    jobs[("error", "bad-yaml")] = _job(tiny_model, "kvq", llm={"additional_config": {"kvq_config": str(bad_yaml)}})
    jobs[("error", "head-size")] = _job(tiny_model_48, "turboquant3")
    jobs[("error", "sliding-window")] = _job(tiny_sliding_window_model, "turboquant3")
    # a calibrated preset (calibration: model) on a model nobody calibrated; and the same preset spelled out
    jobs[("error", "no-calibration")] = _job(tiny_model_128, "k3v3-cal-sink")
    explicit = tmp / "explicit.yaml"
    explicit.write_text(f"name: explicit\nkey: turboquant3\nvalue: turboquant3\nsmooth_keys: true\nsink_tokens: 1\n"
                        f"exact_self: true\ncalibration: {tiny_model}/kvq/calibration.safetensors\n")
    jobs[("explicit", "k3v3-cal-sink")] = _job(tiny_model, "kvq", mixed=str(explicit))
    # the recipe (each query's own token exact): prefix-cache hit == cold run, chunked == one chunk; and the
    # same without the exact own token
    exact = explicit
    quantized_self = tmp / "quantized-self.yaml"
    quantized_self.write_text(explicit.read_text().replace("exact_self: true\n", ""))
    jobs[("all", "quantized-self")] = _job(tiny_model, "kvq", mixed=str(quantized_self))
    jobs[("prefix", "exact-self")] = _job(tiny_model, "kvq", mixed=str(exact), repeat=2, prompt_logprobs=False,
                                          llm={"enable_prefix_caching": True})
    jobs[("chunked", "exact-self")] = _job(tiny_model, "kvq", mixed=str(exact), max_tokens=2,
                                           llm={"enable_chunked_prefill": True, "max_num_batched_tokens": 32})
    keys = list(jobs)
    out = run_probe([jobs[k] for k in keys], tmp)
    return dict(zip(keys, out))


def _ok(r):
    assert "error" not in r, r["error"]
    return r


def _mean_abs_diff(a, b):
    pa, pb = a["runs"][0][0]["prompt_logprobs"][1:], b["runs"][0][0]["prompt_logprobs"][1:]
    return sum(abs(x - y) for x, y in zip(pa, pb)) / len(pa)


@pytest.mark.parametrize("dtype", ("auto",) + TINY_DTYPES)
def test_every_dtype_generates(results, dtype):
    run = _ok(results[("all", dtype)])["runs"][0][0]
    assert len(run["token_ids"]) == 8
    assert all(lp <= 0 for lp in run["logprobs"])


def test_logprobs_track_bits(results):
    """Prompt logprobs against the bf16 cache: near-lossless at 8 bits, worse as bits shrink."""
    base = _ok(results[("all", "auto")])
    diff = {d: _mean_abs_diff(_ok(results[("all", d)]), base) for d in TINY_DTYPES}
    assert diff["uniform8"] < 0.02, diff
    assert diff["uniform8"] < diff["turboquant4"] < diff["turboquant3"] < diff["turboquant2"], diff
    assert diff["turboquant3.5"] < diff["turboquant2.5"], diff
    assert diff["turboquant4"] < 0.25, diff  # a sane band; a broken cache gives several nats


@pytest.mark.parametrize("model", ["all", "d128"])
@pytest.mark.parametrize("dtype", sorted(CAPACITY_TARGETS))
def test_capacity_from_vllm_block_counts(results, model, dtype):
    """vLLM's own block count for the same KV memory grows by the slot-size ratio."""
    ours = _ok(results[(model, dtype)])["num_blocks"]
    bf16 = _ok(results[(model, "auto")])["num_blocks"]
    assert ours / bf16 >= CAPACITY_TARGETS[dtype], (ours, bf16)


def test_prefix_cache_hit_equals_cold_run(results):
    for d in ("auto", "turboquant3", "exact-self"):
        cold, warm = (run[0] for run in _ok(results[("prefix", d)])["runs"])
        assert cold["num_cached_tokens"] == 0 and warm["num_cached_tokens"] >= 128, (d, warm["num_cached_tokens"])
        assert warm["token_ids"] == cold["token_ids"], d
        assert max(abs(a - b) for a, b in zip(warm["logprobs"], cold["logprobs"])) < 1e-3, d


@pytest.mark.parametrize("dtype", ["turboquant3", "exact-self"])
def test_chunked_prefill_equals_one_chunk(results, dtype):
    chunked = _ok(results[("chunked", dtype)])
    assert chunked["max_num_batched_tokens"] == 32  # the 150-token prompt really ran in 5 chunks
    whole = _ok(results[("all", dtype) if dtype != "exact-self" else ("explicit", "k3v3-cal-sink")])
    a, b = chunked["runs"][0][0]["prompt_logprobs"][1:], whole["runs"][0][0]["prompt_logprobs"][1:]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3


def test_exact_self_reads_each_tokens_own_kv_exactly(results):
    """The first prompt positions see only the sink token (bf16) and themselves: with exact_self they are the
    bf16 cache's in every layer, so the next-token logprobs they give match bf16's to rounding; without it
    (the same recipe, own token from the 3-bit cache) they move, and the rest of the prompt differs too."""
    lp = {k: _ok(results[k])["runs"][0][0]["prompt_logprobs"]
          for k in (("all", "auto"), ("explicit", "k3v3-cal-sink"), ("all", "quantized-self"))}
    base, exact, quant = lp[("all", "auto")], lp[("explicit", "k3v3-cal-sink")], lp[("all", "quantized-self")]
    head_exact = max(abs(exact[i] - base[i]) for i in (1, 2))
    head_quant = max(abs(quant[i] - base[i]) for i in (1, 2))
    assert head_exact < 0.01 and head_quant > 3 * head_exact, (head_exact, head_quant)
    assert exact[3:] != quant[3:]


@pytest.mark.parametrize("case,needles", [
    ("kvq-no-config", ["kvq_config", "--additional-config"]),
    ("bad-yaml", ["value", "bits", "9"]),
    ("head-size", ["head size 48", "supported head sizes"]),
    ("sliding-window", ["sliding-window", "--kv-cache-dtype-skip-layers"]),
    ("no-calibration", ["k3v3-cal-sink", "kvq/calibration.safetensors", "vllm-kvq calibrate"]),
])
def test_errors_say_what_to_do(results, case, needles):
    err = results[("error", case)].get("error")
    assert err, f"{case}: expected an error, the engine started"
    for n in needles:
        assert n in err, (n, err)


def test_calibrated_preset_reads_the_models_own_calibration(results):
    """`--kv-cache-dtype k3v3-cal-sink` on a model `vllm-kvq calibrate` has seen serves exactly what the same
    recipe with the calibration file's path spelled out in a YAML serves."""
    preset, spelled = _ok(results[("all", "k3v3-cal-sink")]), _ok(results[("explicit", "k3v3-cal-sink")])
    assert preset["runs"][0][0]["token_ids"] == spelled["runs"][0][0]["token_ids"]
    assert preset["runs"][0][0]["prompt_logprobs"] == spelled["runs"][0][0]["prompt_logprobs"]
    plain = _ok(results[("all", "turboquant3")])  # the calibration is really applied
    assert preset["runs"][0][0]["prompt_logprobs"] != plain["runs"][0][0]["prompt_logprobs"]


@pytest.mark.parametrize("dtype", TOO_BIG)
def test_preset_for_a_bigger_model_says_which_rule_does_not_fit(results, dtype):
    err = results[("error", dtype)].get("error")
    assert err and "overrides" in err and "layer" in err, err


def test_skip_layers_report_vllms_block_count(results):
    """A bf16 skip layer next to turboquant3 layers: the run serves, and vLLM's block count shows what the
    mixed page costs (printed; vLLM pads our 52-byte pages to the bf16 ones when the ratio is not whole)."""
    bf16, ours = _ok(results[("skip0", "auto")]), _ok(results[("skip0", "turboquant3")])
    print(f"skip layer 0: bf16 {bf16['num_blocks']} blocks, turboquant3 {ours['num_blocks']} blocks "
          f"(block size {ours['block_size']})")
    assert len(ours["runs"][0][0]["token_ids"]) == 2
    assert ours["num_blocks"] >= bf16["num_blocks"]

"""``vllm-kvq calibrate --budget``: sensitivity on a real (tiny) model, the knapsack, and the written YAML."""

from __future__ import annotations

import itertools

import pytest
import yaml

from vllm_kvq import budget, cli, config, fake_quant
from vllm_kvq.eval import models
from vllm_kvq.kv_format import formats_from_config

CANDS = ["turboquant2", "turboquant3", "turboquant4"]
NB = {"turboquant2": 18, "turboquant3": 26, "turboquant4": 34}  # head_dim 64: 8 * bits + 2


def _sens(losses):
    """losses[layer] = (K losses per candidate, V losses per candidate)."""
    return budget.Sensitivity(CANDS, dict(NB), [{"K": dict(zip(CANDS, k)), "V": dict(zip(CANDS, v))}
                                                for k, v in losses])


SYNTH = _sens([((0.9, 0.3, 0.1), (0.2, 0.1, 0.05)),  # keys matter in layer 0
               ((0.05, 0.02, 0.01), (0.04, 0.02, 0.01)),  # layer 1 barely cares
               ((0.3, 0.1, 0.03), (0.6, 0.2, 0.05))])  # values matter in layer 2


def _brute(sens, total_bytes, per_layer_bytes=None):
    best = None
    pairs = list(itertools.product(CANDS, CANDS))
    for combo in itertools.product(pairs, repeat=len(sens.loss)):
        bs = [NB[k] + NB[v] for k, v in combo]
        if sum(bs) > total_bytes or (per_layer_bytes is not None and max(bs) > per_layer_bytes):
            continue
        cost = sum(sens.loss[i]["K"][k] + sens.loss[i]["V"][v] for i, (k, v) in enumerate(combo))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, list(combo))
    return best


@pytest.mark.parametrize("bits", [2.5, 3.25, 3.75, 4.25])
def test_choose_is_the_exact_optimum(bits):
    b = budget.budget_bytes(bits, 64)
    uni = budget.choose(SYNTH, b, "uniform")
    assert uni.padded_bytes <= b
    assert uni.predicted_loss == pytest.approx(_brute(SYNTH, 3 * b, per_layer_bytes=b)[0])
    mixed = budget.choose(SYNTH, b, "mixed")
    assert mixed.avg_bytes <= b
    cost, combo = _brute(SYNTH, int(3 * b))
    assert mixed.predicted_loss == pytest.approx(cost)
    assert mixed.predicted_loss <= uni.predicted_loss + 1e-12  # fewer constraints, never worse


def test_choose_spends_bytes_where_the_loss_is():
    # 52 B per layer on average: layer 1 (insensitive) gives up bits, layer 0 keys and layer 2 values get them
    c = budget.choose(SYNTH, 52, "mixed")
    (k0, _), (k1, v1), (_, v2) = c.per_layer
    assert k0 == "turboquant4" and v2 == "turboquant4" and (k1, v1) == ("turboquant2", "turboquant2")
    assert "per-layer slot sizes" in " ".join(budget.explain(c, 64))
    with pytest.raises(ValueError, match="below the cheapest pair"):
        budget.choose(SYNTH, 30, "uniform")
    with pytest.raises(ValueError, match="'uniform' or 'mixed'"):
        budget.choose(SYNTH, 52, "padded")
    with pytest.raises(ValueError, match="bits per cached element"):
        budget.budget_bytes(0, 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.make_tiny_llama(tmp_path_factory.mktemp("tiny"), num_layers=3, seed=5)


def test_measure_on_a_model_orders_bits(tiny):
    tok, model = fake_quant.load_model(tiny)
    ids = tok(models.TINY_TEXT)["input_ids"][:96]
    sens = budget.measure(model, [ids], num_layers=3, num_kv_heads=2, head_dim=64, candidates=["turboquant2", "turboquant4"],
                          head_sensitivity=True, progress=False)
    assert sens.nbytes == {"turboquant2": 18, "turboquant4": 34} and sens.tokens == 95
    for layer in sens.loss:
        for side in "KV":
            assert 0 < layer[side]["turboquant4"] < layer[side]["turboquant2"]
    assert len(sens.head_loss) == 3 and all(len(h) == 2 and min(h) > 0 for h in sens.head_loss)


def test_cli_budget_writes_a_config_that_meets_it(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(models.TINY_TEXT * 3)
    out = tmp_path / "cal" / "tiny.safetensors"
    assert cli.main(["calibrate", str(tiny), "--text", str(text), "--tokens", "64", "--budget", "3.25",
                     "--candidates", "turboquant2,turboquant3,turboquant4", "--prompt-tokens", "64",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    cfg_path = out.with_suffix(".yaml")
    assert f"wrote {cfg_path}" in printed and "chosen K" in printed and "K tq2" in printed
    data = yaml.safe_load(cfg_path.read_text())
    assert data["calibration"] == "tiny.safetensors" and data["smooth_keys"] is True  # beside the YAML
    # the default recipe: one sink token per block (its area paid from the budget at 128-token blocks) and
    # each query's own token exact
    assert data["sink_tokens"] == 1 and data["exact_self"] is True
    cfg = config.load(cfg_path)
    fmts = formats_from_config(cfg, num_layers=3, num_kv_heads=2, head_size=64, block_size=128)
    assert all(f.calibrated and f.exact_self and f.sink_bytes == 2 for f in fmts)
    assert max(f.slot_bytes for f in fmts) <= 3.25 * 2 * 64 / 8  # uniform slot: every layer within 52 B
    # a saved measurement serves a second budget without measuring again, and refuses other candidates
    sens_file = tmp_path / "sens.json"
    args = ["calibrate", str(tiny), "--text", str(text), "--tokens", "64", "--prompt-tokens", "64",
            "--candidates", "turboquant2,turboquant3,turboquant4", "--sensitivity", str(sens_file), "--out", str(out)]
    assert cli.main(args + ["--budget", "4.25"]) == 0 and sens_file.exists()
    capsys.readouterr()
    assert cli.main(args + ["--budget", "2.5", "--config-out", str(tmp_path / "b25.yaml")]) == 0
    assert "sensitivities from" in capsys.readouterr().err
    assert {f.slot_bytes for f in formats_from_config(config.load(tmp_path / "b25.yaml"), num_layers=3,
                                                      num_kv_heads=2, head_size=64, block_size=128)} == {38}
    # 2 bits K and V (36 B) + the sink area (2 B): 40 B allowed
    with pytest.raises(ValueError, match="holds sensitivities for"):
        budget.load_sensitivity(sens_file, ["turboquant2"], 3)
    with pytest.raises(SystemExit, match="measured with"):  # another recipe needs its own measurement
        cli.main(args + ["--budget", "2.5", "--sink-tokens", "0", "--no-exact-self"])
    # without sinks the whole budget buys codes: 2.5 bits = 40 B -> no sink area, no exact_self key
    plain = tmp_path / "plain.yaml"
    assert cli.main(args[:-4] + ["--out", str(out), "--budget", "2.5", "--sink-tokens", "0", "--no-exact-self",
                                 "--config-out", str(plain)]) == 0
    data = yaml.safe_load(plain.read_text())
    assert "sink_tokens" not in data and "exact_self" not in data
    with pytest.raises(SystemExit, match="unknown codecs"):
        cli.main(["calibrate", str(tiny), "--budget", "3", "--candidates", "tq9", "--out", str(out)])
    with pytest.raises(SystemExit, match="below the cheapest pair"):
        cli.main(["calibrate", str(tiny), "--text", str(text), "--tokens", "64", "--budget", "1",
                  "--prompt-tokens", "64", "--candidates", "turboquant2", "--out", str(out)])


def test_choice_bytes_are_the_slots_vllm_allocates():
    """A layer's bytes are its KVFormat slot (codes rounded to even, then the unrounded sink area), so the
    reported average is what vLLM allocates: at 256-token blocks one bf16 sink costs 1 B, not 2."""
    from vllm_kvq import codecs
    from vllm_kvq.kv_format import KVFormat

    sink = budget.sink_area_bytes(1, 64, 256)
    assert sink == 1
    c = budget.choose(SYNTH, 52 + sink, "mixed", overhead=sink)
    for (k, v), b in zip(c.per_layer, c.bytes_per_layer):
        fmt = KVFormat(64, [codecs.get(k, head_dim=64)], [codecs.get(v, head_dim=64)], sink_tokens=1, block_size=256)
        assert b == fmt.slot_bytes, (k, v, b, fmt.slot_bytes)
    assert c.vllm_bytes == c.avg_bytes <= 52 + sink
    odd = budget.Sensitivity(["a", "b"], {"a": 17, "b": 26}, [{"K": {"a": 1.0, "b": 0.0}, "V": {"a": 0.5, "b": 0.0}}])
    assert budget.choose(odd, 44, "uniform").per_layer == [("b", "a")]  # 26 + 17 = 43 is a 44 B slot
    assert budget.choose(odd, 43, "uniform").per_layer == [("a", "a")]  # 34 B; (b, a) needs 44

"""Sweep outputs: the table, goal check and plot on fixed inputs, bytes per token from the KV formats, and
one small real sweep (tiny model, bf16 cache and turboquant4, perplexity only) through real servers."""

from __future__ import annotations

import json
import math

import pytest

from vllm_kvq.eval import greedy, models, report, sweep


def _entry(label, bpt, nll, needle=None, error=None, tasks=None):
    r = {"label": label, "dtype": label, "bytes_per_token": bpt, "error": error}
    if nll is not None:
        mean = sum(nll) / len(nll)
        r["ppl"] = {"ppl": math.exp(mean), "token_nll": nll}
    if needle is not None:
        r["needle"] = {"accuracy": sum(needle.values()) / len(needle), "accuracy_by_length": needle}
    if tasks is not None:
        r["lmeval"] = {"headline": tasks}
    return r


FIXED = [
    _entry("auto", 23040, [2.0, 3.0, 4.0, 3.0], {"1024": 1.0, "4096": 1.0}, tasks={"kvq_shakespeare_mc": 0.5}),
    _entry("fp8", 11520, None, error="server failed to start: ValueError: fp8 | not supported"),
    _entry("turboquant4", 6120, [2.01, 3.0, 4.01, 3.0], {"1024": 1.0, "4096": 1.0}, tasks={"kvq_shakespeare_mc": 0.5}),
    _entry("turboquant3", 4680, [2.1, 3.05, 4.1, 3.05], {"1024": 1.0, "4096": 0.5}),
    _entry("turboquant2", 3240, [2.3, 3.2, 4.3, 3.2], {"1024": 0.5, "4096": 0.0}),
]


def test_paired_delta():
    d, se = report.paired_delta([1.0, 2.0, 3.0], [1.1, 2.1, 3.1])
    assert d == pytest.approx(math.expm1(0.1)) and se == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        report.paired_delta([1.0], [1.0, 2.0])


def test_table_and_goals_on_fixed_inputs():
    table = report.markdown_table(FIXED)
    lines = table.splitlines()
    assert len(lines) == 2 + len(FIXED)
    assert "needle 1k" in lines[0] and "needle 4k" in lines[0] and "shakespeare_mc acc" in lines[0]
    row = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[1:-1]] for ln in lines[2:]}
    assert row["`auto`"][6] == "(reference)" and row["`auto`"][2] == "1.00x" and row["`auto`"][4] == "1.00x"
    assert row["`turboquant4`"][2] == "3.76x" and row["`turboquant4`"][4] == "3.76x"  # no KV tokens: bytes ratio
    assert row["`turboquant4`"][6].startswith(f"{math.expm1(0.005) * 100:+.2f}%")
    assert "server failed to start" in row["`fp8`"][-1] and "/" in row["`fp8`"][-1]  # '|' escaped
    goals = "\n".join(report.goal_check(FIXED))
    # every tier takes its best entry of at least that capacity: turboquant4 (3.76x) is below 4.5x
    assert "≥ 3.7x capacity, ΔPPL ≤ +1.5%: **met**, best `turboquant4` (3.76x) +0.50%" in goals
    assert f"≥ 4.5x capacity, ΔPPL ≤ +4.0%: **MISSED**, best `turboquant3` (4.92x) {math.expm1(0.075) * 100:+.2f}%" in goals
    assert f"≥ 5.8x capacity, ΔPPL ≤ +12.0%: **MISSED**, best `turboquant2` (7.11x) {math.expm1(0.25) * 100:+.2f}%" in goals
    assert "≥ 3.7x capacity, needle = bf16: **met**, `turboquant4`" in goals
    assert "≥ 4.5x capacity, needle = bf16: **MISSED**, `turboquant3`" in goals


def test_capacity_is_vllms_kv_token_count_when_known():
    """A sink format's bytes may be unknown to the sweep; vLLM's own KV-token count still places it in a tier,
    and it wins the tier over a larger-capacity entry only by its ΔPPL."""
    auto = dict(FIXED[0], kv_cache_tokens=20_000)
    sink = dict(_entry("q4-sink", None, [2.002, 3.0, 4.002, 3.0]), kv_cache_tokens=73_000)  # 3.65x: below 3.7x
    tq4 = dict(FIXED[2], kv_cache_tokens=75_200)  # 3.76x
    rows = {r["label"]: r for r in report.derived([auto, sink, tq4])}
    assert rows["q4-sink"]["capacity"] == pytest.approx(3.65) and "compression" not in rows["q4-sink"]
    goals = "\n".join(report.goal_check([auto, sink, tq4]))
    assert "best `turboquant4` (3.76x)" in goals and "q4-sink" not in goals
    goals = "\n".join(report.goal_check([auto, dict(sink, kv_cache_tokens=75_000), tq4]))
    assert "best `q4-sink` (3.75x) +0.10%" in goals


def test_goals_without_an_entry_of_that_capacity():
    goals = report.goal_check([FIXED[0], _entry("turboquant4", 6120, None, error="boom")])
    assert any("≥ 3.7x capacity, ΔPPL ≤ +1.5%: not measured (no entry of that capacity; failed: turboquant4)" in g
               for g in goals)


def test_needle_goal_is_no_worse_than_bf16():
    def goals(acc):
        return "\n".join(report.goal_check([FIXED[0], _entry("turboquant4", 6120, [2.0, 3.0, 4.0, 3.0], acc)]))

    assert "≥ 3.7x capacity, needle = bf16: **MISSED**" in goals({"1024": 1.0, "4096": 0.5})
    assert "≥ 3.7x capacity, needle = bf16: **met**" in goals({"1024": 1.0, "4096": 1.0})
    fixed = [dict(FIXED[0], needle={"accuracy": 0.75, "accuracy_by_length": {"1024": 1.0, "4096": 0.5}}),
             _entry("turboquant4", 6120, [2.0, 3.0, 4.0, 3.0], {"1024": 1.0, "4096": 1.0})]
    assert "**met (better than bf16 at 4096 tokens)**" in "\n".join(report.goal_check(fixed))


def test_combine_sweeps_pairs_each_against_its_own_auto(tmp_path):
    """Two sweep dirs (different days: different bf16 references) in one report: each entry's ΔPPL is paired
    against its own dir's auto, a repeated identical auto is dropped, a differing one is kept apart."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d, entries in ((a, FIXED[:3]), (b, [dict(FIXED[0]), _entry("fibquant2", 3240, [2.1, 3.1, 4.1, 3.1])])):
        d.mkdir()
        for r in entries:
            (d / f"{r['label']}.json").write_text(json.dumps(r))
    rows = report.combine([report.load_dir(a), report.load_dir(b)], ["a", "b"])
    assert [r["label"] for r in rows] == ["auto", "fp8", "turboquant4", "fibquant2"]
    fib = rows[-1]
    assert fib["ppl_delta"] == pytest.approx(math.expm1(0.1)) and fib["capacity"] == pytest.approx(23040 / 3240)
    other_ref = dict(FIXED[0], ppl={"ppl": 1.0, "token_nll": [2.0, 3.0, 4.0, 3.5]})
    (b / "auto.json").write_text(json.dumps(other_ref))
    rows = report.combine([report.load_dir(a), report.load_dir(b)], ["a", "b"])
    assert [r["label"] for r in rows] == ["auto", "fp8", "turboquant4", "auto [b]", "fibquant2"]
    assert rows[-1]["ppl_delta"] == pytest.approx(math.expm1((0.1 * 3 - 0.4) / 4))
    with pytest.raises(ValueError, match="no `auto` entry"):
        report.combine([[FIXED[2]]], ["c"])
    with pytest.raises(ValueError, match="no sweep results"):
        report.load_dir(tmp_path)


def test_report_cli_writes_table_goals_and_plot(tmp_path):
    from vllm_kvq.cli import main

    d = tmp_path / "s"
    d.mkdir()
    for r in FIXED:
        (d / f"{r['label']}.json").write_text(json.dumps(r))
    assert main(["eval", "report", str(d), "--out-dir", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| `turboquant2` |" in text and "≥ 5.8x capacity" in text
    assert (tmp_path / "out" / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def _with_kl_and_greedy(entries):
    """FIXED with top-k and greedy outputs: each entry moves its top-1 probability and its continuations by a
    known amount."""
    ref_top = [[[1, math.log(0.7)], [2, math.log(0.2)]]] * 4
    out = []
    moved = {"auto": (0.7, 8), "fp8": (0.7, 8), "turboquant4": (0.7, 8), "turboquant3": (0.6, 5), "turboquant2": (0.5, 2)}
    for r in entries:
        p1, div = moved[r["label"]]
        r = json.loads(json.dumps(r))
        if r.get("ppl"):
            r["ppl"].update(top_k=2, token_topk=[[[1, math.log(p1)], [2, math.log(0.2)]]] * 4 if r["label"] != "auto"
                            else ref_top)
        r["greedy"] = {"starts": [0, 10], "prompt_len": 10, "gen": 8,
                       "outputs": [[7] * 8, [7] * div + [9] * (8 - div)]}
        out.append(r)
    return out


def test_table_has_kl_and_greedy_columns():
    rows = {r["label"]: r for r in report.derived(_with_kl_and_greedy(FIXED))}
    p, q = [0.7, 0.2, 0.1], [0.6, 0.2, 0.2]
    assert rows["turboquant4"]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert rows["turboquant3"]["kl"] == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-5)
    assert rows["turboquant3"]["kl"] < rows["turboquant2"]["kl"]
    g = rows["turboquant3"]["greedy_vs_ref"]
    assert g["first_divergence"] == [8, 5] and g["prefix_agreement"] == 13 / 16 and g["agreement"] == 13 / 16
    table = report.markdown_table(_with_kl_and_greedy(FIXED))
    head = table.splitlines()[0]
    assert "KL (top-2)" in head and "top-1 agree" in head and "first divergence / 8" in head
    line = next(ln for ln in table.splitlines() if ln.startswith("| `turboquant2`"))
    assert "median 5: 8, 2" in line


def test_greedy_agreement_and_prompt_starts():
    ref = {"starts": [0, 5], "prompt_len": 4, "gen": 4, "outputs": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    cand = dict(ref, outputs=[[1, 2, 0, 4], [0, 6, 7, 8]])
    g = greedy.agreement(ref, cand)
    assert g["first_divergence"] == [2, 0] and g["agreement"] == 6 / 8 and g["prefix_agreement"] == 2 / 8
    with pytest.raises(ValueError, match="different prompts"):
        greedy.agreement(ref, dict(cand, starts=[0, 6]))
    assert greedy.prompt_starts(100, 3, 20) == [0, 40, 80]
    with pytest.raises(ValueError, match="fewer than one prompt"):
        greedy.prompt_starts(10, 2, 20)


def test_write_outputs(tmp_path):
    md = sweep.write_outputs(FIXED, tmp_path, model="/x/smollm2", context=2048)
    text = md.read_text()
    assert "| `turboquant2` |" in text and "Goals:" in text and "![frontier](frontier.png)" in text
    png = (tmp_path / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(png) < 200_000
    sweep.write_outputs(_with_kl_and_greedy(FIXED), tmp_path / "kl", model="/x/smollm2", context=2048)
    assert "KL (top-2)" in (tmp_path / "kl" / "sweep.md").read_text()
    assert len((tmp_path / "kl" / "frontier.png").read_bytes()) > len(png)  # four panels, not two


def test_bytes_per_token(tmp_path):
    path = models.make_tiny_llama(tmp_path / "m", num_layers=3, num_kv_heads=2, head_dim=64)
    assert sweep.bytes_per_token("auto", path) == 2 * 2 * 64 * 2 * 3
    assert sweep.bytes_per_token("fp8", path) == 2 * 64 * 2 * 3
    # turboquant4 at head_dim 64: K and V 32 code bytes + 2 fp16 scale bytes each = 68 bytes per head
    assert sweep.bytes_per_token("turboquant4", path) == 68 * 2 * 3
    assert sweep.bytes_per_token("turboquant3", path) == 52 * 2 * 3
    mixed = sweep.bytes_per_token("kvq", path, config="kvq-mixed-example")
    assert mixed == 68 * 2 * 3  # on 3 layers every layer is 4-bit (layers "0:2" and -1)
    sink = tmp_path / "sink.yaml"
    sink.write_text("key: turboquant4\nvalue: turboquant4\nsink_tokens: 1\n")
    # one bf16 sink record (K+V, 4 x 64 bytes) spread over a block's slots: 2 bytes per slot at 128, 16 at 16
    assert sweep.bytes_per_token("kvq", path, config=str(sink), block_size=128) == (68 + 2) * 2 * 3
    assert sweep.bytes_per_token("kvq", path, config=str(sink), block_size=16) == (68 + 16) * 2 * 3


def test_parse_entries_and_server_error_line():
    assert sweep.parse_entries("auto,turboquant3", "a/mine.yaml") == [
        ("auto", "auto", None), ("turboquant3", "turboquant3", None), ("mine", "kvq", "a/mine.yaml")]
    with pytest.raises(ValueError):
        sweep.parse_entries("auto,auto", None)
    log = "INFO start\nTraceback (most recent call last):\n  ...\n(EngineCore pid=7) ValueError: no fp8 here\n"
    assert sweep._server_error_line(log) == "ValueError: no fp8 here"
    log = "usage: vllm serve\nvllm serve: error: argument --kv-cache-dtype: invalid choice: 'x'\n"
    assert sweep._server_error_line(log) == "vllm serve: error: argument --kv-cache-dtype: invalid choice: 'x'"
    assert sweep.kv_cache_tokens("x CPU KV cache size: 23,296 tokens, y") == 23296


@pytest.mark.vllm
@pytest.mark.slow
def test_small_real_sweep(tmp_path):
    model = models.make_tiny_llama(tmp_path / "tiny", seed=2)
    res = sweep.run_sweep(model, [("auto", "auto", None), ("turboquant4", "turboquant4", None)], tmp_path / "out",
                          context=128, ppl_text=str(_text(tmp_path)), ppl_windows=2, needle_lengths=[],
                          lmeval_tasks=[], max_model_len=256, kv_cache_memory_bytes=32 << 20, startup_timeout=300,
                          top_k=5, greedy_prompts=2, greedy_gen=48)
    by = {r["label"]: r for r in res}
    assert not by["auto"]["error"] and not by["turboquant4"]["error"], res
    assert by["auto"]["ppl"]["tokens_scored"] == by["turboquant4"]["ppl"]["tokens_scored"] == 127 + 64
    # same tokens, a 4-bit cache: close to the bf16 cache but not bit-identical (the codec is in the path)
    d, _ = report.paired_delta(by["auto"]["ppl"]["token_nll"], by["turboquant4"]["ppl"]["token_nll"])
    assert abs(d) < 0.05
    assert by["auto"]["ppl"]["token_nll"] != by["turboquant4"]["ppl"]["token_nll"]
    # the same byte budget holds ~3.8x the tokens
    ratio = by["turboquant4"]["kv_cache_tokens"] / by["auto"]["kv_cache_tokens"]
    assert ratio == pytest.approx(512 / 136, rel=0.05)
    assert json.loads((tmp_path / "out" / "turboquant4.json").read_text())["bytes_per_token"] == 136 * 2
    assert "| `turboquant4` |" in (tmp_path / "out" / "sweep.md").read_text()
    # KL and greedy agreement against the bf16 entry: the codec moves the distributions a little
    tq4 = {r["label"]: r for r in report.derived(res)}["turboquant4"]
    assert 0 < tq4["kl"] < 0.05 and 0.5 < tq4["top1_agreement"] <= 1.0
    assert len(tq4["greedy_vs_ref"]["first_divergence"]) == 2 and 0 <= tq4["greedy_vs_ref"]["agreement"] <= 1


def _text(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(models.TINY_TEXT * 3)
    return p


@pytest.mark.vllm
def test_sweep_records_a_server_that_fails_to_start(tmp_path):
    model = models.make_tiny_llama(tmp_path / "tiny", seed=2)
    res = sweep.run_sweep(model, [("bogus", "no_such_dtype", None)], tmp_path / "out", context=64, ppl_windows=0,
                          needle_lengths=[], lmeval_tasks=[], max_model_len=128, startup_timeout=240,
                          greedy_prompts=0)
    assert res[0]["error"].startswith("server failed to start") and "no_such_dtype" in res[0]["error"]
    assert res[0]["bytes_per_token"] is None and "bytes unknown" in res[0]["note"]
    assert "server failed to start" in (tmp_path / "out" / "sweep.md").read_text()


def test_default_max_model_len_is_a_multiple_of_256():
    """vLLM's capacity figure counts whole blocks per max-length request: the sweep's default length must not
    leave a partial 128- or 256-token block (2049 would cost 256-token blocks 11 % of their capacity)."""
    assert sweep.default_max_model_len(2048) == 2304
    assert sweep.default_max_model_len(1024, [1000]) == 1280
    assert sweep.default_max_model_len(2048, [4096]) == 4352
    assert sweep.default_max_model_len(255) == 256

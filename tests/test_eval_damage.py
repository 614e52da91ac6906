"""The damage measures on the real model, through real servers: KL and greedy agreement rank the caches the
way their bits do (SmolLM2, where the numbers mean something; slow: three servers)."""

from __future__ import annotations

import pytest

from vllm_kvq.eval import models, report, sweep

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_kl_and_greedy_agreement_order_the_caches_on_smollm2(tmp_path):
    model = models.prepare_smollm2()
    entries = [(d, d, None) for d in ("auto", "turboquant4", "turboquant2")]
    res = sweep.run_sweep(model, entries, tmp_path, context=512, ppl_windows=1, needle_lengths=[], lmeval_tasks=[],
                          max_model_len=520, kv_cache_memory_bytes=64 << 20, top_k=20, greedy_prompts=2,
                          greedy_gen=96)
    assert not any(r["error"] for r in res), [r["error"] for r in res]
    rows = {r["label"]: r for r in report.derived(res)}
    tq4, tq2 = rows["turboquant4"], rows["turboquant2"]
    # 2-bit keys and values move the next-token distribution several times more than 4-bit ones
    assert 0.005 < tq4["kl"] and 3 * tq4["kl"] < tq2["kl"]
    assert tq2["top1_agreement"] < tq4["top1_agreement"] < 1.0
    # greedy text: 4 bits follows bf16 at least as long as 2 bits, and 2 bits departs early
    g4, g2 = tq4["greedy_vs_ref"], tq2["greedy_vs_ref"]
    assert g2["prefix_agreement"] <= g4["prefix_agreement"] and g2["prefix_agreement"] < 0.5
    table = (tmp_path / "sweep.md").read_text()
    assert "KL (top-20)" in table and "first divergence / 96" in table

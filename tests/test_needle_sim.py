"""benchmarks/needle_sim.py: the eval's needle prompts with the key appended, scored teacher-forced under a
fake-quantized cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vllm_kvq import codecs, fake_quant
from vllm_kvq.eval import models, needle
from vllm_kvq.kv_format import KVFormat

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import needle_sim  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = models.make_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=5)
    return fake_quant.load_model(path)


def test_prompts_are_the_eval_prompts_with_the_key_appended(tiny):
    tok, _ = tiny
    ps = needle_sim.prompts_for(tok, 160, [0.2, 0.8], 2, seed=1)
    assert [p["depth"] for p in ps] == [0.2, 0.2, 0.8, 0.8]
    assert len({p["key"] for p in ps}) == 4
    for p in ps:
        head, key = p["ids"][:p["key_from"]], p["ids"][p["key_from"]:]
        text = tok.decode(head)
        assert text.startswith(needle.INSTRUCTION.strip()[:20]) and text.endswith(needle.QUESTION.strip())
        assert needle.NEEDLE.format(key=p["key"]).strip() in text  # the key is hidden in the prompt ...
        assert tok.decode(key).strip() == p["key"]  # ... and is what is scored
        assert len(head) <= 160


def test_key_scores_pair_a_quantized_cache_with_bf16(tiny):
    tok, model = tiny
    ps = needle_sim.prompts_for(tok, 160, [0.3, 0.7], 1, seed=2)
    base = needle_sim.key_scores(model, ps)
    # the model's own most likely tokens, read directly: "found" is exactly "every key token is the argmax"
    for p, (nll, found) in zip(ps, base):
        with torch.no_grad(), fake_quant.quantized(model, None):
            logits = model(torch.tensor([p["ids"]]), use_cache=False).logits[0].float()
        lp = torch.log_softmax(logits[p["key_from"] - 1:-1], -1)
        tgt = torch.tensor(p["ids"][p["key_from"]:])
        assert nll == pytest.approx(-lp.gather(1, tgt[:, None]).sum().item(), rel=1e-4, abs=1e-4)
        assert found == bool((lp.argmax(-1) == tgt).all())
    d = model.config.hidden_size // model.config.num_attention_heads
    hk, n_layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    bf16 = codecs.get("bf16", head_dim=d)
    same = needle_sim.key_scores(model, ps, fake_quant.formats_quantizer([KVFormat(d, [bf16] * hk, [bf16] * hk)] * n_layers))
    assert same == base  # a bf16 "codec" is the bf16 cache
    c = codecs.get("turboquant2", head_dim=d)
    low = needle_sim.key_scores(model, ps, fake_quant.formats_quantizer([KVFormat(d, [c] * hk, [c] * hk)] * n_layers))
    assert [x[0] for x in low] != [x[0] for x in base]
    exact_self = needle_sim.key_scores(model, ps, fake_quant.formats_quantizer([KVFormat(d, [c] * hk, [c] * hk)] * n_layers),
                                       window=1)
    assert [x[0] for x in exact_self] != [x[0] for x in low]

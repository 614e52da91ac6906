"""The codec-level report's measurement on synthetic Q/K/V: K/V codec pairs, calibration and exact sinks."""

from __future__ import annotations

import torch

from vllm_kvq import codecs
from vllm_kvq.calibration import CalibrationStats
from vllm_kvq.eval.codec_report import LayerQKV, lloyd_max_dmse, markdown, measure


def _qkv(gen, layers=2, n=24, hq=4, hk=2, d=64):
    return [LayerQKV(torch.randn(n, hq, d, generator=gen), torch.randn(n, hk, d, generator=gen) * 3 + 1,
                     torch.randn(n, hk, d, generator=gen), d ** -0.5) for _ in range(layers)]


def test_measure_pairs_calibration_and_sinks(gen):
    qkv = _qkv(gen)
    tq, fib = codecs.get("turboquant2", head_dim=64), codecs.get("fibquant2", head_dim=64)
    plain = measure(tq, qkv)
    assert all(r.attn_rel_err > 0.05 for r in plain)
    # the value codec is used for values only: exact values leave the key error alone
    mixed = measure(tq, qkv, codecs.get("bf16", head_dim=64))
    assert all(m.value_rel_mse < 1e-4 and abs(m.key_rel_mse - p.key_rel_mse) < 1e-9 for m, p in zip(mixed, plain))
    # identity statistics change nothing; the true means make the keys' job easier
    zeros, ones = torch.zeros(2, 2, 64), torch.ones(2, 2, 64)
    ident = measure(fib, qkv, calibration=CalibrationStats(zeros, zeros, ones))
    base = measure(fib, qkv)
    assert all(abs(a.attn_rel_err - b.attn_rel_err) < 1e-6 for a, b in zip(ident, base))
    mu = torch.stack([t.k.mean(0) for t in qkv])
    centred = measure(fib, qkv, calibration=CalibrationStats(mu, zeros, ones))
    assert sum(r.key_rel_mse for r in centred) < sum(r.key_rel_mse for r in base)
    # every token a sink: nothing is quantized
    assert all(r.attn_rel_err < 1e-6 for r in measure(fib, qkv, sink_tokens=24))


def test_design_distortion_and_fractional_bytes():
    fib = codecs.get("fibquant2", head_dim=64)
    assert lloyd_max_dmse(fib) == fib.design_dmse
    assert abs(lloyd_max_dmse(codecs.get("turboquant2", head_dim=64)) - 0.1145) < 1e-3
    rep = {"model": "m", "text": "t", "tokens": 1, "head_dim": 64, "num_layers": 1, "kv_heads": 1, "q_heads": 1,
           "calibration": "x/cal.safetensors", "sink_tokens": 1,
           "codecs": {"fibquant2/fibquant1.75": {"bytes": 17.0, "bits": 1.875, "dmse_theory": None,
                                                 "attn_rel_err": 0.4, "attn_cos": 0.9, "key_rel_mse": 0.1,
                                                 "value_rel_mse": 0.1, "worst_layer": 0,
                                                 "layers": [{"attn_rel_err": 0.4}]}}}
    md = markdown(rep)
    assert "| `fibquant2/fibquant1.75` | 34 | 7.53x |" in md and "cal.safetensors applied" in md

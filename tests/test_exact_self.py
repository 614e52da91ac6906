"""Exact self token (``exact_self``): each query row attends its own position with the step's exact key and
value, every other position from the cache.

The implementations attend all positions but the row's own (``exclude_self``) and report each row's
log-sum-exp (``lse``); ``ops`` merges the exact term. Checked here on the reference against dense attention
over decoded K/V; the kernels' own tests (test_cpu_exact_self, test_triton_exact_self) compare them with the
reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvq import codecs, config, ops
from vllm_kvq.kv_format import KVFormat, kv_format
from vllm_kvq.ops import reference
from vllm_kvq.testing import random_paged_batch, roundtrip

from tests.test_key_centre import _rope_format


def _dense_rows(q, k_rows, v_rows, scale):
    """Attention of one query (Hq, D) over its own keys (L, Hk, D) -> (output (Hq, D), lse (Hq,))."""
    g = q.shape[0] // k_rows.shape[1]
    kf = k_rows.float().repeat_interleave(g, dim=1)
    vf = v_rows.float().repeat_interleave(g, dim=1)
    s = torch.einsum("hd,lhd->hl", q.float(), kf) * scale
    return torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vf), torch.logsumexp(s, -1)


def _decoded(fmt, k, v, batch):
    """What the cache gives back for every context token (sequences concatenated), in the model's domain."""
    if fmt.key_rope is None:
        return roundtrip(fmt, k, v, batch.block_offsets())
    pos = torch.cat([torch.arange(s) for s in batch.seq_lens.tolist()])
    centre = fmt.key_rope.centre(pos)
    kh, vh = roundtrip(fmt, k - centre, v)
    return kh + centre, vh


def _setup(gen, fmt, seq_lens, query_lens, block_size=16, hq=6):
    batch = random_paged_batch(seq_lens, query_lens, block_size, generator=gen)
    total, hk, d = int(batch.seq_lens.sum()), fmt.num_kv_heads, fmt.head_size
    pos = torch.cat([torch.arange(s) for s in batch.seq_lens.tolist()])
    k = torch.randn(total, hk, d, generator=gen) * 2 + 1
    v = torch.randn(total, hk, d, generator=gen) - 1
    if fmt.key_rope is not None:
        k = k + fmt.key_rope.centre(pos)
    k[pos % block_size == 0] *= 6  # far-off tokens at every block start, as attention sinks are
    cache = fmt.allocate(batch.num_blocks, block_size)
    ops.store(k, v, cache, batch.ctx_slots, fmt, positions=pos if fmt.key_rope is not None else None)
    q = torch.randn(batch.num_tokens, hq, d, generator=gen)
    return batch, k, v, cache, q


FORMATS = {
    "tq3": lambda gen: KVFormat(64, [codecs.get("turboquant3", head_dim=64)] * 2,
                                [codecs.get("turboquant3", head_dim=64)] * 2, name="tq3"),
    "calibrated-sink": lambda gen: KVFormat(
        64, [codecs.get("turboquant4", head_dim=64)] * 2, [codecs.get("turboquant3", head_dim=64)] * 2,
        name="cal-sink", k_shift=torch.randn(2, 64, generator=gen) * 3, v_shift=torch.randn(2, 64, generator=gen),
        k_scale=torch.rand(2, 64, generator=gen) + 0.5, sink_tokens=1, block_size=16),
    "rope-centred": lambda gen: _rope_format(gen, 2, 64),
    # channels past the rotary ones keep a fixed mean, which the scores leave out
    "partial-rotary": lambda gen: _rope_format(gen, 2, 64, rot=32),
}


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("exclude", [False, True], ids=["all", "exclude-self"])
def test_reference_lse_and_exclusion_match_dense(gen, name, exclude):
    fmt = FORMATS[name](gen)
    # prefill from position 0, decode of a 1-token sequence (empty when excluding), chunked prefill
    batch, k, v, cache, q = _setup(gen, fmt, [37, 1, 50], [37, 1, 9])
    k_hat, v_hat = _decoded(fmt, k, v, batch)
    scale = 1 / math.sqrt(64)
    lse = torch.empty(batch.num_tokens, q.shape[1])
    kb = None
    if fmt.key_rope is not None:
        kb = (fmt.key_rope.bias_query(q, scale), fmt.key_rope.table(64, "cpu"))
    # lse is over the scores as the implementations form them: scale * q . (k - fixed key mean) (the bias adds
    # the position-aware mean's rotary part back; the channels past the rotary ones keep a fixed mean): a fixed
    # mean changes every score of a row alike
    fixed = fmt.key_rope.fixed_mean("cpu") if fmt.key_rope is not None else fmt.k_shift
    k_lse = k_hat - fixed if fixed is not None else k_hat
    out = reference.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt,
                                    scale=scale, key_bias=kb, exclude_self=exclude, lse=lse)
    qsl = batch.query_start_loc.tolist()
    empty = 0
    for i, s in enumerate(batch.seq_lens.tolist()):
        c0 = batch.ctx_start[i]
        for r in range(qsl[i], qsl[i + 1]):
            p = s - (qsl[i + 1] - r)
            end = p if exclude else p + 1
            if end == 0:
                empty += 1
                assert torch.equal(out[r], torch.zeros_like(out[r]))
                assert torch.isneginf(lse[r]).all()
                continue
            o, _ = _dense_rows(q[r], k_hat[c0:c0 + end], v_hat[c0:c0 + end], scale)
            torch.testing.assert_close(out[r], o, atol=2e-4, rtol=2e-4)
            _, ls = _dense_rows(q[r], k_lse[c0:c0 + end], v_hat[c0:c0 + end], scale)
            torch.testing.assert_close(lse[r], ls, atol=5e-4, rtol=1e-5)
    assert empty == (2 if exclude else 0)  # the first prefill row and the 1-token decode


@pytest.mark.parametrize("name", list(FORMATS))
def test_exact_self_merge_equals_dense_with_exact_own_token(gen, name):
    """ops.paged_attention of an exact_self format == dense attention where each row's own key and value are
    exact and every other one is what the cache gives back."""
    base = FORMATS[name](gen)
    fmt = base.with_block_size(base.block_size or 16)
    fmt.exact_self = True
    batch, k, v, cache, q = _setup(gen, fmt, [37, 1, 50, 20], [37, 1, 9, 1])
    k_hat, v_hat = _decoded(fmt, k, v, batch)
    idx = batch.new_token_index()
    scale = 1 / math.sqrt(64)
    with pytest.raises(ValueError, match="self_kv"):
        ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt, scale=scale,
                            impl="reference")
    out = ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt, scale=scale,
                              impl="reference", self_kv=(k[idx], v[idx]))
    plain = ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, base,
                                scale=scale, impl="reference")
    qsl = batch.query_start_loc.tolist()
    for i, s in enumerate(batch.seq_lens.tolist()):
        c0 = batch.ctx_start[i]
        for r in range(qsl[i], qsl[i + 1]):
            p = s - (qsl[i + 1] - r)
            kr, vr = k_hat[c0:c0 + p + 1].clone(), v_hat[c0:c0 + p + 1].clone()
            kr[p], vr[p] = k[c0 + p], v[c0 + p]
            o, _ = _dense_rows(q[r], kr, vr, scale)
            torch.testing.assert_close(out[r], o, atol=2e-4, rtol=2e-4)
    # the exact own token changes the output (the cache's copy of it is quantized)
    assert (out - plain).abs().max() > 1e-2


def test_exact_self_in_yaml_reaches_every_layer_format(tmp_path):
    cfg = config.from_dict({"name": "x", "key": "turboquant4", "value": "turboquant3", "exact_self": True,
                            "overrides": [{"layers": 1, "value": "turboquant4"}]})
    assert cfg.exact_self
    fmt = kv_format(cfg, 64, 2, layer=1, num_layers=2)
    assert fmt.exact_self and fmt.with_block_size(16).exact_self
    with pytest.raises(config.ConfigError, match="exact_self"):
        config.from_dict({"name": "x", "key": "turboquant4", "value": "turboquant3", "exact_self": "yes"})


def test_implementations_without_exact_self_decline(gen):
    fmt = FORMATS["tq3"](gen)
    fmt.exact_self = True
    table = ops._table()
    for device in ("cpu", "cuda"):
        for name, why in ops.plan(fmt, device).items():
            if name in table and table[name].exact_self:
                assert why is None, (name, why)
            else:
                assert why is not None and ("exact_self" in why or "not available" in why), (name, why)

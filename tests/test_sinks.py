"""Attention sinks: every block keeps its first ``sink_tokens`` tokens as bf16 rotated K/V in a per-block area
(``kv_format``). Checked on the reference and the Triton kernels: the bytes, attention against dense attention
over what the cache holds, block bytes that depend only on their tokens (prefix caching, chunked prefill),
and the capacity cost."""

from __future__ import annotations

import math

import pytest
import torch

from tests import codec_cases
from vllm_kvq import codecs, config, ops
from vllm_kvq.kv_format import KVFormat, formats_from_config
from vllm_kvq.testing import paged_reference, random_paged_batch, roundtrip


def _fmt(cid="turboquant3", d=64, hk=2, sinks=2, t=16):
    case = codec_cases.case(cid)
    cs = [case.build(d, h) for h in range(hk)]
    return KVFormat(d, cs, cs, name=f"{cid}+sink{sinks}", sink_tokens=sinks, block_size=t)


@pytest.mark.parametrize("cid", ["turboquant3", "uniform4", "bf16", "turboquant3+shift+scale", "turboquant2.5+shift"])
def test_reference_attention_reads_sink_records(cid, gen):
    fmt = _fmt(cid)
    batch = random_paged_batch([37, 16, 9, 3], [37, 1, 4, 1], 16, generator=gen)
    total = int(batch.seq_lens.sum())
    k, v = torch.randn(total, 2, 64, generator=gen) * 2 + 1, torch.randn(total, 2, 64, generator=gen)
    k[batch.ctx_start[0]] *= 8  # a sink key far from the others, as in real models
    cache = fmt.allocate(batch.num_blocks, 16)
    ops.store(k, v, cache, batch.ctx_slots, fmt, impl="reference")
    q = torch.randn(batch.num_tokens, 6, 64, generator=gen)
    out = ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt,
                              scale=0.125, impl="reference")
    kh, vh = roundtrip(fmt, k, v, batch.block_offsets())
    torch.testing.assert_close(out, paged_reference(q, kh, vh, batch, 0.125), atol=3e-5, rtol=3e-5)


def test_sinks_make_the_sink_token_exact(gen):
    """With a dominant first token, the sink format's error is far below the plain codec's."""
    plain, sinky = _fmt(sinks=0, t=16), _fmt(sinks=1)
    batch = random_paged_batch([64], [1], 16, generator=gen)
    k, v = torch.randn(64, 2, 64, generator=gen), torch.randn(64, 2, 64, generator=gen)
    k[0] = 6 * torch.randn(2, 64, generator=gen)  # the sink: huge scores
    v[0] *= 4
    q = k[0:1].repeat_interleave(3, 1) / 3
    ref = paged_reference(q, k, v, batch, 0.125)
    errs = []
    for fmt in (plain, sinky):
        cache = fmt.allocate(batch.num_blocks, 16)
        ops.store(k, v, cache, batch.ctx_slots, fmt)
        out = ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt, scale=0.125)
        errs.append(float((out - ref).norm() / ref.norm()))
    assert errs[1] < 0.5 * errs[0], errs


def test_block_bytes_depend_only_on_their_tokens(gen):
    """A prefix stored in chunks (chunked prefill, then decode steps) gives the bytes of a single store: a
    prefix-cache hit reads what a cold run wrote."""
    fmt = _fmt(sinks=2)
    slots = torch.arange(40) + 16 * 3  # blocks 3, 4, 5
    k, v = torch.randn(40, 2, 64, generator=gen), torch.randn(40, 2, 64, generator=gen)
    one, parts = fmt.allocate(8, 16), fmt.allocate(8, 16)
    ops.store(k, v, one, slots, fmt)
    for a, b in ((0, 7), (7, 30), (30, 31), (31, 40)):
        ops.store(k[a:b], v[a:b], parts, slots[a:b], fmt)
    assert torch.equal(one, parts)


@pytest.mark.parametrize("d,t,sinks,want", [(64, 16, 1, 52 + 16), (64, 128, 1, 52 + 2), (64, 128, 4, 52 + 8),
                                             (64, 256, 1, 52 + 1), (64, 512, 3, 52 + 2),
                                             (128, 16, 1, 100 + 32), (128, 128, 1, 100 + 4)])
def test_capacity_cost(d, t, sinks, want):
    """Sink records cost ceil(S * 4D / T) bytes per slot, not rounded to even (53 B slots at 256-token blocks)."""
    c = codecs.get("turboquant3", head_dim=d)
    fmt = KVFormat(d, [c], [c], sink_tokens=sinks, block_size=t)
    assert fmt.slot_bytes == want and fmt.sink_bytes == math.ceil(sinks * 4 * d / t)
    assert "sink area" in fmt.describe()


def test_sink_config_and_errors(tmp_path):
    y = tmp_path / "s.yaml"
    y.write_text("name: s\nkey: turboquant3\nvalue: turboquant3\nsink_tokens: 2\n")
    cfg = config.load(y)
    fmts = formats_from_config(cfg, num_layers=2, num_kv_heads=3, head_size=64, uniform_slot=True, block_size=128)
    assert all(f.sink_tokens == 2 and f.slot_bytes == 52 + 4 for f in fmts)
    with pytest.raises(ValueError, match="needs the cache's block size"):
        formats_from_config(cfg, num_layers=2, num_kv_heads=3, head_size=64)
    with pytest.raises(config.ConfigError, match="sink_tokens"):
        config.from_dict({"key": "turboquant3", "value": "turboquant3", "sink_tokens": -1})
    fmt = fmts[0]
    with pytest.raises(ValueError, match="blocks of 128 tokens, the cache has 16"):
        ops.store(torch.zeros(1, 3, 64), torch.zeros(1, 3, 64), fmt.allocate(2, 16), torch.zeros(1, dtype=torch.long), fmt)
    assert ops.plan(fmt, "cpu", "store")["reference"] is None

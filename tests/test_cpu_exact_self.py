"""exact_self in the native CPU kernels: ``exclude_self`` (a row at position p attends j < p) and ``lse`` (each
row's log-sum-exp of the scores it attended) against the reference, which defines both.

Every combination of the two, for the codec matrix, calibrated formats with sink records, position-aware key
centring, decode batches with split contexts (a split that the exclusion empties included), prefill, chunked
prefill, GQA ratios, empty rows (position 0: output 0, lse -inf) and every ISA build this CPU runs; then the
full ``ops.paged_attention(..., self_kv=...)`` merge on the CPU kernels against the reference's.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests import codec_cases
from tests.test_cpu_kernels import ISAS, sink_fmt, uniform_fmt
from tests.test_exact_self import FORMATS, _setup
from vllm_kvq import ops
from vllm_kvq.kernels import cpu as kc
from vllm_kvq.ops import reference
from vllm_kvq.testing import random_paged_batch

pytestmark = pytest.mark.skipif(not kc.available(), reason="vllm_kvq._C_cpu is not built")

# decodes at odd and block-boundary lengths and of a 1-token sequence (no key left when excluding)
DECODE = ([37, 50, 1, 33], [1, 1, 1, 1])
# prefill from position 0 (its first row is empty when excluding), chunked prefill, decodes, a sequence
# without new tokens
MIXED = ([9, 7, 41, 32, 5, 70], [1, 7, 6, 1, 0, 30])


def _case(fmt, hq, seq_lens, q_lens, gen, *, isa="best", num_splits=None, t=16, pad=0):
    """Stores a random context, then compares kernel and reference for exclude_self x lse. ``pad`` query rows
    past the batch's tokens (vLLM pads batches) belong to no sequence: output 0, lse -inf."""
    d, hk = fmt.head_size, fmt.num_kv_heads
    batch = random_paged_batch(seq_lens, q_lens, t, generator=gen)
    total = int(batch.seq_lens.sum())
    k = torch.randn(total, hk, d, generator=gen)
    k[:, :, :2] *= 4  # outlier channels, as real keys have
    v = torch.randn(total, hk, d, generator=gen)
    pos = torch.cat([torch.arange(s) for s in batch.seq_lens.tolist()])
    cache = fmt.allocate(batch.num_blocks, t)
    # the cache holds keys minus their chunk's turned mean (as ops.store writes them)
    k_stored = k if fmt.key_rope is None else k - fmt.key_rope.centre(pos)
    reference.store(k_stored, v, cache, batch.ctx_slots, fmt)
    q = torch.randn(batch.num_tokens + pad, hq, d, generator=gen) * 2
    scale = d ** -0.5
    kb = None
    if fmt.key_rope is not None:
        kb = (fmt.key_rope.bias_query(q, scale), fmt.key_rope.table(batch.block_table.shape[1] * t, "cpu"))
    args = (cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt)
    outs = {}
    for exclude in (False, True):
        want_lse = torch.empty(q.shape[:2])
        want = reference.paged_attention(q, *args, scale=scale, key_bias=kb, exclude_self=exclude, lse=want_lse)
        for with_lse in (False, True):
            lse = torch.full(q.shape[:2], 7.0) if with_lse else None  # every row must be written
            got = kc.paged_attention(q, *args, scale=scale, num_splits=num_splits, isa=isa, key_bias=kb,
                                     exclude_self=exclude, lse=lse)
            err = (got - want).abs().max().item()
            assert err <= 1e-4, f"exclude_self={exclude} lse={with_lse}: output differs by {err}"
            empty = torch.isneginf(want_lse)
            assert torch.equal(got[empty], torch.zeros_like(got[empty]))  # not the value shift: exactly 0
            if lse is not None:
                assert torch.equal(torch.isneginf(lse), empty)
                lerr = (lse[~empty] - want_lse[~empty]).abs().max().item()
                assert lerr <= 1e-3, f"exclude_self={exclude}: lse differs by {lerr}"
        outs[exclude] = got
    # The check can fail: the rows that keep keys after the exclusion move when their own key goes.
    qsl = batch.query_start_loc.tolist()
    pos_rows = torch.tensor([s - (qsl[i + 1] - r) for i, s in enumerate(batch.seq_lens.tolist())
                             for r in range(qsl[i], qsl[i + 1])] + [-1] * pad)
    assert ((outs[True] - outs[False]).abs().amax((1, 2))[pos_rows > 0] > 1e-3).all()
    return outs


CODECS = codec_cases.ids("cpu")


@pytest.mark.parametrize("cid", CODECS)
def test_codec_matrix_decode_split_and_mixed(cid, gen):
    """Every codec of the matrix in the CPU's best build: forced split decode (a split emptied by the
    exclusion: length 33 with splits of 32; the 1-token decode's splits all empty) and a mixed batch."""
    fmt = uniform_fmt(cid, 64, 2)
    _case(fmt, 6, *DECODE, gen, num_splits=3)
    _case(fmt, 6, *MIXED, gen)


# a subset in every build (the best one runs the whole matrix above): TurboQuant's fused decode, a fractional
# rate, uniform, raw, FibQuant, bound state, a dense rotation
ISA_CODECS = ["turboquant3", "turboquant2.5", "uniform4", "bf16", "fibquant2", "uniform4+shift+scale", "tq3-haar"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", ISA_CODECS)
def test_every_isa(cid, isa, gen):
    fmt = uniform_fmt(cid, 64, 2)
    _case(fmt, 6, *MIXED, gen, isa=isa)
    _case(fmt, 6, *DECODE, gen, isa=isa, num_splits=2)
    _case(fmt, 6, [40, 20], [40, 1], gen, isa=isa, pad=3)  # padding rows: lse -inf, output 0


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", ["fibquant2", "fibquant2+shift+scale"])
def test_fibquant_lookup_tables(cid, isa, gen, monkeypatch):
    """Decode items through FibQuant's per-query tables and value histograms (forced on for short contexts)."""
    monkeypatch.setattr(kc, "FIB_LUT_FROM", 0)
    _case(uniform_fmt(cid, 64, 2), 6, *DECODE, gen, isa=isa)
    _case(uniform_fmt(cid, 64, 2), 6, *DECODE, gen, isa=isa, num_splits=3)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", list(FORMATS))
def test_calibrated_sink_and_rope_centred(name, isa, gen):
    """tests/test_exact_self.py's formats: calibrated with a sink record per block (the sink's own row
    excluded like any other), rope-centred (key_bias in the scores and lse), partial rotary."""
    fmt = FORMATS[name](gen)
    _case(fmt, 6, *MIXED, gen, isa=isa)
    _case(fmt, 6, [300, 50, 1, 130], [1, 1, 1, 1], gen, isa=isa, num_splits=3)


@pytest.mark.parametrize("isa", ISAS)
def test_sink_records_every_position(isa, gen):
    """Three sink records per block of 8 (most positions near a block start are sinks): chunked prefill and
    split decode."""
    _case(sink_fmt("turboquant3+shift+scale", 64, 2, 3, 8), 6, *MIXED, gen, isa=isa, t=8)
    _case(sink_fmt("bf16", 64, 2, 3, 8), 6, *DECODE, gen, isa=isa, t=8, num_splits=3)


@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 1), (9, 3), (16, 2)])
def test_gqa_ratios(hq, hk, gen):
    # 16 query heads per KV head: prefill items of 4 query tokens (64 rows), so a chunk's rows span items
    _case(uniform_fmt("turboquant3", 64, hk), hq, *MIXED, gen)


@pytest.mark.parametrize("cid", ["turboquant3", "uniform4"])
def test_head_size_128_and_long_prefill(cid, gen):
    """Head size 128; a prefill of 100 rows in several items, each from context token 0."""
    _case(uniform_fmt(cid, 128, 1), 8, [100, 45, 3], [100, 12, 1], gen)


def test_dense_prefill_path_steps_aside(gen, monkeypatch):
    """The opt-in dense long-prefill path computes neither exclusion nor lse: such calls stay in the fused
    kernel (and give its results); plain calls still take it."""
    monkeypatch.setattr(kc, "DENSE_PREFILL_FROM", 8)
    _case(uniform_fmt("turboquant3", 64, 2), 6, *MIXED, gen)
    calls = []
    monkeypatch.setattr(kc, "_dense_prefill", lambda *a: calls.append(a))
    fmt = uniform_fmt("turboquant3", 64, 2)
    batch = random_paged_batch([40], [40], 16, generator=gen)
    args = (torch.randn(40, 6, 64, generator=gen), fmt.allocate(batch.num_blocks, 16), batch.block_table,
            batch.seq_lens, batch.query_start_loc, fmt)
    kc.paged_attention(*args, scale=0.125, exclude_self=True)
    kc.paged_attention(*args, scale=0.125, lse=torch.empty(40, 6))
    assert not calls
    kc.paged_attention(*args, scale=0.125)
    assert calls


def test_lse_is_checked(gen):
    fmt = uniform_fmt("turboquant3", 64, 2)
    batch = random_paged_batch([5], [5], 16, generator=gen)
    args = (torch.randn(5, 6, 64, generator=gen), fmt.allocate(batch.num_blocks, 16), batch.block_table,
            batch.seq_lens, batch.query_start_loc, fmt)
    for bad in (torch.empty(5, 6, dtype=torch.float64), torch.empty(5, 3), torch.empty(6, 5).T):
        with pytest.raises(ValueError, match="lse"):
            kc.paged_attention(*args, scale=0.125, lse=bad)


@pytest.mark.parametrize("name", list(FORMATS))
def test_ops_merge_on_cpu_equals_reference(name, gen):
    """ops.paged_attention of an exact_self format picks these kernels and gives the reference's merge."""
    base = FORMATS[name](gen)
    fmt = base.with_block_size(base.block_size or 16)
    fmt.exact_self = True
    assert ops.plan(fmt, "cpu")["cpu"] is None
    batch, k, v, cache, q = _setup(gen, fmt, [37, 1, 50, 20, 1], [37, 1, 9, 1, 1])
    idx = batch.new_token_index()
    scale = 1 / math.sqrt(64)
    args = (q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt)
    before = set(ops.used())
    got = ops.paged_attention(*args, scale=scale, self_kv=(k[idx], v[idx]))
    assert "paged_attention:cpu" in set(ops.used()) | before
    want = ops.paged_attention(*args, scale=scale, impl="reference", self_kv=(k[idx], v[idx]))
    err = (got - want).abs().max().item()
    assert err <= 1e-4, err
    # the exclusion matters: without it (the cache's copy of the own token attended as well) the merge moves
    plain = ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, base,
                                scale=scale, impl="cpu")
    assert (got - plain).abs().max() > 1e-2


def test_opcheck_exclude_self_and_lse(gen):
    """The schema declares lse as mutated (as out is), and the fake kernel holds up with the new arguments."""
    fmt = uniform_fmt("turboquant3", 64, 2)
    (heads, vo, _, ks, kt, vs, vt), = kc._group_args(fmt)
    cache = fmt.allocate(2, 16)
    kc.store(torch.randn(8, 2, 64, generator=gen), torch.randn(8, 2, 64, generator=gen), cache, torch.arange(8), fmt)
    q = torch.randn(4, 4, 64, generator=gen)
    args = (q, torch.zeros_like(q), cache, torch.tensor([[0, 1], [1, 0]], dtype=torch.int32),
            torch.tensor([5, 3], dtype=torch.int32), torch.tensor([0, 3, 4], dtype=torch.int32), heads, vo, 0.125, ks,
            kt, vs, vt, None, None, None, [0, 0, 0], 256, 0, 0, 0, None, None, True, torch.zeros(4, 4))
    torch.library.opcheck(torch.ops.vllm_kvq_cpu.paged_attention.default, args)

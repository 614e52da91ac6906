"""The reference paged ops (store + attention) against dense attention.

Two kinds of checks (STYLE habit 2): correctness against dense attention on the *dequantized* K/V (tight:
only float rounding differs), and quality against the *original* K/V, bounded by the codec's distortion.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvq import codecs, kv_format, ops
from vllm_kvq.kv_format import KVFormat
from vllm_kvq.ops import reference
from vllm_kvq.testing import (paged_probs_sq, paged_reference, random_paged_batch, relative_error, relative_mse,
                              roundtrip)

from tests import codec_cases  # noqa: E402

# decode, full prefill, chunked-prefill continuation, a sequence with an odd partial last block, a decode at
# an exact block boundary, and a one-token prefill (looks like a decode to the op)
MIXED_SEQ = [9, 7, 41, 33, 32, 1]
MIXED_Q = [1, 7, 6, 33, 1, 1]


def _fill(fmt, batch, k_ctx, v_ctx, cache, gen):
    """Store the old context, then this step's tokens, each with -1 padding slots mixed in (as an engine
    does with CUDA-graph padding)."""
    new = batch.new_token_index()
    old = torch.ones(k_ctx.shape[0], dtype=torch.bool)
    old[new] = False
    for idx in (old.nonzero()[:, 0], new):
        slots = batch.ctx_slots[idx]
        k, v = k_ctx[idx], v_ctx[idx]
        pad = torch.randint(0, 2, (idx.numel() + 3,), generator=gen).bool()
        pad[:3] = True
        pad = pad[torch.randperm(pad.numel(), generator=gen)]
        n = pad.numel()
        sm = torch.full((n,), -1, dtype=torch.int64)
        kk = torch.randn(n, *k.shape[1:], generator=gen) * 100  # garbage in padding rows must not land
        vv = torch.randn(n, *v.shape[1:], generator=gen) * 100
        real = (~pad).nonzero()[:, 0][: idx.numel()]
        if real.numel() < idx.numel():  # not enough non-pad rows: append
            extra = idx.numel() - real.numel()
            sm = torch.cat((sm, torch.full((extra,), -1, dtype=torch.int64)))
            kk, vv = torch.cat((kk, kk[:extra])), torch.cat((vv, vv[:extra]))
            real = torch.cat((real, torch.arange(n, n + extra)))
        sm[real], kk[real], vv[real] = slots, k, v
        ops.store(kk.to(torch.bfloat16), vv.to(torch.bfloat16), cache, sm, fmt, impl="reference")


def _run(fmt, batch, hq, gen, *, scale=None, cache=None, k_scale=1.0):
    d = fmt.head_size
    total = int(batch.seq_lens.sum())
    # bf16-representable inputs, so storing bf16 and comparing against float32 K/V loses nothing
    k_ctx = (torch.randn(total, fmt.num_kv_heads, d, generator=gen) * k_scale).to(torch.bfloat16).float()
    v_ctx = torch.randn(total, fmt.num_kv_heads, d, generator=gen).to(torch.bfloat16).float()
    q = torch.randn(batch.num_tokens, hq, d, generator=gen).to(torch.bfloat16).float()
    if cache is None:
        cache = fmt.allocate(batch.num_blocks, batch.block_size)
    _fill(fmt, batch, k_ctx, v_ctx, cache, gen)
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt,
                              scale=scale, impl="reference")
    return out, q, k_ctx, v_ctx, scale


@pytest.mark.parametrize("head_size,cid", [(d, c) for d in (64, 80) for c in codec_cases.ids(head_dim=d)])
def test_matches_dense_on_dequantized(cid, head_size, gen):
    fmt = codec_cases.case(cid).fmt(head_size, 2)
    batch = random_paged_batch(MIXED_SEQ, MIXED_Q, block_size=16, generator=gen)
    out, q, k, v, scale = _run(fmt, batch, 8, gen)
    assert out.shape == q.shape and out.dtype == q.dtype
    kh, vh = roundtrip(fmt, k, v)
    torch.testing.assert_close(out, paged_reference(q, kh, vh, batch, scale), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2), (6, 1), (12, 3)])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_gqa_ratios_and_block_sizes(hq, hk, block_size, gen):
    fmt = KVFormat(64, [codecs.get("turboquant3", head_dim=64)] * hk, [codecs.get("turboquant2.5", head_dim=64)] * hk)
    batch = random_paged_batch([3, 17, 40], [3, 1, 7], block_size=block_size, generator=gen)
    out, q, k, v, scale = _run(fmt, batch, hq, gen)
    kh, vh = roundtrip(fmt, k, v)
    torch.testing.assert_close(out, paged_reference(q, kh, vh, batch, scale), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.125, 3.0, -0.5])
def test_any_scale(scale, gen):
    fmt = KVFormat(64, [codecs.get("turboquant4", head_dim=64)] * 2, [codecs.get("turboquant4", head_dim=64)] * 2)
    batch = random_paged_batch(MIXED_SEQ, MIXED_Q, block_size=16, generator=gen)
    out, q, k, v, scale = _run(fmt, batch, 4, gen, scale=scale)
    kh, vh = roundtrip(fmt, k, v)
    torch.testing.assert_close(out, paged_reference(q, kh, vh, batch, scale), atol=5e-5, rtol=5e-5)


def test_mixed_per_head_format(gen):
    # four KV heads, three different (K, V) pairs: the op batches over head groups and must put each
    # head's output back in its place
    names = [("turboquant3", "turboquant3"), ("bf16", "uniform4"), ("turboquant3", "turboquant3"),
             ("turboquant4", "turboquant2")]
    fmt = KVFormat(64, [codecs.get(k, head_dim=64) for k, _ in names], [codecs.get(v, head_dim=64) for _, v in names])
    assert len(fmt.groups) == 3
    batch = random_paged_batch(MIXED_SEQ, MIXED_Q, block_size=16, generator=gen)
    out, q, k, v, scale = _run(fmt, batch, 8, gen)
    kh, vh = roundtrip(fmt, k, v)
    torch.testing.assert_close(out, paged_reference(q, kh, vh, batch, scale), atol=2e-5, rtol=2e-5)


def test_mixed_format_from_config(gen):
    fmt = kv_format("kvq-mixed-example", head_size=64, num_kv_heads=3, layer=2, num_layers=6)
    assert [k.name for k in fmt.keys] == ["turboquant4", "turboquant3", "turboquant3"]
    batch = random_paged_batch([5, 20], [5, 1], block_size=8, generator=gen)
    out, q, k, v, scale = _run(fmt, batch, 6, gen)
    kh, vh = roundtrip(fmt, k, v)
    torch.testing.assert_close(out, paged_reference(q, kh, vh, batch, scale), atol=2e-5, rtol=2e-5)


def _strided_caches(fmt, num_blocks, t):
    b, hk, c = num_blocks, fmt.num_kv_heads, fmt.slot_bytes
    yield "contiguous", fmt.allocate(b, t)
    # vLLM's NHD-style layout: physical (B, T, Hk, C), the op sees the (B, Hk, T, C) permutation
    yield "tokens-major", torch.zeros(b, t, hk, c, dtype=torch.uint8).permute(0, 2, 1, 3)
    # slack after each slot (a page padded for another layer), and blocks interleaved with another cache
    yield "padded-slot", torch.zeros(b, hk, t, c + 6, dtype=torch.uint8)[..., :c]
    yield "interleaved", torch.zeros(2, b, hk, t, c, dtype=torch.uint8).transpose(0, 1)[:, 1]


def test_non_contiguous_caches_give_identical_results():
    fmt = KVFormat(64, [codecs.get("turboquant3", head_dim=64)] * 2, [codecs.get("uniform4", head_dim=64)] * 2)
    outs = {}
    for label, cache in _strided_caches(fmt, 12, 16):
        g = torch.Generator().manual_seed(7)
        batch = random_paged_batch([9, 41, 33], [1, 6, 33], block_size=16, generator=g)
        assert batch.num_blocks <= 12
        out, *_ = _run(fmt, batch, 4, g, cache=cache)
        outs[label] = (out, cache.contiguous())
    ref_out, ref_cache = outs.pop("contiguous")
    for label, (out, cache) in outs.items():
        assert torch.equal(cache, ref_cache), label
        assert torch.equal(out, ref_out), label


@pytest.mark.parametrize("name", ["turboquant3.5", "uniform8", "bf16"])
def test_store_writes_codec_bytes_and_skips_padding(name, gen):
    fmt = KVFormat(64, [codecs.get(name, head_dim=64)] * 3, [codecs.get("turboquant2", head_dim=64)] * 3, pad_to=None)
    cache = torch.full((4, 3, 8, fmt.slot_bytes), 0xAB, dtype=torch.uint8)
    slots = torch.tensor([5, -1, 0, 31, -1, 17, 8])
    k = torch.randn(7, 3, 64, generator=gen)
    v = torch.randn(7, 3, 64, generator=gen)
    before = cache.clone()
    ops.store(k, v, cache, slots, fmt, impl="reference")
    flat = cache.permute(0, 2, 1, 3).reshape(32, 3, fmt.slot_bytes)  # (slot, head, C)
    written = set()
    for i, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        written.add(s)
        for h in range(3):
            kb = fmt.keys[h].nbytes
            assert torch.equal(flat[s, h, :kb], fmt.keys[h].encode(k[i, h][None])[0])
            assert torch.equal(flat[s, h, kb:kb + fmt.values[h].nbytes], fmt.values[h].encode(v[i, h][None])[0])
            assert not flat[s, h, kb + fmt.values[h].nbytes:].any()  # slot padding is zeroed
    untouched = [s for s in range(32) if s not in written]
    before_flat = before.permute(0, 2, 1, 3).reshape(32, 3, fmt.slot_bytes)
    assert torch.equal(flat[untouched], before_flat[untouched])


def test_empty_batch_and_all_padding():
    fmt = kv_format("uniform4", head_size=64, num_kv_heads=2)
    cache = fmt.allocate(3, 16)
    before = cache.clone()
    ops.store(torch.randn(0, 2, 64), torch.randn(0, 2, 64), cache, torch.zeros(0, dtype=torch.int64), fmt,
              impl="reference")
    ops.store(torch.randn(4, 2, 64), torch.randn(4, 2, 64), cache, torch.full((4,), -1), fmt, impl="reference")
    assert torch.equal(cache, before)
    out = ops.paged_attention(torch.randn(0, 4, 64), cache, torch.zeros(0, 2, dtype=torch.int32),
                              torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), fmt,
                              scale=0.125, impl="reference")
    assert out.shape == (0, 4, 64)


def test_sequence_without_new_tokens(gen):
    # a sequence scheduled with zero query tokens contributes no rows and must not disturb the others
    fmt = kv_format("turboquant2", head_size=64, num_kv_heads=1)
    batch = random_paged_batch([12, 30, 5], [1, 0, 5], block_size=16, generator=gen)
    out, q, k, v, scale = _run(fmt, batch, 2, gen)
    kh, vh = roundtrip(fmt, k, v)
    torch.testing.assert_close(out, paged_reference(q, kh, vh, batch, scale), atol=2e-5, rtol=2e-5)


def test_context_longer_than_a_chunk(monkeypatch, gen):
    # the online softmax across chunks: make chunks tiny rather than contexts huge
    fmt = kv_format("turboquant3", head_size=64, num_kv_heads=2)
    batch = random_paged_batch([75, 49, 33], [1, 20, 33], block_size=8, generator=gen)
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 16)
    out, q, k, v, scale = _run(fmt, batch, 4, gen, k_scale=3.0)  # peaked scores stress the rescaling
    kh, vh = roundtrip(fmt, k, v)
    torch.testing.assert_close(out, paged_reference(q, kh, vh, batch, scale), atol=3e-5, rtol=3e-5)


def test_launcher_rejects_bad_shapes():
    fmt = kv_format("turboquant3", head_size=64, num_kv_heads=2)
    cache = fmt.allocate(2, 16)
    with pytest.raises(ValueError, match="expected a uint8 cache"):
        ops.store(torch.randn(1, 2, 64), torch.randn(1, 2, 64), cache.float(), torch.zeros(1, dtype=torch.long), fmt)
    with pytest.raises(ValueError, match=r"does not match format"):
        ops.store(torch.randn(1, 2, 64), torch.randn(1, 2, 64), cache[..., :-2], torch.zeros(1, dtype=torch.long), fmt)
    with pytest.raises(ValueError, match=r"key: expected \(1, 2, 64\)"):
        ops.store(torch.randn(1, 3, 64), torch.randn(1, 2, 64), cache, torch.zeros(1, dtype=torch.long), fmt)
    with pytest.raises(ValueError, match="multiple of 2"):
        ops.paged_attention(torch.randn(1, 3, 64), cache, torch.zeros(1, 1, dtype=torch.int32),
                            torch.ones(1, dtype=torch.int32), torch.tensor([0, 1]), fmt, scale=1.0)


# --- quality against the original K/V ---------------------------------------------------------------------

def _peaked_value_error(name, d, gen):
    """Mean ||o - o_ref||^2 / mean ||v||^2 with exact (fp16) keys and attention close to one-hot.

    With keys exact, o - o_ref = sum_j p_j (v^_j - v_j). When p is one-hot this is one codec error, so the
    ratio estimates the codec's distortion D; for any p, Jensen gives ||sum_j p_j e_j||^2 <= sum_j p_j ||e_j||^2,
    so the ratio can only fall below D as attention spreads. Either way it must not exceed D by much.
    """
    hk, n = 1, 512
    fmt = KVFormat(d, [codecs.get("fp16", head_dim=d)] * hk, [codecs.get(name, head_dim=d)] * hk)
    batch = random_paged_batch([n], [n], block_size=16, generator=gen)
    k = torch.randn(n, hk, d, generator=gen)
    v = torch.randn(n, hk, d, generator=gen)
    q = k.clone() * 4  # each query's own key dominates: score 4*|k|^2 against ~4*|k| for others
    cache = fmt.allocate(batch.num_blocks, 16)
    ops.store(k, v, cache, batch.ctx_slots, fmt, impl="reference")
    out = ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt,
                              scale=1.0, impl="reference")
    ref = paged_reference(q, k, v, batch, 1.0)
    return float((out - ref).pow(2).sum(-1).mean() / v.pow(2).sum(-1).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_value_error_tracks_codec_distortion(bits, gen):
    d = 64
    lm = codecs.lloyd_max_codebook(d, bits).mse * d  # the Lloyd-Max D_mse the codec is designed for
    ratio = _peaked_value_error(f"turboquant{bits}", d, gen)
    assert 0.8 * lm <= ratio <= 1.1 * lm, (ratio, lm)


def test_attention_error_within_distortion_bound(gen):
    """Full K and V quantization on random data: the output error is what the codec's distortion implies,
    and more bits give less error.

    Let D be the codec's relative distortion (measured on these K/V) and P_i = sum_j p_ij^2 for query row i
    (1 / the effective number of keys it attends). Per-token errors are independent and zero-mean, so
    - the value term sum_j p_ij (v^_j - v_j) has E|.|^2 = D P_i E|v|^2;
    - a key error moves score j by eps_j = scale q.(k^_j - k_j), with Var = scale^2 |q|^2 D |k|^2 / d = D for
      unit-variance data and scale = 1/sqrt(d); to first order p changes by p_j (eps_j - sum_l p_l eps_l), moving
      the output by sum_j p_j (eps_j - eps_bar) (v_j - o), with E|.|^2 <= D P_i E|v|^2.
    So E|o - o_ref|^2 / (D P E|v|^2) lies between 1 (values alone) and 2 (+ keys): asserted with 10 % slack.
    """
    d, errs = 64, {}
    batch = random_paged_batch([160, 64, 17], [160, 1, 5], block_size=16, generator=gen)
    order = ["turboquant2", "turboquant2.5", "turboquant3", "turboquant3.5", "turboquant4", "uniform8"]
    for name in order:
        fmt = kv_format(name, head_size=d, num_kv_heads=2)
        g = torch.Generator().manual_seed(99)  # the same data for every codec
        out, q, k, v, scale = _run(fmt, batch, 4, g)
        ref = paged_reference(q, k, v, batch, scale)
        kh, vh = roundtrip(fmt, k, v)
        dist = (relative_mse(k.reshape(-1, d), kh.reshape(-1, d)) + relative_mse(v.reshape(-1, d), vh.reshape(-1, d))) / 2
        p2 = paged_probs_sq(q, k, batch, scale)  # (N, Hq)
        ratio = float((out - ref).pow(2).sum(-1).mean() / (dist * p2.mean() * v.pow(2).sum(-1).mean()))
        assert 0.9 <= ratio <= 2.2, (name, ratio, dist)
        if name.startswith("turboquant"):
            bits = fmt.keys[0].segments[-1][0]  # the lower rate of a fractional codec bounds its distortion
            assert dist <= 1.03 * codecs.lloyd_max_codebook(d, bits).mse * d, (name, dist)
        errs[name] = relative_error(out, ref)
    assert [errs[n] for n in order] == sorted(errs.values(), reverse=True), errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_query_and_int32_slots(dtype, gen):
    # vLLM hands bf16/fp16 queries and may pass int32 slot mappings: output keeps the query dtype and
    # matches the float32 run to the dtype's rounding
    fmt = kv_format("turboquant4", head_size=64, num_kv_heads=2)
    batch = random_paged_batch(MIXED_SEQ, MIXED_Q, block_size=16, generator=gen)
    total = int(batch.seq_lens.sum())
    k, v = torch.randn(total, 2, 64, generator=gen), torch.randn(total, 2, 64, generator=gen)
    q = torch.randn(batch.num_tokens, 4, 64, generator=gen).to(dtype)
    cache = fmt.allocate(batch.num_blocks, 16)
    ops.store(k.to(dtype), v.to(dtype), cache, batch.ctx_slots.to(torch.int32), fmt, impl="reference")
    args = (cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt)
    out = ops.paged_attention(q, *args, scale=0.125, impl="reference")
    assert out.dtype == dtype
    ref = ops.paged_attention(q.float(), *args, scale=0.125, impl="reference")
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)
    kh, vh = roundtrip(fmt, k.to(dtype), v.to(dtype))
    torch.testing.assert_close(ref, paged_reference(q.float(), kh, vh, batch, 0.125), atol=2e-5, rtol=2e-5)

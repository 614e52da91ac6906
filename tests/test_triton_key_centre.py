"""The Triton attention kernel with position-aware key centring (``key_bias``, vllm_kvq.key_centre) against the
reference, under the interpreter on small shapes: decode, split-K, prefill and chunked prefill tiles, GQA,
sinks, TurboQuant and FibQuant, head sizes 64 and 128, partial rotary.

Each case also shows that its bound is tight enough to matter: the reference run without the bias, and with
every key's bias taken from the next chunk's table row, both miss the bound the kernel meets.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
import vllm_kvq.kernels.triton as kt  # noqa: E402  (conftest switched the interpreter on without CUDA)

from tests import codec_cases  # noqa: E402
from tests.kernel_checks import lowp_attention  # noqa: E402
from vllm_kvq import key_centre, ops  # noqa: E402
from vllm_kvq.ops import reference  # noqa: E402
from vllm_kvq.testing import random_paged_batch, roundtrip  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(fmt, hq, seq_lens, q_lens, gen, *, num_splits=None, dtype=torch.bfloat16, t=16):
    d, hk = fmt.head_size, fmt.num_kv_heads
    batch = random_paged_batch(seq_lens, q_lens, t, generator=gen)
    pos = torch.cat([torch.arange(s) for s in batch.seq_lens.tolist()])
    centre = fmt.key_rope.centre(pos)
    k = torch.randn(pos.numel(), hk, d, generator=gen) + centre
    v = torch.randn(pos.numel(), hk, d, generator=gen)
    cache = fmt.allocate(batch.num_blocks, t, device=DEV)
    ops.store(k.to(DEV), v.to(DEV), cache, batch.ctx_slots.to(DEV), fmt, impl="reference", positions=pos.to(DEV))
    q = (torch.randn(batch.num_tokens, hq, d, generator=gen) * 2).to(dtype)
    scale = d ** -0.5
    args = (cache, batch.block_table.to(DEV), batch.seq_lens.to(DEV), batch.query_start_loc.to(DEV), fmt)
    # what ops.paged_attention hands an implementation
    chunks = batch.block_table.shape[1] * t  # positions the block table addresses
    bias_q, table = fmt.key_rope.bias_query(q.to(DEV), scale), fmt.key_rope.table(chunks, DEV)
    qf = q.float().to(DEV)
    ref = reference.paged_attention(qf, *args, scale=scale, key_bias=(bias_q, table)).cpu()
    if num_splits is None:  # through dispatch, as vLLM calls it
        out = ops.paged_attention(q.to(DEV), *args, scale=scale, impl="triton")
    else:
        out = kt.paged_attention(q.to(DEV), *args, scale=scale, num_splits=num_splits, key_bias=(bias_q, table))
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.float().cpu() - ref).abs().max().item()
    if dtype == torch.float32:
        bound = 1e-4
    else:  # flash-attention's rule: twice a bf16 PyTorch run over the dequantized keys (mean added back)
        k_deq, v_deq = roundtrip(fmt, k - centre, v, batch.block_offsets())
        lowp = lowp_attention(q.float(), k_deq + centre, v_deq, batch, scale, dtype)
        bound = 2 * (lowp.float() - ref).abs().max().item() + 1e-5
    assert err <= bound, f"kernel error {err} > {bound}"
    for wrong in (None, (bias_q, table[1:])):  # no bias; every key biased by the next chunk's mean
        miss = (reference.paged_attention(qf, *args, scale=scale, key_bias=wrong).cpu() - ref).abs().max().item()
        assert miss > 2 * bound, f"the check cannot see a {'dropped' if wrong is None else 'shifted'} bias: {miss}"


DECODE = ([37, 50, 1, 16, 70], [1, 1, 1, 1, 1])
# prefill, chunked prefill, decodes at odd and block-boundary lengths, a sequence with no new tokens
MIXED = ([9, 7, 41, 32, 5], [1, 7, 6, 1, 0])
TQ3 = codec_cases.case("turboquant3")


def test_decode():
    _case(TQ3.rope_fmt(64, 2), 6, *DECODE, torch.Generator().manual_seed(1))


def test_decode_split_k():
    _case(TQ3.rope_fmt(64, 2), 6, *DECODE, torch.Generator().manual_seed(2), num_splits=3)


@pytest.mark.parametrize("hq,hk", [(6, 2), (8, 1)], ids=["g3", "g8"])
def test_mixed_batch_gqa(hq, hk, gen):
    _case(TQ3.rope_fmt(64, hk), hq, *MIXED, gen)


def test_prefill_tiles_span_queries_and_short_query_split(gen):
    """Chunked prefill spanning several 128-row tiles (32 tokens of a group of 4), and short queries split."""
    fmt = TQ3.rope_fmt(64, 2)
    _case(fmt, 8, [100, 20], [90, 3], gen)
    _case(fmt, 8, [37, 50, 9], [3, 4, 2], gen, num_splits=2)


def test_sinks(gen):
    fmt = TQ3.rope_fmt(64, 2, sinks=2)
    _case(fmt, 6, *MIXED, gen)
    _case(fmt, 6, *DECODE, gen, num_splits=2)


def test_fibquant(gen):
    _case(codec_cases.case("fibquant2").rope_fmt(64, 2), 6, *MIXED, gen)


def test_head_size_128_and_sinks(gen):
    """16-key context tiles (one chunk each); with sinks, 64-row prefill tiles."""
    _case(TQ3.rope_fmt(128, 1), 2, [40, 9], [5, 1], gen)
    _case(codec_cases.case("turboquant4").rope_fmt(128, 1, sinks=2), 4, [40, 21], [33, 1], gen)


def test_partial_rotary(gen):
    _case(TQ3.rope_fmt(64, 2, rot=32), 6, *MIXED, gen)


def test_float32_queries_match_tightly(gen):
    fmt = TQ3.rope_fmt(64, 2)
    _case(fmt, 4, *MIXED, gen, dtype=torch.float32)
    _case(fmt, 4, *DECODE, gen, dtype=torch.float32, num_splits=2)


def test_key_bias_is_validated(gen):
    fmt = TQ3.rope_fmt(64, 2)
    batch = random_paged_batch([40], [1], 16, generator=gen)
    cache = fmt.allocate(batch.num_blocks, 16, device=DEV)
    q = torch.randn(1, 4, 64, device=DEV)
    args = (q, cache, batch.block_table.to(DEV), batch.seq_lens.to(DEV), batch.query_start_loc.to(DEV), fmt)
    bq = fmt.key_rope.bias_query(q, 0.125)
    chunks = batch.block_table.shape[1] * 16  # positions the block table addresses
    short = torch.zeros(chunks - 1, 64, device=DEV)
    with pytest.raises(ValueError, match=rf"key_bias\[1\]: expected float32 \(>= {chunks}, 64\)"):
        kt.paged_attention(*args, scale=0.125, key_bias=(bq, short))
    with pytest.raises(ValueError, match=r"key_bias\[0\]"):
        kt.paged_attention(*args, scale=0.125, key_bias=(bq.half(), fmt.key_rope.table(chunks, DEV)))


def test_dispatch_on_cuda_takes_triton_not_the_reference():
    """On a GPU a rope-centred format must not fall to the reference (the vLLM backend refuses it there):
    the CUDA extension declines attention, Triton takes it; stores run wherever the format runs."""
    fmt = TQ3.rope_fmt(128, 2)
    for decode in (True, False):
        plan = ops.plan(fmt, "cuda", decode=decode, group=4)
        assert plan["triton"] is None, plan
        first = next(name for name, why in plan.items() if why is None)
        assert first == "triton", plan
    from vllm_kvq.kernels import cuda as kcuda

    assert "key centring" in kcuda.why_not(fmt, "paged_attention", True, 4)
    assert kcuda.why_not(fmt, "store") is None


# (codec case, sink tokens): the calibrated presets' codecs, with sinks where 128-row tiles were tightest.
AOT_FORMATS = (("turboquant3", 0), ("turboquant3", 4), ("turboquant4", 4), ("turboquant2.5", 0), ("fibquant2", 0),
               ("fibquant2", 4))


@pytest.mark.slow
def test_biased_kernels_compile_for_sm90_without_spills():
    """Every attention variant (decode, split-K, short-query split, prefill) of rope-centred formats compiles
    for sm_90 without register spills at head sizes 64 and 128, and prefill tiles keep >= 64 rows. The store
    is not biased (it is the same kernel as without centring) and is left to test_triton_kernels."""
    from tests.test_triton_kernels import _assert_prefill_rows_and_no_spills, _compile_for_sm90

    code = ["from tests import codec_cases",
            f"for cid, sinks in {AOT_FORMATS!r}:",
            "    for d in (64, 128):",
            "        fmt = codec_cases.case(cid).rope_fmt(d, 8, sinks=sinks)",
            "        assert fmt.key_rope is not None",
            "        for c in ac.compile_launches(ac.capture(fmt, 32)):",
            "            if c.name != '_store_kernel':",
            "                print(cid, sinks, d, c.describe())"]
    rows = _compile_for_sm90("\n".join(code) + "\n")
    assert {(r[0], r[1], r[2]) for r in rows} == {(c, str(s), str(d)) for c, s in AOT_FORMATS for d in (64, 128)}
    _assert_prefill_rows_and_no_spills(rows, 3)

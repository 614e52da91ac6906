"""The Triton attention with exact_self's ``exclude_self`` and ``lse`` against the reference, under the interpreter
on small shapes: the codec matrix, a calibrated format with sinks, rope-centred formats (score bias), decode
with split-K (a split emptied by the exclusion), prefill and chunked prefill tiles, GQA, rows at position 0
(nothing to attend: output 0, lse -inf) and ``ops.paged_attention``'s merge of the exact own term.

Outputs follow the kernel tests' rule (at most twice the error of a bf16 PyTorch run over the dequantized K/V;
1e-4 for float32 queries). lse: 1e-3 for float32 queries; for 16-bit ones the same rule plus one bf16 step of
the largest lse (2^-8 of it): the kernel rounds its operands in the key codec's rotated, scaled basis, where
the products spread over every channel, so its scores carry more rounding than the bf16 run's (the outputs
barely feel it, an lse of 20 logits does). Each case also shows the check can see the exclusion: the
reference with the other mask misses the output bound.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
import vllm_kvq.kernels.triton as kt  # noqa: E402  (conftest switched the interpreter on without CUDA)

from tests import codec_cases  # noqa: E402
from tests.kernel_checks import lowp_attention  # noqa: E402
from vllm_kvq import codecs, key_centre, ops  # noqa: E402
from vllm_kvq.kv_format import KVFormat  # noqa: E402
from vllm_kvq.ops import reference  # noqa: E402
from vllm_kvq.testing import random_paged_batch, roundtrip  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CODECS = codec_cases.ids("triton")
TQ3 = codec_cases.case("turboquant3")


def _calibrated_sink(d: int = 64, hk: int = 2) -> KVFormat:
    """A calibrated format as the presets serve it: fixed key and value means, key channel scales, a sink."""
    g = torch.Generator().manual_seed(7)
    return KVFormat(d, [codecs.get("turboquant4", head_dim=d)] * hk, [codecs.get("turboquant3", head_dim=d)] * hk,
                    name="cal-sink", k_shift=torch.randn(hk, d, generator=g) * 3,
                    v_shift=torch.randn(hk, d, generator=g), k_scale=torch.rand(hk, d, generator=g) + 0.5,
                    sink_tokens=1, block_size=16)


def _inputs(fmt, hq, seq_lens, q_lens, gen, t, dtype):
    """(batch, K, V in the model's domain, cache, query, scale, key_bias or None) as ops hands them over."""
    d, hk = fmt.head_size, fmt.num_kv_heads
    batch = random_paged_batch(seq_lens, q_lens, t, generator=gen)
    pos = torch.cat([torch.arange(s) for s in batch.seq_lens.tolist()])
    centre = fmt.key_rope.centre(pos) if fmt.key_rope is not None else 0.0
    k = torch.randn(pos.numel(), hk, d, generator=gen)
    k[:, :, :2] *= 4  # outlier channels, as real keys have
    k = k + centre
    v = torch.randn(pos.numel(), hk, d, generator=gen)
    cache = fmt.allocate(batch.num_blocks, t, device=DEV)
    ops.store(k.to(DEV), v.to(DEV), cache, batch.ctx_slots.to(DEV), fmt, impl="reference",
              positions=pos.to(DEV) if fmt.key_rope is not None else None)
    q = (torch.randn(batch.num_tokens, hq, d, generator=gen) * 2).to(dtype)
    scale = d ** -0.5
    kb = None
    if fmt.key_rope is not None:
        chunks = batch.block_table.shape[1] * t  # positions the block table addresses
        kb = (fmt.key_rope.bias_query(q.to(DEV), scale), fmt.key_rope.table(chunks, DEV))
    return batch, k, v, cache, q, scale, kb


def _case(fmt, hq, seq_lens, q_lens, gen, *, exclude=True, with_lse=True, num_splits=None, dtype=torch.bfloat16,
          t=16):
    batch, k, v, cache, q, scale, kb = _inputs(fmt, hq, seq_lens, q_lens, gen, t, dtype)
    n = batch.num_tokens
    args = (cache, batch.block_table.to(DEV), batch.seq_lens.to(DEV), batch.query_start_loc.to(DEV), fmt)
    qf = q.float().to(DEV)
    ref_lse = torch.empty(n, hq, device=DEV)
    ref = reference.paged_attention(qf, *args, scale=scale, key_bias=kb, exclude_self=exclude, lse=ref_lse).cpu()
    ref_lse = ref_lse.cpu()
    lse = torch.full((n, hq), math.nan, device=DEV) if with_lse else None
    out = kt.paged_attention(q.to(DEV), *args, scale=scale, num_splits=num_splits, key_bias=kb,
                             exclude_self=exclude, lse=lse)
    assert out.dtype == dtype and out.shape == q.shape
    out = out.float().cpu()
    assert not out.isnan().any()

    # rows at position 0 see no key when excluding: output exactly 0, lse -inf (the reference agrees)
    empty = (batch.query_positions() == 0) & exclude
    assert torch.equal(torch.isneginf(ref_lse), empty[:, None].expand(n, hq))
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))

    if dtype == torch.float32:
        bound, lse_bound = 1e-4, 1e-3
    else:  # flash-attention's rule against a bf16 PyTorch run, its keys in the kernels' score convention
        pos = torch.cat([torch.arange(s) for s in batch.seq_lens.tolist()])
        centre = fmt.key_rope.centre(pos) if fmt.key_rope is not None else 0.0
        k_deq, v_deq = roundtrip(fmt, k - centre, v, batch.block_offsets())
        fixed = fmt.key_rope.fixed_mean("cpu") if fmt.key_rope is not None else fmt.k_shift
        k_deq = k_deq + centre - (0.0 if fixed is None else fixed)  # a fixed mean moves a row's scores alike
        lowp_lse = torch.empty(n, hq)
        lowp = lowp_attention(q.float(), k_deq, v_deq, batch, scale, dtype, exclude_self=exclude, lse=lowp_lse)
        bound = 2 * (lowp.float() - ref).abs().max().item() + 1e-5
        seen = ~empty
        lse_bound = (2 * (lowp_lse[seen] - ref_lse[seen]).abs().max().item()
                     + 2 ** -8 * ref_lse[seen].abs().max().item() + 1e-3)
    err = (out - ref).abs().max().item()
    assert err <= bound, f"kernel error {err} > {bound}"
    if with_lse:
        lse = lse.cpu()
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)) and not lse.isnan().any()
        lse_err = (lse[~empty] - ref_lse[~empty]).abs().max().item()
        assert lse_err <= lse_bound, f"lse error {lse_err} > {lse_bound}"
    # the bound is tight enough to see the mask: the reference with the other one misses it
    other = reference.paged_attention(qf, *args, scale=scale, key_bias=kb, exclude_self=not exclude).cpu()
    miss = (other - ref)[~empty].abs().max().item()
    assert miss > 2 * bound, f"the check cannot see the row's own key: {miss}"


# A decode step of a 1-token sequence (empty when excluding), a whole prefill from position 0, a chunked prefill,
# a decode at a block boundary, a sequence with no new tokens.
MIXED = ([9, 7, 41, 1, 16, 5], [1, 7, 6, 1, 1, 0])
# split-K over 2 splits of 32-token tiles: at 33 tokens the second split holds only the row's own position; at 2
# tokens the row's own key is half of what it sees (the check against the other mask needs such a row)
DECODE = ([33, 50, 1, 16, 2], [1, 1, 1, 1, 1])


@pytest.mark.parametrize("cid", list(CODECS))
def test_codecs_mixed_batch(cid, gen):
    _case(codec_cases.case(cid).fmt(64, 2), 6, *MIXED, gen)


@pytest.mark.parametrize("with_lse", [False, True], ids=["no-lse", "lse"])
@pytest.mark.parametrize("exclude", [False, True], ids=["all", "exclude-self"])
def test_flags_are_independent(exclude, with_lse, gen):
    _case(TQ3.fmt(64, 2), 6, *MIXED, gen, exclude=exclude, with_lse=with_lse)
    _case(TQ3.fmt(64, 2), 6, *DECODE, gen, exclude=exclude, with_lse=with_lse, num_splits=2)


@pytest.mark.parametrize("cid", ["turboquant3", "uniform4+shift+scale", "fibquant2", "bf16"])
def test_decode_split_k(cid, gen):
    """The merge kernel writes the merged lse; a split emptied by the exclusion weighs nothing."""
    _case(codec_cases.case(cid).fmt(64, 2), 6, *DECODE, gen, num_splits=2)
    _case(codec_cases.case(cid).fmt(64, 2), 6, *DECODE, gen, num_splits=4)


def test_decode_unsplit(gen):
    _case(TQ3.fmt(64, 2), 6, *DECODE, gen, num_splits=1)


def test_calibrated_sink(gen):
    fmt = _calibrated_sink()
    _case(fmt, 6, *MIXED, gen)
    _case(fmt, 6, *DECODE, gen, num_splits=2)
    _case(fmt, 6, [37, 50, 9], [3, 4, 2], gen, num_splits=2)  # short queries split (prefill tiles + merge)


@pytest.mark.parametrize("sinks", [0, 2], ids=["no-sink", "sink"])
def test_rope_centred(sinks, gen):
    fmt = TQ3.rope_fmt(64, 2, sinks=sinks)
    _case(fmt, 6, *MIXED, gen)
    _case(fmt, 6, *DECODE, gen, num_splits=2)


def test_rope_centred_partial_rotary_and_fibquant(gen):
    _case(TQ3.rope_fmt(64, 2, rot=32), 6, *MIXED, gen)
    _case(codec_cases.case("fibquant2").rope_fmt(64, 2), 6, *MIXED, gen)


def test_head_size_128_prefill_tiles(gen):
    """At head size 128 the score bias with exact_self takes 64-row prefill tiles (128 rows sit at the register
    limit on sm_90); without the bias it keeps 128."""
    from vllm_kvq.kernels.triton.attention import launch_config

    assert launch_config(128, 2, decode=False, biased_excl=True).bm == 64
    assert launch_config(128, 2, decode=False).bm == 128
    assert launch_config(64, 2, decode=False, biased_excl=True).bm == 128
    _case(TQ3.rope_fmt(128, 1), 2, [40, 9], [33, 1], gen, t=8)
    _case(codec_cases.case("turboquant4").fmt(128, 1), 2, [40, 9], [33, 1], gen, t=8)


@pytest.mark.parametrize("hq,hk", [(6, 2), (8, 2), (8, 1)], ids=["g3", "g4", "g8"])
def test_chunked_prefill_spans_tiles_gqa(hq, hk, gen):
    """Query rows over several prefill tiles (32 tokens of a group of 4, 16 of 8), one from position 0."""
    _case(TQ3.fmt(64, hk), hq, [70, 45, 20], [50, 45, 3], gen)


def test_float32_queries_match_tightly(gen):
    """Outputs within 1e-4 and lse within 1e-3 of the reference, bound state, sinks and score bias included."""
    _case(TQ3.fmt(64, 2), 4, *MIXED, gen, dtype=torch.float32)
    _case(_calibrated_sink(), 4, *MIXED, gen, dtype=torch.float32)
    _case(_calibrated_sink(), 4, [37, 50, 9], [3, 4, 2], gen, dtype=torch.float32, num_splits=2)
    _case(TQ3.rope_fmt(64, 2, sinks=2), 4, *DECODE, gen, dtype=torch.float32, num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_rows_with_nothing_to_attend(num_splits, gen):
    """Only rows at position 0 (one-token sequences, N == S): output 0 although the value codec adds a shift,
    lse -inf, no NaN in any split or in the merge."""
    fmt = _calibrated_sink()
    batch, _, _, cache, q, scale, _ = _inputs(fmt, 4, [1, 1, 1], [1, 1, 1], gen, 16, torch.bfloat16)
    lse = torch.zeros(3, 4, device=DEV)
    out = kt.paged_attention(q.to(DEV), cache, batch.block_table.to(DEV), batch.seq_lens.to(DEV),
                             batch.query_start_loc.to(DEV), fmt, scale=scale, num_splits=num_splits,
                             exclude_self=True, lse=lse)
    assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
    assert torch.isneginf(lse).all()
    assert fmt.v_shift is not None and fmt.v_shift.abs().max() > 0.1  # what an unmasked store would have added


def test_lse_is_validated(gen):
    fmt = TQ3.fmt(64, 2)
    batch, _, _, cache, q, scale, _ = _inputs(fmt, 4, [20], [1], gen, 16, torch.float32)
    args = (q.to(DEV), cache, batch.block_table.to(DEV), batch.seq_lens.to(DEV), batch.query_start_loc.to(DEV), fmt)
    for bad in (torch.empty(1, 4, dtype=torch.float16, device=DEV), torch.empty(4, device=DEV)):
        with pytest.raises(ValueError, match=r"lse: expected float32 \(1, 4\)"):
            kt.paged_attention(*args, scale=scale, exclude_self=True, lse=bad)


@pytest.mark.parametrize("name", ["tq3", "calibrated-sink", "rope-centred"])
def test_ops_merge_equals_the_references(name, gen):
    """ops.paged_attention of an exact_self format on Triton == on the reference (the same merge of the exact
    own term over each implementation's exclusion and lse), and dispatch on a GPU picks Triton for it."""
    base = {"tq3": lambda: TQ3.fmt(64, 2), "calibrated-sink": _calibrated_sink,
            "rope-centred": lambda: TQ3.rope_fmt(64, 2, sinks=1)}[name]()
    fmt = base.with_block_size(base.block_size or 16)
    fmt.exact_self = True
    plan = ops.plan(fmt, "cuda", decode=False, group=3)
    assert plan["triton"] is None and next(n for n, why in plan.items() if why is None) == "triton", plan
    batch, k, v, cache, q, scale, _ = _inputs(fmt, 6, *MIXED, gen, 16, torch.float32)
    idx = batch.new_token_index()
    args = (q.to(DEV), cache, batch.block_table.to(DEV), batch.seq_lens.to(DEV), batch.query_start_loc.to(DEV), fmt)
    self_kv = (k[idx].to(DEV), v[idx].to(DEV))
    got = ops.paged_attention(*args, scale=scale, impl="triton", self_kv=self_kv).cpu()
    want = ops.paged_attention(*args, scale=scale, impl="reference", self_kv=self_kv).cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the exact own token is in: without it (every row from the cache) the outputs differ visibly
    plain = ops.paged_attention(*args[:-1], base, scale=scale, impl="reference").cpu()
    assert (got - plain).abs().max() > 1e-2
    with pytest.raises(ValueError, match="self_kv"):
        ops.paged_attention(*args, scale=scale, impl="triton")


def test_aot_capture_takes_the_exact_self_variants():
    """aot_check compiles what an exact_self format runs (its launches carry EXCL and LSE); others stay off."""
    from vllm_kvq.kernels.triton import aot_check

    fmt = TQ3.rope_fmt(64, 2)
    for exact in (False, True):
        fmt.exact_self = exact
        attn = [l for l in aot_check.capture(fmt, 4) if l.kernel.fn.__name__ != "_store_kernel"]
        assert {l.kernel.fn.__name__ for l in attn} == {"_attn_kernel", "_merge_kernel"}
        assert all(l.kwargs["EXCL"] is exact and l.kwargs["LSE"] is exact for l in attn)


# (codec case, rope-centred, sink tokens): the calibrated presets' codecs with and without the score bias.
AOT_FORMATS = (("turboquant3", True, 0), ("turboquant3", True, 4), ("turboquant2.5", True, 0),
               ("fibquant2", True, 0), ("turboquant3+shift+scale", False, 0), ("turboquant3", False, 4))


@pytest.mark.slow
def test_exact_self_kernels_compile_for_sm90_without_spills():
    """Every attention variant (decode, split-K and its merge, short-query split, prefill) of exact_self formats
    compiles for sm_90 without register spills at head sizes 64 and 128, and prefill tiles keep >= 64 rows."""
    from tests.test_triton_kernels import _assert_prefill_rows_and_no_spills, _compile_for_sm90

    code = ["from tests import codec_cases",
            f"for cid, rope, sinks in {AOT_FORMATS!r}:",
            "    case = codec_cases.case(cid)",
            "    for d in (64, 128):",
            "        if rope:",
            "            fmt = case.rope_fmt(d, 8, sinks=sinks)",
            "        else:",
            "            cs = [case.build(d, h) for h in range(8)]",
            "            fmt = KVFormat(d, cs, cs, name=cid, sink_tokens=sinks, block_size=16)",
            "        fmt.exact_self = True",
            "        for c in ac.compile_launches(ac.capture(fmt, 32)):",
            "            if c.name != '_store_kernel':",
            "                print(cid, rope, sinks, d, c.describe())"]
    rows = _compile_for_sm90("\n".join(code) + "\n")
    assert {tuple(r[:4]) for r in rows} == {(c, str(r), str(s), str(d)) for c, r, s in AOT_FORMATS for d in (64, 128)}
    assert {"_attn_kernel", "_merge_kernel"} <= {r[4] for r in rows}
    _assert_prefill_rows_and_no_spills(rows, 4)

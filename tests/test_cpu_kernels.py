"""The native CPU kernels (csrc/cpu, ``vllm_kvq.kernels.cpu``) against the reference ops, for every registered
codec, mixed per-head formats and calibrated formats, in both ISA builds (AVX-512 where the CPU has it, and
the portable one).

Store must give the reference's bytes; where a rotation's summation order differs (dense Haar matrices,
the fp32 norm) a code may flip only if its rotated value sits on a threshold tie. Attention follows
flash-attention's rule: its error against the float32 reference is at most twice that of a bf16 PyTorch
run over the same dequantized K/V; with float32 queries it must match the reference to 1e-4.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from tests import codec_cases
from tests.kernel_checks import cache as _cache
from tests.kernel_checks import check_cache, lowp_attention
from vllm_kvq import codecs, ops
from vllm_kvq.kernels import cpu as kc
from vllm_kvq.kv_format import KVFormat, kv_format
from vllm_kvq.ops import reference
from vllm_kvq.testing import random_paged_batch, roundtrip


def test_extension_is_built_on_x86():
    """setup.py builds the extension by default on x86-64 CPU torch; a silent fallback would hide a broken build."""
    if platform.machine() != "x86_64" or torch.version.cuda or os.environ.get("VLLM_KVQ_BUILD_CPU") == "0":
        pytest.skip("the CPU extension is built only on x86-64 with CPU torch")
    assert kc.available(), kc.why_not(KVFormat(64, [codecs.get("bf16", head_dim=64)], [codecs.get("bf16", head_dim=64)]))


pytestmark = pytest.mark.skipif(not kc.available(), reason="vllm_kvq._C_cpu is not built")

ISAS = [pytest.param("avx512", marks=pytest.mark.skipif(not kc.available() or kc.best_isa() != "avx512",
                                                        reason="no AVX-512")),
        pytest.param("avx2", marks=pytest.mark.skipif(not kc.available() or not kc.has_isa("avx2"),
                                                      reason="no AVX2/FMA/F16C")), "portable"]

def test_isa_knob_sets_the_default(monkeypatch):
    """VLLM_KVQ_CPU_ISA (read once) makes isa="best" run another build, e.g. AVX2's inside an engine on an
    AVX-512 machine; a name that is not an ISA is refused with the allowed ones."""
    for value, want in (("portable", kc.ISAS["portable"]), ("", kc.ISAS["best"])):
        monkeypatch.setenv("VLLM_KVQ_CPU_ISA", value)
        kc._default_isa.cache_clear()
        assert kc._isa("best") == want and kc._isa("avx2") == kc.ISAS["avx2"]
    monkeypatch.setenv("VLLM_KVQ_CPU_ISA", "sse9")
    kc._default_isa.cache_clear()
    with pytest.raises(ValueError, match="VLLM_KVQ_CPU_ISA='sse9'.*allowed: best, portable, avx512, avx2"):
        kc._isa("best")
    monkeypatch.delenv("VLLM_KVQ_CPU_ISA")
    kc._default_isa.cache_clear()


# The shared matrix (tests/codec_cases.py): every case the CPU kernels must run, state-bound ones included.
CODECS = codec_cases.ids("cpu")


def make_codec(cid: str, d: int):
    return codec_cases.case(cid).build(d)


def uniform_fmt(cid: str, d: int, hk: int, **kw) -> KVFormat:
    if kw or not codec_cases.case(cid).state:
        c = make_codec(cid, d)
        return KVFormat(d, [c] * hk, [c] * hk, name=cid, **kw)
    return codec_cases.case(cid).fmt(d, hk)


def mixed_fmt(d: int) -> KVFormat:
    """Three head groups with different codecs and slot sizes (padding in the smaller slots)."""
    g = lambda n, **p: codecs.get(n, head_dim=d, **p)  # noqa: E731
    return KVFormat(d, [g("turboquant3"), g("bf16"), g("uniform4")],
                    [g("turboquant3"), g("bf16"), g("turboquant2.5")], name="mixed")


def yaml_fmt(d: int) -> KVFormat:
    return kv_format("kvq-mixed-example", head_size=d, num_kv_heads=3, layer=2, num_layers=6)


def calibrated_fmt(cid: str, d: int, hk: int, gen) -> KVFormat:
    return uniform_fmt(cid, d, hk, k_shift=torch.randn(hk, d, generator=gen), v_shift=torch.randn(hk, d, generator=gen),
                       k_scale=torch.rand(hk, d, generator=gen) * 1.5 + 0.25)


# ---------------------------------------------------------------------------------------------- store


def _store_case(fmt, n, blocks, t, layout, gen, isa, dtype=torch.bfloat16, scale=1.0):
    d, hk = fmt.head_size, fmt.num_kv_heads
    k = (torch.randn(n, hk, d, generator=gen) * scale).to(dtype)
    v = torch.randn(n, hk, d, generator=gen).to(dtype)
    k[0, 0] = 0.0  # an all-zero vector: norm 0 and a zero uniform range
    slots = torch.randperm(blocks * t, generator=gen)[:n]
    slots[torch.randperm(n, generator=gen)[: max(1, n // 5)]] = -1
    got, want = _cache(fmt, blocks, t, layout), _cache(fmt, blocks, t, layout)
    got.fill_(7)
    want.fill_(7)
    reference.store(k, v, want, slots, fmt)
    kc.store(k, v, got, slots, fmt, isa=isa)
    check_cache(fmt, k.float(), v.float(), slots, got, want)  # applies each codec's state transform


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", list(CODECS))
def test_store_matches_reference(cid, isa, gen):
    _store_case(uniform_fmt(cid, 64, 2), 41, 4, 16, "contiguous", gen, isa, scale=8.0)


@pytest.mark.parametrize("d,cid", [(128, "turboquant3"), (128, "turboquant2.5"), (128, "uniform4"),
                                   (80, "turboquant3.5"), (96, "turboquant4"), (32, "turboquant2")])
def test_store_head_dims(d, cid, gen):
    _store_case(uniform_fmt(cid, d, 2), 23, 2, 16, "contiguous", gen, "best")


@pytest.mark.parametrize("layout", ["token-major", "byte-stride-2"])
@pytest.mark.parametrize("fmt_fn", [mixed_fmt, yaml_fmt], ids=["mixed", "yaml"])
def test_store_mixed_formats_and_strides(fmt_fn, layout, gen):
    _store_case(fmt_fn(64), 19, 3, 16, layout, gen, "best", dtype=torch.float32)


@pytest.mark.parametrize("cid", ["turboquant3", "turboquant2.5", "uniform4", "bf16"])
def test_store_calibrated(cid, gen):
    _store_case(calibrated_fmt(cid, 64, 2, gen), 19, 3, 16, "contiguous", gen, "best")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_store_input_dtypes(dtype, gen):
    _store_case(mixed_fmt(64), 19, 3, 16, "contiguous", gen, "best", dtype=dtype)


def test_store_empty_and_all_padding():
    fmt = uniform_fmt("turboquant3", 64, 2)
    cache = fmt.allocate(2, 16)
    kc.store(torch.zeros(0, 2, 64), torch.zeros(0, 2, 64), cache, torch.zeros(0, dtype=torch.long), fmt)
    kc.store(torch.randn(5, 2, 64), torch.randn(5, 2, 64), cache, torch.full((5,), -1, dtype=torch.int32), fmt)
    assert not cache.any()


# ------------------------------------------------------------------------------------------ attention


def _attn_case(fmt, hq, seq_lens, q_lens, gen, *, isa="best", t=16, layout="contiguous", num_splits=None,
               dtype=torch.bfloat16) -> torch.Tensor:
    d, hk = fmt.head_size, fmt.num_kv_heads
    batch = random_paged_batch(seq_lens, q_lens, t, generator=gen)
    total = int(batch.seq_lens.sum())
    k_ctx = torch.randn(total, hk, d, generator=gen)
    k_ctx[:, :, :2] *= 4  # outlier channels, as real keys have
    v_ctx = torch.randn(total, hk, d, generator=gen)
    # Position-aware key centring: keys carry the mean turned to their position; the cache holds them minus
    # that mean (as ops.store writes them).
    centre = 0
    if fmt.key_rope is not None:
        centre = fmt.key_rope.centre(torch.cat([torch.arange(s) for s in batch.seq_lens.tolist()]))
        k_ctx = k_ctx + centre
    cache = _cache(fmt, batch.num_blocks, t, layout)
    reference.store(k_ctx - centre, v_ctx, cache, batch.ctx_slots, fmt)
    q = torch.randn(batch.num_tokens, hq, d, generator=gen) * 2
    scale = d ** -0.5
    args = (cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt)
    kb = _key_bias(fmt, q.to(dtype), scale, batch.block_table.shape[1] * t)
    ref = reference.paged_attention(q.to(dtype).float(), *args, scale=scale, key_bias=kb)
    out = kc.paged_attention(q.to(dtype), *args, scale=scale, num_splits=num_splits, isa=isa,
                             key_bias=None if kb is None else (_strided(kb[0]), kb[1]))
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.float() - ref).abs().max().item()
    allowed = 1e-4
    if dtype != torch.float32:
        # What the cache gives back in the input's domain (bound state undone, sink records where a format
        # keeps them, the turned key mean added back): dense attention over it is the reference's math (a key
        # shift only moves a query's scores by a constant), so the bf16 run measures bf16 rounding alone.
        k_deq, v_deq = roundtrip(fmt, k_ctx - centre, v_ctx, batch.block_offsets() if fmt.sink_tokens else None)
        lowp = lowp_attention(q.to(dtype).float(), k_deq + centre, v_deq, batch, scale, dtype).float()
        allowed = 2 * (lowp - ref).abs().max().item() + 1e-5
    if kb is not None and dtype != torch.float32:
        # The check can fail: without the bias, or with it one chunk off, the output moves well past what is
        # allowed (float32 allows 1e-4: no doubt there).
        for wrong in (None, (kb[0], kb[1][1:])):
            moved = (reference.paged_attention(q.to(dtype).float(), *args, scale=scale, key_bias=wrong) - ref)
            assert moved.abs().max().item() > 3 * allowed, (wrong is None, moved.abs().max().item(), allowed)
    assert err <= allowed, f"kernel error {err} > {allowed} allowed"
    return out


def _key_bias(fmt: KVFormat, q: torch.Tensor, scale: float, positions: int):
    """The ``key_bias`` ops.paged_attention hands the kernels for a key-centring format, else None."""
    if fmt.key_rope is None:
        return None
    return fmt.key_rope.bias_query(q, scale), fmt.key_rope.table(positions, "cpu")


def _strided(x: torch.Tensor) -> torch.Tensor:
    """x (N, H, D) as a view whose rows and heads are not packed: the kernels must follow strides."""
    out = torch.full((*x.shape[:-1], x.shape[-1] + 16), float("nan"))[..., :x.shape[-1]]
    out.copy_(x)
    return out


DECODE = ([37, 50, 1, 16], [1, 1, 1, 1])
# prefill, chunked prefill, decodes at odd and block-boundary lengths, a sequence with no new tokens
MIXED = ([9, 7, 41, 32, 5, 90], [1, 7, 6, 1, 0, 70])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", list(CODECS))
def test_attention_decode_and_mixed_batch(cid, isa, gen):
    _attn_case(uniform_fmt(cid, 64, 2), 6, *DECODE, gen, isa=isa)
    _attn_case(uniform_fmt(cid, 64, 2), 6, *MIXED, gen, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", ["turboquant3", "turboquant2.5", "uniform-g32-rot-2b", "bf16"])
def test_attention_decode_split_context(cid, isa, gen):
    _attn_case(uniform_fmt(cid, 64, 2), 6, *DECODE, gen, isa=isa, num_splits=3)
    _attn_case(uniform_fmt(cid, 64, 2), 6, [1500, 700, 33], [1, 1, 1], gen, isa=isa)  # automatic splits


@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 1), (9, 3), (16, 2)])
def test_attention_gqa_ratios(hq, hk, gen):
    _attn_case(uniform_fmt("turboquant3", 64, hk), hq, *MIXED, gen)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d,cid", [(32, "turboquant4"), (128, "turboquant3"), (128, "turboquant3.5"), (128, "uniform4"),
                                   (80, "turboquant3.5"), (96, "turboquant4"), (80, "bf16")])
def test_attention_head_dims(d, cid, isa, gen):
    _attn_case(uniform_fmt(cid, d, 2), 4, [20, 9, 70, 45], [1, 4, 1, 40], gen, isa=isa, t=8)


@pytest.mark.parametrize("layout", ["token-major", "byte-stride-2"])
@pytest.mark.parametrize("fmt_fn", [mixed_fmt, yaml_fmt], ids=["mixed", "yaml"])
def test_attention_mixed_formats_and_strides(fmt_fn, layout, gen):
    _attn_case(fmt_fn(64), 6, *MIXED, gen, layout=layout)
    _attn_case(fmt_fn(64), 6, *DECODE, gen, layout=layout, num_splits=2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", ["turboquant3", "uniform4", "fp16", "tq3-haar"])
def test_attention_float32_queries_match_tightly(cid, isa, gen):
    _attn_case(uniform_fmt(cid, 64, 2), 4, *MIXED, gen, dtype=torch.float32, isa=isa)
    _attn_case(uniform_fmt(cid, 64, 2), 4, *DECODE, gen, dtype=torch.float32, num_splits=2, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", ["turboquant3", "turboquant2.5", "uniform-g32-rot-2b", "tq3-haar", "bf16"])
def test_attention_dense_prefill_path(cid, isa, gen, monkeypatch):
    """The opt-in long-prefill path (decoded context + SDPA): chunks of >= 32 query tokens take it."""
    monkeypatch.setattr(kc, "DENSE_PREFILL_FROM", 32)
    _attn_case(uniform_fmt(cid, 64, 2), 6, *MIXED, gen, isa=isa)  # the 70-token chunked prefill
    _attn_case(uniform_fmt(cid, 64, 2), 6, *MIXED, gen, isa=isa, dtype=torch.float32)
    _attn_case(calibrated_fmt(cid, 64, 2, gen), 6, [45, 80], [45, 33], gen, isa=isa)


def test_attention_fp16_queries(gen):
    _attn_case(uniform_fmt("turboquant3", 64, 2), 6, *MIXED, gen, dtype=torch.float16)


@pytest.mark.parametrize("cid", ["turboquant3", "turboquant2.5", "uniform4", "bf16"])
def test_attention_calibrated(cid, gen):
    _attn_case(calibrated_fmt(cid, 64, 2, gen), 6, *MIXED, gen)
    _attn_case(calibrated_fmt(cid, 64, 2, gen), 6, *DECODE, gen, dtype=torch.float32, num_splits=2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", codec_cases.ids("cpu", stateful=True))
def test_attention_state_bound_codecs_float32(cid, isa, gen):
    """Every state the matrix binds (key shift and scale, value shift and scale) to 1e-4 of the reference."""
    _attn_case(uniform_fmt(cid, 64, 2), 6, *MIXED, gen, dtype=torch.float32, isa=isa)
    _attn_case(uniform_fmt(cid, 64, 2), 6, *DECODE, gen, dtype=torch.float32, num_splits=2, isa=isa)


# -------------------------------------------------------------------------------- FibQuant lookup tables

FIB = [c for c in CODECS if codec_cases.case(c).name.startswith("fib")]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", FIB)
def test_attention_fibquant_lookup_tables(cid, isa, gen, monkeypatch):
    """Decode through the per-query codeword tables and value histograms (forced on for short contexts),
    split contexts included; codebooks over 1024 words take the tile path either way."""
    monkeypatch.setattr(kc, "FIB_LUT_FROM", 0)
    _attn_case(uniform_fmt(cid, 64, 2), 6, *DECODE, gen, isa=isa)
    _attn_case(uniform_fmt(cid, 64, 2), 6, *DECODE, gen, isa=isa, dtype=torch.float32, num_splits=3)
    _attn_case(uniform_fmt(cid, 128, 1), 8, *MIXED, gen, isa=isa, dtype=torch.float32)


def test_fibquant_lookup_tables_run(gen, monkeypatch):
    """The table path is taken: its summation order differs from the tile path's in the last bits (and the
    default threshold takes it for long decode contexts)."""
    fmt = uniform_fmt("fibquant2+shift+scale", 64, 2)
    outs = []
    for lut in (None, 0, 256):
        monkeypatch.setattr(kc, "FIB_LUT_FROM", lut)
        outs.append(_attn_case(fmt, 6, [700, 300], [1, 1], torch.Generator().manual_seed(5), dtype=torch.float32))
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])


# ---------------------------------------------------------------------------------------------- sinks


def sink_fmt(cid: str, d: int, hk: int, sinks: int, t: int) -> KVFormat:
    case = codec_cases.case(cid)
    cs = [case.build(d, h) for h in range(hk)]
    return KVFormat(d, cs, cs, name=f"{cid}+sink{sinks}", sink_tokens=sinks, block_size=t)


SINK_CODECS = ["turboquant3", "fibquant2", "uniform4+shift+scale", "turboquant3+shift+scale", "bf16", "tq3-haar"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("cid", SINK_CODECS)
def test_store_sink_records(cid, d, isa, gen):
    """Slots and the blocks' sink areas as the reference writes them (padding slots -1 skipped), in any
    cache layout; the area's other records survive a token's store."""
    _store_case(sink_fmt(cid, d, 2, 3, 16), 41, 4, 16, "contiguous", gen, isa, scale=8.0)
    _store_case(sink_fmt(cid, d, 2, 1, 8), 19, 5, 8, "byte-stride-2", gen, isa)


def test_store_sinks_in_chunks_gives_one_store(gen):
    """Chunked prefill then decode steps write a block's bytes exactly as one store does (a prefix-cache hit
    reads what a cold run wrote)."""
    fmt = sink_fmt("turboquant3+shift+scale", 64, 2, 2, 16)
    slots = torch.arange(40) + 16 * 3
    k, v = torch.randn(40, 2, 64, generator=gen), torch.randn(40, 2, 64, generator=gen)
    one, parts = fmt.allocate(8, 16), fmt.allocate(8, 16)
    kc.store(k, v, one, slots, fmt)
    for a, b in ((0, 7), (7, 30), (30, 31), (31, 40)):
        kc.store(k[a:b], v[a:b], parts, slots[a:b], fmt)
    assert torch.equal(one, parts)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("cid", SINK_CODECS)
def test_attention_sink_records(cid, d, isa, gen, monkeypatch):
    """Positions p with p % T < S read the bf16 records: GQA, partial blocks, chunked prefill, split decode;
    FibQuant's lookup-table path too."""
    monkeypatch.setattr(kc, "FIB_LUT_FROM", 0)
    _attn_case(sink_fmt(cid, d, 2, 2, 16), 6, *MIXED, gen, isa=isa)
    _attn_case(sink_fmt(cid, d, 2, 3, 16), 6, *DECODE, gen, isa=isa, dtype=torch.float32, num_splits=2)
    _attn_case(sink_fmt(cid, d, 1, 1, 8), 8, *MIXED, gen, isa=isa, dtype=torch.float32, t=8, layout="token-major")


@pytest.mark.parametrize("cid", ["turboquant3", "fibquant2+shift+scale"])
def test_attention_sinks_dense_prefill_path(cid, gen, monkeypatch):
    monkeypatch.setattr(kc, "DENSE_PREFILL_FROM", 32)
    _attn_case(sink_fmt(cid, 64, 2, 2, 16), 6, *MIXED, gen)
    _attn_case(sink_fmt(cid, 64, 2, 2, 16), 6, [45, 80], [45, 33], gen, dtype=torch.float32)


def _check_chunked_and_prefix_hit_equal_cold(fmt, hq, n, chunks, hit_blocks, gen, isa="best", t=16):
    """One cold prefill of n tokens against: the same prompt in chunks (each chunk stores its tokens, then
    attends), and a prefix-cache hit (the first hit_blocks blocks from the cold run, the rest recomputed).
    Every query row must give the cold run's output bit for bit: vLLM's "prefix-cache hit == cold run" and
    "chunked == one chunk" hold only if a row's result does not depend on which rows share its call."""
    hk, d = fmt.num_kv_heads, fmt.head_size
    k, v = torch.randn(n, hk, d, generator=gen), torch.randn(n, hk, d, generator=gen)
    q = torch.randn(n, hq, d, generator=gen).to(torch.bfloat16)
    nb = (n + t - 1) // t
    bt = torch.randperm(nb + 2, generator=gen)[:nb].to(torch.int32)[None]
    slots = bt[0, torch.arange(n) // t].long() * t + torch.arange(n) % t
    if fmt.key_rope is not None:  # the keys ops.store hands the kernels: minus their chunk's turned mean
        k = k - fmt.key_rope.centre(torch.arange(n))
    kb = _key_bias(fmt, q, 0.125, nb * t)

    def run(cache, a, b):
        kc.store(k[a:b], v[a:b], cache, slots[a:b], fmt, isa=isa)
        return kc.paged_attention(q[a:b], cache, bt, torch.tensor([b], dtype=torch.int32),
                                  torch.tensor([0, b - a], dtype=torch.int32), fmt, scale=0.125, isa=isa,
                                  key_bias=None if kb is None else (kb[0][a:b], kb[1]))

    cold_cache = fmt.allocate(nb + 2, t)
    cold = run(cold_cache, 0, n)
    if kb is not None:  # the bias itself (identical bits alone would not catch a consistently wrong chunk)
        args = (cold_cache, bt, torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32), fmt)
        ref = reference.paged_attention(q.float(), *args, scale=0.125, key_bias=kb)
        err = (kc.paged_attention(q.float(), *args, scale=0.125, isa=isa, key_bias=kb) - ref).abs().max().item()
        assert err <= 1e-4, f"the float32 cold run differs from the reference by {err}"
    chunked_cache = fmt.allocate(nb + 2, t)
    edges = [0, *chunks, n]
    chunked = torch.cat([run(chunked_cache, a, b) for a, b in zip(edges, edges[1:])])
    assert torch.equal(chunked_cache, cold_cache)
    assert torch.equal(chunked, cold), (chunked.float() - cold.float()).abs().max()
    hit_cache = fmt.allocate(nb + 2, t)
    hit_cache[:, :, :, :] = 0
    hit_cache[bt[0, :hit_blocks].long()] = cold_cache[bt[0, :hit_blocks].long()]
    assert torch.equal(run(hit_cache, hit_blocks * t, n), cold[hit_blocks * t:])


@pytest.mark.parametrize("cid", ["turboquant3", "fibquant2"])
def test_sinks_chunked_prefill_and_prefix_hit_equal_cold_run(cid, gen):
    _check_chunked_and_prefix_hit_equal_cold(sink_fmt(cid, 64, 2, 2, 16), 6, 50, (20, 37), 2, gen)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", list(CODECS))
def test_chunked_prefill_and_prefix_hit_equal_cold_run(cid, isa, gen):
    # 3 and 4 query heads per KV head (SmolLM2's ratio, and one that fills lanes evenly); chunks of 2 and odd
    # sizes put a row in a different lane and a different item of the kernel than the cold run. No chunk of
    # one token: that is a decode call, whose kernel sums in another order (and splits long contexts).
    _check_chunked_and_prefix_hit_equal_cold(uniform_fmt(cid, 64, 3), 9, 150, (2, 33, 64, 101, 130), 5, gen,
                                             isa=isa)
    _check_chunked_and_prefix_hit_equal_cold(uniform_fmt(cid, 64, 2), 8, 90, (7, 40, 42, 75), 3, gen, isa=isa)


def test_chunked_prefill_equals_cold_run_head_dim_128(gen):
    _check_chunked_and_prefix_hit_equal_cold(uniform_fmt("turboquant4", 128, 1), 8, 100, (17, 50), 4, gen)


# ------------------------------------------------------------------------ position-aware key centring


def rope_fmt(cid: str, d: int, hk: int, **kw) -> KVFormat:
    """The matrix case ``cid`` calibrated with position-aware key centring (tests/codec_cases.py)."""
    return codec_cases.case(cid).rope_fmt(d, hk, **kw)


# A representative subset runs in the AVX2 and portable builds; the CPU's best build runs every codec of the
# matrix (AVX-512 here).
ROPE_CODECS = ["turboquant2.5", "turboquant3", "turboquant3.5", "turboquant4", "fibquant2", "fibquant1.5", "uniform4",
               "bf16"]
# rope_fmt binds the calibration to each case's plain codec: the cases with state of their own would repeat others
ROPE_MATRIX = codec_cases.ids("cpu", stateful=False)


@pytest.mark.parametrize("isa,cid", [*[pytest.param(ISAS[1].values[0], c, marks=ISAS[1].marks) for c in ROPE_CODECS],
                                     *[("portable", c) for c in ROPE_CODECS], *[("best", c) for c in ROPE_MATRIX]])
def test_key_bias_decode_mixed_and_split(cid, isa, gen, monkeypatch):
    """Position-aware key centring: a mixed batch (prefill, chunked prefill, decodes: the lane-major prefill
    kernel and the per-row kernel), split-K decode, FibQuant's lookup-table decode."""
    fmt = rope_fmt(cid, 64, 2)
    _attn_case(fmt, 6, *MIXED, gen, isa=isa)
    _attn_case(fmt, 6, [300, 50, 130], [1, 1, 1], gen, isa=isa, dtype=torch.float32, num_splits=3)
    monkeypatch.setattr(kc, "FIB_LUT_FROM", 0)  # FibQuant decode through the lookup tables
    _attn_case(fmt, 6, *DECODE, gen, isa=isa, dtype=torch.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d", [20, 36])
@pytest.mark.parametrize("cid", ["turboquant3", "turboquant2.5", "turboquant3.5", "uniform4", "bf16", "fibquant2",
                                 "fibquant3"])
def test_attention_head_sizes_off_the_simd_width(cid, d, isa, gen, monkeypatch):
    """Head sizes and code segments that are not a multiple of 8 (the AVX2 tiles' width) or 16 (AVX-512's: its
    build hands them to AVX2's): the tile loops' scalar tails, decode and prefill, and the dense prefill path,
    whose context decode writes rows of stride D (not a multiple of 8 floats: no aligned stores). FibQuant at
    20 / 36 coordinates: 5 / 9 blocks of 4 and 10 / 18 of 2, so its tile decode's 8-index chunks leave tails."""
    _attn_case(uniform_fmt(cid, d, 2), 6, *MIXED, gen, isa=isa)
    _attn_case(uniform_fmt(cid, d, 2), 6, [300, 50, 130], [1, 1, 1], gen, isa=isa, dtype=torch.float32, num_splits=2)
    monkeypatch.setattr(kc, "DENSE_PREFILL_FROM", 32)
    _attn_case(uniform_fmt(cid, d, 2), 6, *MIXED, gen, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("d,rot", [(64, 64), (128, 128), (128, 64), (64, 32), (80, 80), (96, 48), (64, 26)],
                         ids=["d64", "d128", "d128-partial", "d64-partial", "d80", "d96-partial", "d64-13-pairs"])
# 40, 24 pairs; 13 pairs: tails in the AVX2 bias loops (8 pairs at a time, 4 of 26 terms at a time)
@pytest.mark.parametrize("cid", ["turboquant3", "fibquant2", "uniform4"])
def test_key_bias_head_sizes_partial_rotary_and_sinks(cid, d, rot, isa, gen, monkeypatch):
    """Head sizes 64 and 128, partial rotary, sink records (their scores take the bias too), split decode;
    SmolLM2's group of 3 query heads per KV head."""
    monkeypatch.setattr(kc, "FIB_LUT_FROM", 0)
    _attn_case(rope_fmt(cid, d, 3, rot=rot), 9, *MIXED, gen, isa=isa)
    sink = rope_fmt(cid, d, 2, rot=rot, sinks=2)
    _attn_case(sink, 6, *MIXED, gen, isa=isa, dtype=torch.float32)
    _attn_case(sink, 6, [300, 50, 130], [1, 1, 1], gen, isa=isa, dtype=torch.float32, num_splits=2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", ROPE_CODECS)
def test_key_bias_chunked_prefill_and_prefix_hit_equal_cold_run(cid, isa, gen):
    _check_chunked_and_prefix_hit_equal_cold(rope_fmt(cid, 64, 3), 9, 150, (2, 33, 64, 101, 130), 5, gen, isa=isa)
    _check_chunked_and_prefix_hit_equal_cold(rope_fmt(cid, 128, 2, rot=64, sinks=2), 8, 90, (7, 40, 42, 75), 3,
                                             gen, isa=isa)


@pytest.mark.parametrize("cid", ["turboquant3", "fibquant2", "bf16"])
def test_key_bias_dense_prefill_path(cid, gen, monkeypatch):
    monkeypatch.setattr(kc, "DENSE_PREFILL_FROM", 32)
    _attn_case(rope_fmt(cid, 64, 2), 6, *MIXED, gen)
    _attn_case(rope_fmt(cid, 64, 2, sinks=2), 6, [45, 80], [45, 33], gen, dtype=torch.float32)


def test_key_bias_dispatch_and_checks(gen):
    """ops runs these kernels for key-centring formats (they take key_bias); a direct call without the bias,
    or with a table too short for the context, is refused."""
    fmt = rope_fmt("turboquant3", 64, 2)
    assert ops.plan(fmt, "cpu") == {"cpu": None, "reference": None}
    batch = random_paged_batch([40, 20], [40, 1], 16, generator=gen)
    cache = fmt.allocate(batch.num_blocks, 16)
    pos = torch.cat([torch.arange(s) for s in batch.seq_lens.tolist()])
    ops.store(torch.randn(60, 2, 64, generator=gen), torch.randn(60, 2, 64, generator=gen), cache, batch.ctx_slots,
              fmt, positions=pos)
    q = torch.randn(41, 6, 64, generator=gen)
    args = (q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt)
    before = set(ops.used())
    got = ops.paged_attention(*args, scale=0.125)
    assert "paged_attention:cpu" in set(ops.used()) | before
    want = ops.paged_attention(*args, scale=0.125, impl="reference")
    assert (got - want).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="key_bias"):
        kc.paged_attention(*args, scale=0.125)
    kb = _key_bias(fmt, q, 0.125, 48)
    with pytest.raises(RuntimeError, match="key-centring table's 20 positions"):
        kc.paged_attention(*args, scale=0.125, key_bias=(kb[0], kb[1][:20]))
    with pytest.raises(RuntimeError, match="not a key-centring position table"):
        kc.paged_attention(*args, scale=0.125, key_bias=(kb[0], torch.rand(64, 64, generator=gen)))
    with pytest.raises(ValueError, match="key_bias"):
        kc.paged_attention(*args, scale=0.125, key_bias=(kb[0][:, :3], kb[1]))


def test_attention_empty_batch():
    fmt = uniform_fmt("turboquant3", 64, 2)
    out = kc.paged_attention(torch.zeros(0, 4, 64), fmt.allocate(1, 16), torch.zeros(0, 1, dtype=torch.int32),
                             torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), fmt, scale=0.125)
    assert out.shape == (0, 4, 64)


# ------------------------------------------------------------------ one call per layer (vLLM-CPU's forward)


def _fused_case(fmt, hq, seq_lens, q_lens, gen, *, isa="best", t=16, layout="contiguous", dtype=torch.bfloat16):
    """``kernels.cpu.forward`` (the step's key/value stored, then attention, in one call with the format's plan)
    against ``store`` then ``paged_attention``: the same cache bytes and the same output bits; output rows past
    the batch untouched; without key/value it only attends; int64 metadata is converted, not misread."""
    d, hk = fmt.head_size, fmt.num_kv_heads
    batch = random_paged_batch(seq_lens, q_lens, t, generator=gen)
    total = int(batch.seq_lens.sum())
    k_ctx = torch.randn(total, hk, d, generator=gen).to(dtype)
    v_ctx = torch.randn(total, hk, d, generator=gen).to(dtype)
    # The step's tokens: each sequence's last q_len positions (in batch order, as the query rows).
    new = torch.cat([torch.arange(a + s - q, a + s) for a, s, q in
                     zip(batch.ctx_start, batch.seq_lens.tolist(), batch.query_lens)]).long()
    old = torch.ones(total, dtype=torch.bool)
    old[new] = False
    want, got = _cache(fmt, batch.num_blocks, t, layout), _cache(fmt, batch.num_blocks, t, layout)
    for c in (want, got):
        c.fill_(3)
        kc.store(k_ctx[old], v_ctx[old], c, batch.ctx_slots[old], fmt, isa=isa)
    n = batch.num_tokens
    q = torch.randn(n, hq, d, generator=gen).to(dtype)
    meta = (batch.block_table, batch.seq_lens, batch.query_start_loc)
    kc.store(k_ctx[new], v_ctx[new], want, batch.ctx_slots[new], fmt, isa=isa)
    ref = kc.paged_attention(q, want, *meta, fmt, scale=d ** -0.5, isa=isa)
    plan = kc.format_plan(fmt)
    assert plan.num_groups() == len(fmt.groups)
    out = torch.full((n + 2, hq, d), 7.0, dtype=dtype)
    # int32 slots (vLLM-CPU's are int64): converted by the extension
    kc.forward(q, out[:n], k_ctx[new], v_ctx[new], got, batch.ctx_slots[new].int(), *meta, plan, scale=d ** -0.5,
               isa=isa)
    assert torch.equal(got, want)
    assert torch.equal(out[:n], ref), (out[:n].float() - ref.float()).abs().max()
    assert (out[n:] == 7).all()
    again = torch.zeros_like(q)
    kc.forward(q, again, None, None, got, batch.ctx_slots[new], *(m.long() for m in meta), plan, scale=d ** -0.5,
               isa=isa)
    assert torch.equal(got, want) and torch.equal(again, ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", list(CODECS))
def test_forward_equals_store_then_attention(cid, isa, gen):
    _fused_case(uniform_fmt(cid, 64, 2), 6, *MIXED, gen, isa=isa)
    _fused_case(uniform_fmt(cid, 64, 2), 6, *DECODE, gen, isa=isa)


@pytest.mark.parametrize("layout", ["token-major", "byte-stride-2"])
@pytest.mark.parametrize("fmt_fn", [mixed_fmt, yaml_fmt], ids=["mixed", "yaml"])
def test_forward_mixed_formats_and_strides(fmt_fn, layout, gen):
    _fused_case(fmt_fn(64), 6, *MIXED, gen, layout=layout)
    _fused_case(fmt_fn(64), 9, [1500, 700, 33], [1, 1, 1], gen, layout=layout)  # split decode contexts


@pytest.mark.parametrize("cid", SINK_CODECS)
def test_forward_sinks_calibration_head_sizes(cid, gen):
    _fused_case(sink_fmt(cid, 64, 2, 2, 16), 6, *MIXED, gen)
    _fused_case(sink_fmt(cid, 128, 1, 1, 8), 8, *MIXED, gen, t=8, dtype=torch.float32)
    if not codec_cases.case(cid).state:
        _fused_case(calibrated_fmt(cid, 80, 2, gen) if cid != "tq3-haar" else calibrated_fmt(cid, 96, 2, gen), 4,
                    *MIXED, gen, dtype=torch.float16)


def _fused_case_centred_exact_self(fmt, hq, seq_lens, q_lens, gen, *, isa="best", t=16, dtype=torch.float32):
    """``kernels.cpu.forward`` for formats with position-aware key centring and / or exact_self (the keys'
    centres, the queries' bias and the own-token merge passed in, as vLLM's layer does) against ``ops.store``
    with positions then ``ops.paged_attention`` with the step's key and value: the same cache bytes, outputs
    equal but for the own-token merge's rounding (native here, torch ops there)."""
    d, hk = fmt.head_size, fmt.num_kv_heads
    batch = random_paged_batch(seq_lens, q_lens, t, generator=gen)
    total = int(batch.seq_lens.sum())
    k_ctx = torch.randn(total, hk, d, generator=gen).to(dtype) * 2
    v_ctx = torch.randn(total, hk, d, generator=gen).to(dtype)
    pos = torch.cat([torch.arange(s) for s in batch.seq_lens.tolist()])
    new = torch.cat([torch.arange(a + s - q, a + s) for a, s, q in
                     zip(batch.ctx_start, batch.seq_lens.tolist(), batch.query_lens)]).long()
    old = torch.ones(total, dtype=torch.bool)
    old[new] = False
    rope = fmt.key_rope is not None
    at = (lambda sel: {"positions": pos[sel], "max_position": 4095}) if rope else (lambda sel: {})
    want, got = fmt.allocate(batch.num_blocks, t), fmt.allocate(batch.num_blocks, t)
    for c in (want, got):
        ops.store(k_ctx[old], v_ctx[old], c, batch.ctx_slots[old], fmt, impl="cpu", **at(old))
    n = batch.num_tokens
    q = torch.randn(n, hq, d, generator=gen).to(dtype)
    meta = (batch.block_table, batch.seq_lens, batch.query_start_loc)
    ops.store(k_ctx[new], v_ctx[new], want, batch.ctx_slots[new], fmt, impl="cpu", **at(new))
    ref = ops.paged_attention(q, want, *meta, fmt, scale=d ** -0.5, impl="cpu",
                              self_kv=(k_ctx[new], v_ctx[new]) if fmt.exact_self else None)
    plan = ops.fused_plan(fmt, "cpu", hq // hk)
    assert plan is not None
    # two padding rows past the batch (slot -1, no sequence owns them): stored nowhere, their output untouched
    qp = torch.cat([q, torch.randn(2, hq, d, generator=gen).to(dtype)])
    kp, vp = (torch.cat([x[new], torch.randn(2, hk, d, generator=gen).to(dtype)]) for x in (k_ctx, v_ctx))
    slots = torch.cat([batch.ctx_slots[new], torch.tensor([-1, -1])])
    centre = fmt.key_rope.centre(torch.cat([pos[new], torch.tensor([0, 0])]), 4095) if rope else None
    bias = (fmt.key_rope.bias_query(qp, d ** -0.5), fmt.key_rope.table(batch.block_table.shape[1] * t, "cpu")) \
        if rope else None
    out = torch.full((n + 2, hq, d), 7.0, dtype=dtype)
    kc.forward(qp, out, kp, vp, got, slots, *meta, plan, scale=d ** -0.5, isa=isa, centre=centre, key_bias=bias)
    assert torch.equal(got, want)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[:n], ref, atol=tol, rtol=tol)
    assert (out[n:] == 7).all()
    bias = (bias[0][:n], bias[1]) if rope else None
    if not fmt.exact_self:  # attention alone (no key/value): the same rows
        again = torch.zeros_like(q)
        kc.forward(q, again, None, None, got, batch.ctx_slots[new], *meta, plan, scale=d ** -0.5, isa=isa,
                   key_bias=bias)
        torch.testing.assert_close(again, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cid", ["turboquant3", "turboquant4", "fibquant3", "fibquant2"])
def test_forward_with_key_centring_and_exact_self(cid, isa, gen):
    """The calibrated presets' hot path in one native call: position-aware centring (full and partial rotary,
    sinks), exact_self with a fixed key mean, both together, decode and mixed batches, bf16 and float32."""
    rope = rope_fmt(cid, 64, 2, sinks=1)
    _fused_case_centred_exact_self(rope, 6, *MIXED, gen, isa=isa)
    both = rope_fmt(cid, 64, 3, rot=32)
    both.exact_self = True
    _fused_case_centred_exact_self(both, 9, *MIXED, gen, isa=isa)
    _fused_case_centred_exact_self(both, 9, [300, 50, 130], [1, 1, 1], gen, isa=isa, dtype=torch.bfloat16)
    selfish = calibrated_fmt(cid, 64, 2, gen)
    selfish.exact_self = True
    _fused_case_centred_exact_self(selfish, 4, *DECODE, gen, isa=isa)


def test_forward_refuses_a_call_without_the_format_features(gen):
    """A centred format's plan without the centre or the bias, an exact_self plan without the step's key and
    value: refused, not computed without them."""
    fmt = rope_fmt("turboquant3", 64, 2)
    fmt.exact_self = True
    plan = ops.fused_plan(fmt, "cpu", 2)
    cache = fmt.allocate(2, 16)
    q, k = torch.randn(1, 4, 64), torch.randn(1, 2, 64)
    meta = (torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32),
            torch.tensor([0, 1], dtype=torch.int32))
    bias = (fmt.key_rope.bias_query(q, 0.125), fmt.key_rope.table(32, "cpu"))
    centre = fmt.key_rope.centre(torch.tensor([4]), 31)
    with pytest.raises(RuntimeError, match="centre and the queries' bias"):
        kc.forward(q, torch.empty_like(q), k, k, cache, torch.tensor([4]), *meta, plan, scale=0.125, key_bias=bias)
    with pytest.raises(RuntimeError, match="centre and the queries' bias"):
        kc.forward(q, torch.empty_like(q), k, k, cache, torch.tensor([4]), *meta, plan, scale=0.125, centre=centre)
    with pytest.raises(RuntimeError, match="exact_self"):
        kc.forward(q, torch.empty_like(q), None, None, cache, torch.tensor([4]), *meta, plan, scale=0.125,
                   key_bias=bias)
    before = cache.clone()
    with pytest.raises(RuntimeError, match="for every query row"):  # refused before anything is stored
        kc.forward(torch.randn(2, 4, 64), torch.empty(2, 4, 64), k, k, cache, torch.tensor([4]), meta[0],
                   meta[1], torch.tensor([0, 2], dtype=torch.int32), plan, scale=0.125, centre=centre,
                   key_bias=(fmt.key_rope.bias_query(torch.randn(2, 4, 64), 0.125), bias[1]))
    assert torch.equal(cache, before)
    plain = ops.fused_plan(uniform_fmt("turboquant3", 64, 2), "cpu", 2)
    with pytest.raises(RuntimeError, match="other formats take neither"):
        kc.forward(q, torch.empty_like(q), k, k, cache, torch.tensor([4]), *meta, plain, scale=0.125, centre=centre)
    with pytest.raises(RuntimeError, match="other formats take neither"):
        kc.forward(q, torch.empty_like(q), k, k, cache, torch.tensor([4]), *meta, plain, scale=0.125, key_bias=bias)


def test_fused_plan_dispatch(gen, monkeypatch):
    """ops.fused_plan gives the CPU plan where store and both attention kinds pick the CPU kernels (key
    centring and exact_self included), and None where Python must run around them (the dense prefill path),
    where the debug knob forces another implementation, or off the CPU."""
    fmt = calibrated_fmt("turboquant3", 64, 2, gen)
    ops._used.clear()
    plan = ops.fused_plan(fmt, "cpu", 3)
    assert plan is not None and plan.num_groups() == 1 and plan is kc.format_plan(fmt)
    assert "forward:cpu" in ops.used()
    assert ops.fused_plan(mixed_fmt(64), "cpu").num_groups() == 3
    assert ops.fused_plan(fmt, "meta") is None
    assert ops.fused_plan(rope_fmt("turboquant3", 64, 2), "cpu") is not None  # the centring passed to it
    selfish = uniform_fmt("turboquant3", 64, 2)
    selfish.exact_self = True
    assert ops.fused_plan(selfish, "cpu") is not None
    monkeypatch.setattr(kc, "DENSE_PREFILL_FROM", 64)
    assert ops.fused_plan(uniform_fmt("turboquant4", 64, 2), "cpu") is None
    monkeypatch.setattr(kc, "DENSE_PREFILL_FROM", None)
    monkeypatch.setattr(ops, "_FORCED_IMPL", "reference")
    assert ops.fused_plan(uniform_fmt("turboquant4", 64, 2), "cpu") is None

    class Odd(codecs.RawCodec):
        pass

    with pytest.raises(ValueError, match="no CPU kernel for codec type Odd"):
        kc.format_plan(KVFormat(64, [Odd(64)], [Odd(64)]))


def test_forward_refuses_what_it_would_misread(gen):
    fmt = uniform_fmt("turboquant3", 64, 2)
    plan = kc.format_plan(fmt)
    cache = fmt.allocate(2, 16)
    q, k = torch.randn(1, 4, 64), torch.randn(1, 2, 64)
    meta = (torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32),
            torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="slot 99 beyond the cache's 32"):
        kc.forward(q, torch.empty_like(q), k, k, cache, torch.tensor([99]), *meta, plan, scale=0.125)
    with pytest.raises(RuntimeError, match="both key and value"):
        kc.forward(q, torch.empty_like(q), k, None, cache, torch.tensor([4]), *meta, plan, scale=0.125)
    with pytest.raises(RuntimeError, match="one dtype"):
        kc.forward(q, torch.empty_like(q).bfloat16(), k, k, cache, torch.tensor([4]), *meta, plan, scale=0.125)
    with pytest.raises(RuntimeError, match="length 40 and room for 32"):
        kc.forward(q, torch.empty_like(q), k, k, cache, torch.tensor([4]), meta[0], torch.tensor([40]), meta[2], plan,
                   scale=0.125)


# ------------------------------------------------------------------------------------ dispatch, library


def test_ops_pick_cpu_on_cpu_tensors(gen):
    """impl=None on CPU tensors runs these kernels: calibrated formats, sink records and FibQuant included."""
    fmt = calibrated_fmt("turboquant3", 64, 2, gen)
    assert ops.plan(fmt, "cpu", "store") == {"cpu": None, "reference": None}
    sink = KVFormat(64, fmt.keys, fmt.values, sink_tokens=1, block_size=16)
    assert ops.plan(sink, "cpu")["cpu"] is None
    assert ops.plan(uniform_fmt("fibquant2", 64, 2), "cpu")["cpu"] is None
    k, v = torch.randn(4, 2, 64, generator=gen), torch.randn(4, 2, 64, generator=gen)
    a, b = fmt.allocate(1, 16), fmt.allocate(1, 16)
    ops.store(k, v, a, torch.arange(4), fmt)
    kc.store(k, v, b, torch.arange(4), fmt)
    assert torch.equal(a, b)


def test_why_not_names_a_reason_for_unknown_codecs():
    class Odd(codecs.RawCodec):
        pass

    c = Odd(64)
    assert "Odd" in kc.why_not(KVFormat(64, [c], [c]))
    assert kc.why_not(uniform_fmt("turboquant3", 64, 1)) is None


def test_bad_isa_is_rejected():
    fmt = uniform_fmt("turboquant3", 64, 1)
    with pytest.raises(ValueError, match="allowed"):
        kc.store(torch.randn(1, 1, 64), torch.randn(1, 1, 64), fmt.allocate(1, 16), torch.arange(1), fmt, isa="sse9")


def test_opcheck(gen):
    """Schemas, fake kernels and the declared mutation of the cache / output hold up under torch.library."""
    fmt = uniform_fmt("turboquant3", 64, 2)
    (heads, vo, pad, ks, kt, vs, vt), = kc._group_args(fmt)
    cache = fmt.allocate(2, 16)
    k, v = torch.randn(5, 2, 64, generator=gen), torch.randn(5, 2, 64, generator=gen)
    torch.library.opcheck(torch.ops.vllm_kvq_cpu.store.default,
                          (k, v, cache, torch.arange(5), heads, vo, pad, ks, kt, vs, vt, None, None, None, None,
                           [0, 0, 0], 0))
    q = torch.randn(2, 4, 64, generator=gen)
    out = torch.zeros_like(q)
    args = (q, out, cache, torch.tensor([[0, 1], [1, 0]], dtype=torch.int32), torch.tensor([5, 3], dtype=torch.int32),
            torch.tensor([0, 1, 2], dtype=torch.int32), heads, vo, 0.125, ks, kt, vs, vt, None, None, None, [0, 0, 0],
            256, 0, 0, 0)
    torch.library.opcheck(torch.ops.vllm_kvq_cpu.paged_attention.default, args)

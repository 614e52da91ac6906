"""The Triton kernels against the reference ops, for every codec and mixed per-head formats.

Without CUDA the kernels run under ``TRITON_INTERPRET=1`` on tiny shapes (each program instance costs about
a millisecond there). Store must give the reference's bytes where rounding is deterministic; rotating codecs
may flip a code whose rotated value sits on a threshold (matmul vs fast-transform summation order), and the
test checks that every flip is such a tie. Attention follows flash-attention's rule: its error against the
float32 reference is at most twice that of a bf16 PyTorch run over the same dequantized K/V.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
pytest.importorskip("triton")
import vllm_kvq.kernels.triton as kt  # noqa: E402  (conftest switched the interpreter on without CUDA)

assert HAS_CUDA or type(kt.store.__globals__["_store_kernel"]).__name__ == "InterpretedFunction"

from vllm_kvq import codecs, ops  # noqa: E402
from tests import codec_cases  # noqa: E402
from tests.kernel_checks import check_cache, lowp_attention  # noqa: E402
from tests.kernel_checks import cache as _kc_cache  # noqa: E402
from vllm_kvq.kv_format import KVFormat, kv_format  # noqa: E402
from vllm_kvq.ops import reference  # noqa: E402
from vllm_kvq.testing import random_paged_batch, roundtrip  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")

CODECS = codec_cases.ids("triton")  # the shared matrix: a new codec is one entry there


def make_codec(cid: str, d: int):
    return codec_cases.case(cid).build(d)


def uniform_fmt(cid: str, d: int, hk: int) -> KVFormat:
    return codec_cases.case(cid).fmt(d, hk)


def mixed_fmt(d: int) -> KVFormat:
    """Three head groups with different codecs and slot sizes (padding in the smaller slots)."""
    g = lambda n, **p: codecs.get(n, head_dim=d, **p)  # noqa: E731
    return KVFormat(d, [g("turboquant3"), g("bf16"), g("uniform4")],
                    [g("turboquant3"), g("bf16"), g("turboquant2.5")], name="mixed")


def yaml_fmt(d: int) -> KVFormat:
    """Layer 2 of the example config: 4-bit keys on KV head 0, 3-bit elsewhere."""
    return kv_format("kvq-mixed-example", head_size=d, num_kv_heads=3, layer=2, num_layers=6)


# ---------------------------------------------------------------------------------------------- store


def sink_fmt(cid: str, d: int, hk: int, t: int = 16, sinks: int = 2) -> KVFormat:
    case = codec_cases.case(cid)
    cs = [case.build(d, h) for h in range(hk)]
    return KVFormat(d, cs, cs, name=f"{cid}+sink{sinks}", sink_tokens=sinks, block_size=t)


def _store_case(fmt, n, blocks, t, layout, gen, dtype=torch.bfloat16, scale=1.0):
    d, hk = fmt.head_size, fmt.num_kv_heads
    k = (torch.randn(n, hk, d, generator=gen) * scale).to(dtype)
    v = torch.randn(n, hk, d, generator=gen).to(dtype)
    k[0, 0] = 0.0  # an all-zero vector: norm 0 and a zero uniform range
    slots = torch.randperm(blocks * t, generator=gen)[:n]
    slots[torch.randperm(n, generator=gen)[: max(1, n // 5)]] = -1
    got, want = _kc_cache(fmt, blocks, t, layout, device=DEV), _kc_cache(fmt, blocks, t, layout, device=DEV)
    got.fill_(7)
    want.fill_(7)
    k, v, slots = k.to(DEV), v.to(DEV), slots.to(DEV)
    reference.store(k, v, want, slots, fmt)
    kt.store(k, v, got, slots, fmt)
    check_cache(fmt, k.float(), v.float(), slots, got, want)


@pytest.mark.parametrize("cid", list(CODECS))
def test_store_matches_reference(cid, gen):
    _store_case(uniform_fmt(cid, 64, 2), 21, 4, 16, "contiguous", gen, scale=8.0)


@pytest.mark.parametrize("d", [32, 128])
@pytest.mark.parametrize("cid", ["turboquant3", "turboquant2.5", "uniform4"])
def test_store_head_dims(cid, d, gen):
    _store_case(uniform_fmt(cid, d, 1), 13, 2, 16, "contiguous", gen)


def test_store_head_dim_80_haar(gen):
    _store_case(uniform_fmt("turboquant3.5", 80, 2), 9, 2, 8, "contiguous", gen)


@pytest.mark.parametrize("layout", ["token-major", "byte-stride-2"])
@pytest.mark.parametrize("fmt_fn", [mixed_fmt, yaml_fmt], ids=["mixed", "yaml"])
def test_store_mixed_formats_and_strides(fmt_fn, layout, gen):
    _store_case(fmt_fn(64), 19, 3, 16, layout, gen, dtype=torch.float32)


def test_store_empty_and_all_padding(gen):
    fmt = uniform_fmt("turboquant3", 64, 2)
    cache = fmt.allocate(2, 16, device=DEV)
    kt.store(torch.zeros(0, 2, 64, device=DEV), torch.zeros(0, 2, 64, device=DEV), cache,
             torch.zeros(0, dtype=torch.long, device=DEV), fmt)
    kt.store(torch.randn(5, 2, 64, device=DEV), torch.randn(5, 2, 64, device=DEV), cache,
             torch.full((5,), -1, dtype=torch.int32, device=DEV), fmt)
    assert not cache.any()


def test_ops_dispatch_reaches_triton(gen):
    fmt = uniform_fmt("uniform4", 64, 2)
    k, v = torch.randn(4, 2, 64, device=DEV), torch.randn(4, 2, 64, device=DEV)
    slots = torch.arange(4, device=DEV)
    a, b = fmt.allocate(1, 16, device=DEV), fmt.allocate(1, 16, device=DEV)
    ops.store(k, v, a, slots, fmt, impl="triton")
    reference.store(k, v, b, slots, fmt)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ attention


def _attn_case(fmt, hq, seq_lens, q_lens, gen, *, t=16, layout="contiguous", num_splits=None,
               dtype=torch.bfloat16):
    d, hk = fmt.head_size, fmt.num_kv_heads
    batch = random_paged_batch(seq_lens, q_lens, t, generator=gen)
    total = int(batch.seq_lens.sum())
    k_ctx = torch.randn(total, hk, d, generator=gen)
    k_ctx[:, :, :2] *= 4  # outlier channels, as real keys have
    v_ctx = torch.randn(total, hk, d, generator=gen)
    cache = _kc_cache(fmt, batch.num_blocks, t, layout, device=DEV)
    reference.store(k_ctx.to(DEV), v_ctx.to(DEV), cache, batch.ctx_slots.to(DEV), fmt)
    q = torch.randn(batch.num_tokens, hq, d, generator=gen) * 2
    scale = d ** -0.5
    args = (cache, batch.block_table.to(DEV), batch.seq_lens.to(DEV), batch.query_start_loc.to(DEV), fmt)
    ref = reference.paged_attention(q.to(dtype).float().to(DEV), *args, scale=scale).cpu()
    out = kt.paged_attention(q.to(dtype).to(DEV), *args, scale=scale, num_splits=num_splits)
    assert out.dtype == dtype and out.shape == q.shape
    err = (out.float().cpu() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-4, f"float32 kernel differs from the reference by {err}"
        return
    k_deq, v_deq = roundtrip(fmt, k_ctx, v_ctx, batch.block_offsets())
    lowp = lowp_attention(q.to(dtype).float(), k_deq, v_deq, batch, scale, dtype)
    err_lowp = (lowp.float() - ref).abs().max().item()
    assert err <= 2 * err_lowp + 1e-5, f"kernel error {err} > 2 x bf16 PyTorch error {err_lowp}"


DECODE = ([37, 50, 1, 16], [1, 1, 1, 1])
# prefill, chunked prefill, decodes at odd and block-boundary lengths, a sequence with no new tokens
MIXED = ([9, 7, 41, 32, 5], [1, 7, 6, 1, 0])


@pytest.mark.parametrize("cid", list(CODECS))
def test_attention_decode(cid, gen):
    _attn_case(uniform_fmt(cid, 64, 2), 6, *DECODE, gen)


@pytest.mark.parametrize("cid", ["turboquant3", "turboquant2.5", "uniform-g32-rot-2b", "bf16"])
def test_attention_decode_split_k(cid, gen):
    _attn_case(uniform_fmt(cid, 64, 2), 6, *DECODE, gen, num_splits=3)


@pytest.mark.parametrize("cid", list(CODECS))
def test_attention_mixed_batch(cid, gen):
    _attn_case(uniform_fmt(cid, 64, 2), 6, *MIXED, gen)


@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 1), (9, 3), (16, 2)])
def test_attention_gqa_ratios(hq, hk, gen):
    _attn_case(uniform_fmt("turboquant3", 64, hk), hq, *MIXED, gen)


@pytest.mark.parametrize("d,cid", [(32, "turboquant4"), (128, "turboquant3"), (128, "uniform4"), (80, "turboquant3.5")])
def test_attention_head_dims(d, cid, gen):
    _attn_case(uniform_fmt(cid, d, 1), 2, [20, 9], [1, 4], gen, t=8)


@pytest.mark.parametrize("layout", ["token-major", "byte-stride-2"])
@pytest.mark.parametrize("fmt_fn", [mixed_fmt, yaml_fmt], ids=["mixed", "yaml"])
def test_attention_mixed_formats_and_strides(fmt_fn, layout, gen):
    _attn_case(fmt_fn(64), 6, *MIXED, gen, layout=layout)
    _attn_case(fmt_fn(64), 6, *DECODE, gen, layout=layout, num_splits=2)


@pytest.mark.parametrize("cid", ["turboquant3", "uniform4", "fp16"])
def test_attention_float32_queries_match_tightly(cid, gen):
    _attn_case(uniform_fmt(cid, 64, 2), 4, *MIXED, gen, dtype=torch.float32)
    _attn_case(uniform_fmt(cid, 64, 2), 4, *DECODE, gen, dtype=torch.float32, num_splits=2)


def test_attention_one_token_prefill_in_decode_shape(gen):
    """N == S takes the one-token-per-tile path even when a sequence has 2 new tokens and another 0."""
    _attn_case(uniform_fmt("turboquant3", 64, 2), 4, [12, 30, 3], [2, 0, 1], gen, num_splits=2)


@pytest.mark.parametrize("cid", ["turboquant3", "turboquant2.5+shift", "uniform4+shift+scale", "bf16"])
def test_sinks_store_and_attention(cid, gen):
    fmt = sink_fmt(cid, 64, 2)
    _store_case(fmt, 40, 6, 16, "token-major", gen)
    _attn_case(fmt, 6, *MIXED, gen, layout="byte-stride-2")
    _attn_case(fmt, 6, *DECODE, gen, num_splits=3)


def test_split_k_divides_each_sequences_own_context(gen):
    """Block tables as wide as a 128K max_model_len and short contexts: every split of a sequence gets part of
    *its* context (issue 12, item 8), and a stale ``max_seq_len`` (a CUDA graph captured at shorter contexts
    replaying at longer ones) changes no result."""
    from vllm_kvq.kernels.triton import aot_check

    fmt = uniform_fmt("turboquant3", 64, 2)
    _attn_case(fmt, 4, [70, 9, 33], [1, 1, 1], gen, num_splits=4)
    batch = random_paged_batch([70, 9, 33], [1, 1, 1], 16, generator=gen)
    cache = fmt.allocate(batch.num_blocks, 16)
    reference.store(torch.randn(112, 2, 64, generator=gen), torch.randn(112, 2, 64, generator=gen), cache,
                    batch.ctx_slots, fmt)
    wide = torch.zeros(3, 131072 // 16, dtype=torch.int32)
    wide[:, : batch.block_table.shape[1]] = batch.block_table
    q = torch.randn(3, 4, 64, generator=gen).to(torch.bfloat16)
    args = (q, cache, wide, batch.seq_lens, batch.query_start_loc, fmt)
    want = kt.paged_attention(*args, scale=0.125, num_splits=4)
    for stale in (1, 16, None):  # other tile sizes: bf16 rounding differs, a dropped token would not (~0.1-1)
        got = kt.paged_attention(*args, scale=0.125, num_splits=4, max_seq_len=stale)
        torch.testing.assert_close(got, want, atol=3e-3, rtol=2e-2)
    launches = []
    with aot_check._recording(launches):
        kt.paged_attention(*args, scale=0.125, num_splits=4)
    assert "split_tokens" not in __import__("inspect").signature(launches[0].kernel.fn).parameters


@pytest.mark.parametrize("cid", ["turboquant3", "uniform4+shift+scale"])
def test_split_k_for_short_query_batches(cid, gen):
    """Speculative-decoding verification (a few query tokens per sequence) and mixed batches split the
    context too; the merge handles every query row (issue 12, item 10)."""
    _attn_case(uniform_fmt(cid, 64, 2), 6, [37, 50, 9, 16], [3, 4, 2, 1], gen, num_splits=3)
    _attn_case(uniform_fmt(cid, 64, 2), 6, *MIXED, gen, num_splits=2)
    _attn_case(uniform_fmt(cid, 128, 1), 4, [40, 9], [3, 2], gen, t=8, num_splits=2)  # 64-row split tiles


# Chunked prefills whose queries span several 128-row tiles (token x GQA head pairs), ending in a partial tile
# or exactly on a tile boundary, beside a short chunk: GQA groups 1, 3 (padded to 4), 4 and 8 give 128, 32, 32
# and 16 query tokens per tile.
LONG = ([150, 75, 64, 20], [140, 70, 64, 3])


@pytest.mark.parametrize("hq,hk", [(2, 2), (6, 2), (8, 2), (8, 1)], ids=["g1", "g3", "g4", "g8"])
def test_attention_prefill_tiles_span_queries(hq, hk, gen):
    from vllm_kvq.kernels.triton.attention import launch_config

    gp = 1 << (hq // hk - 1).bit_length()
    tile = launch_config(64, gp, decode=False)
    assert tile.bm >= 64 and max(LONG[1]) > tile.bq  # several tiles per sequence, each serving >= 64 rows
    _attn_case(uniform_fmt("turboquant3", 64, hk), hq, *LONG, gen)


@pytest.mark.parametrize("cid", ["turboquant2.5+shift", "fibquant2"])
def test_attention_prefill_tiles_stateful_and_vector_codecs(cid, gen):
    _attn_case(uniform_fmt(cid, 64, 2), 8, *LONG, gen)
    _attn_case(sink_fmt("turboquant3", 64, 2), 8, *LONG, gen, layout="token-major")


def test_prefill_tiles_hold_64_rows_or_more():
    """Issue 12, item 10: a prefill tile decodes each K/V tile once for >= 64 query rows at head sizes up to
    128 (16 rows, i.e. 4 tokens of a GQA group of 4, before), and rows never exceed the tile."""
    from vllm_kvq.kernels.triton.attention import launch_config

    for dp in (32, 64, 128):
        for gp in (1, 2, 4, 8, 16, 32):
            for split in (False, True):
                t = launch_config(dp, gp, decode=False, split=split)
                assert t.bm >= 64 and t.bq * gp <= t.bm and t.bq >= 1, (dp, gp, split, t)
        assert launch_config(dp, 4, decode=True).bq == 1


def test_split_count_is_a_power_of_two_bounded_by_context():
    from vllm_kvq.kernels import split_count

    assert split_count(132, 64, 131072, 32) == 4  # ceil(264 / 64) = 5 -> 4
    assert split_count(132, 1, 131072, 32) == 64
    assert split_count(132, 1, 2048, 32) == 16  # each split at least 4 tiles of 32 tokens
    assert split_count(132, 1, 100, 32) == 1
    assert {split_count(132, p, 65536, 32) for p in range(1, 300)} <= {1, 2, 4, 8, 16, 32, 64}


def test_attention_empty_batch():
    fmt = uniform_fmt("turboquant3", 64, 2)
    out = kt.paged_attention(torch.zeros(0, 4, 64, device=DEV), fmt.allocate(1, 16, device=DEV),
                             torch.zeros(0, 1, dtype=torch.int32, device=DEV),
                             torch.zeros(0, dtype=torch.int32, device=DEV),
                             torch.zeros(1, dtype=torch.int32, device=DEV), fmt, scale=0.125)
    assert out.shape == (0, 4, 64)


# ------------------------------------------------------------------------------------------------ GPU

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cid", list(CODECS))
def test_gpu_real_sizes(cid, gen):
    fmt = uniform_fmt(cid, 128, 8)
    _store_case(fmt, 4096, 512, 16, "contiguous", gen)
    _attn_case(fmt, 32, [4096, 1000, 4097, 17], [1, 1, 1, 1], gen)
    _attn_case(fmt, 32, [2048, 700, 33], [512, 1, 33], gen)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt_fn", [mixed_fmt, yaml_fmt], ids=["mixed", "yaml"])
def test_gpu_mixed_real_sizes(fmt_fn, gen):
    _attn_case(fmt_fn(128), 12, [3000, 513, 4096], [1, 1, 1], gen, layout="token-major")
    _attn_case(fmt_fn(128), 12, [3000, 513], [300, 1], gen)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cid", ["turboquant3", "turboquant4", "uniform4"])
def test_gpu_cuda_graph_capture_replay(cid, gen):
    fmt = uniform_fmt(cid, 128, 8)
    s, t, max_blocks = 8, 16, 64
    cache = fmt.allocate(s * max_blocks, t, device=DEV)
    n = s * max_blocks * t
    kt.store(torch.randn(n, 8, 128, device=DEV), torch.randn(n, 8, 128, device=DEV), cache,
             torch.arange(n, device=DEV), fmt)
    bt = torch.arange(s * max_blocks, device=DEV, dtype=torch.int32).reshape(s, max_blocks)
    lens = torch.full((s,), 100, dtype=torch.int32, device=DEV)
    qsl = torch.arange(s + 1, dtype=torch.int32, device=DEV)
    q = torch.randn(s, 32, 128, device=DEV, dtype=torch.bfloat16)
    kw = dict(scale=128 ** -0.5)
    kt.paged_attention(q, cache, bt, lens, qsl, fmt, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kt.paged_attention(q, cache, bt, lens, qsl, fmt, **kw)
    for trial in range(3):
        lens.copy_(torch.randint(1, max_blocks * t, (s,), generator=gen, dtype=torch.int32))
        q.copy_(torch.randn(s, 32, 128, generator=gen).to(q))
        graph.replay()
        eager = kt.paged_attention(q, cache, bt, lens, qsl, fmt, **kw)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)


def _compile_for_sm90(code: str) -> list[list[str]]:
    """Runs ``code`` (which prints ``aot_check.Compiled.describe()`` lines) in a process without
    TRITON_INTERPRET and returns the lines' fields. Needs no GPU, only Triton's NVIDIA backend."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    head = ("import warnings; warnings.filterwarnings('ignore')\n"
            "from vllm_kvq import codecs\n"
            "from vllm_kvq.kv_format import KVFormat\n"
            "from vllm_kvq.kernels.triton import aot_check as ac\n")
    res = subprocess.run([sys.executable, "-c", head + code], capture_output=True, text=True, env=env, timeout=1800)
    if "0 active drivers" in res.stderr or "No module named 'triton.backends.nvidia'" in res.stderr:
        pytest.skip("Triton has no NVIDIA backend here")
    assert res.returncode == 0, res.stderr[-4000:]
    return [ln.split() for ln in res.stdout.splitlines()]


def _spills(row: list[str]) -> str:
    return next(f.split("=")[1] for f in row if f.startswith("spills="))


def _assert_prefill_rows_and_no_spills(rows: list[list[str]], name_at: int) -> None:
    """``rows``: describe() lines behind ``name_at`` label fields. Every prefill tile (BQ > 1) of the attention
    kernel holds >= 64 rows, and no variant spills (skipped where no ptxas measures spills)."""
    for r in rows:
        tile = dict(f.split("=") for f in r[name_at + 1:]
                    if "=" in f and not f.startswith(("shared", "registers", "spills")))
        if r[name_at] == "_attn_kernel" and int(tile["BQ"]) > 1:
            assert int(tile["BM"]) >= 64, " ".join(r)
    if any(_spills(r) == "None" for r in rows):
        pytest.skip("no ptxas that reads Triton's PTX: spills not measured")
    bad = [" ".join(r) for r in rows if _spills(r) != "0"]
    assert not bad, "register spills:\n" + "\n".join(bad)


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the GPU compiler rejects (it caught non-constexpr globals here once):
    compile every kernel variant of a mixed format for sm_90 with Triton's NVIDIA backend, in a process
    without TRITON_INTERPRET. Needs no GPU."""
    rows = _compile_for_sm90(
        "g = lambda n, **p: codecs.get(n, head_dim=64, **p)\n"
        "fmt = KVFormat(64, [g('turboquant2.5'), g('bf16')], "
        "[g('uniform', bits=2, group_size=32, rotate=True), g('fp16')])\n"
        "for c in ac.compile_launches(ac.capture(fmt, 6)):\n"
        "    print(c.describe())\n")
    assert {"_store_kernel", "_attn_kernel", "_merge_kernel"} <= {r[0] for r in rows}, rows
    # Register spills are performance bugs; ptxas reports them when a recent enough one ships with Triton.
    assert all(_spills(r) in ("None", "0") for r in rows), f"register spills:\n{rows}"


# The formats of docs/performance.md's prefill table: TurboQuant at 4/3/2.5 bits, a calibrated (stateful) one,
# one with attention sinks, and FibQuant (a vector quantizer).
PREFILL_FORMATS = ("turboquant4", "turboquant3", "turboquant2.5", "turboquant3+shift+scale", "turboquant3+sink",
                   "fibquant2")


@pytest.mark.slow
def test_prefill_tiles_compile_for_sm90_without_spills():
    """Issue 12, item 10: every format's prefill and short-query tiles hold >= 64 query rows and compile for
    sm_90 with no register spills at head sizes 64 and 128 (ptxas, as the JIT would specialize them)."""
    code = ["import torch", "from tests import codec_cases", "def fmt(cid, d, hk):",
            "    sink = cid.endswith('+sink')",
            "    case = codec_cases.case(cid[:-5] if sink else cid)",
            "    cs = [case.build(d, h) for h in range(hk)]",
            "    return KVFormat(d, cs, cs, name=cid, sink_tokens=4 if sink else 0, block_size=16)",
            f"for cid in {PREFILL_FORMATS!r}:",
            "    for d in (64, 128):",
            "        launches = [l for l in ac.capture(fmt(cid, d, 8), 32) if l.kwargs.get('BQ', 1) > 1]",
            "        for c in ac.compile_launches(launches):",
            "            print(cid, d, c.describe())"]
    rows = _compile_for_sm90("\n".join(code) + "\n")
    seen = {(r[0], r[1]) for r in rows}
    assert seen == {(cid, str(d)) for cid in PREFILL_FORMATS for d in (64, 128)}, rows
    for r in rows:
        tile = dict(f.split("=") for f in r[3:] if "=" in f and not f.startswith(("shared", "registers", "spills")))
        assert int(tile["BM"]) >= 64, f"prefill tile of {tile['BM']} rows: {' '.join(r)}"
    if any(_spills(r) == "None" for r in rows):
        pytest.skip("no ptxas that reads Triton's PTX: spills not measured")
    bad = [" ".join(r) for r in rows if _spills(r) != "0"]
    assert not bad, "register spills:\n" + "\n".join(bad)

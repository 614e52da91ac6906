"""The CUDA extension (csrc/cuda, ``vllm_kvq._C``) against the reference ops, for every case of the shared
matrix that claims "cuda" (tests/codec_cases.py), with sink records, at head sizes 64 and 128.

Without a GPU only the first tests run: ``why_not`` must accept exactly the matrix's "cuda" cases (so the
matrix is the one place that says what the extension runs) and decline what does not fit. The kernels' logic
is also checked on CPU by tests/test_csrc_compile.py's emulation; the GPU tests here are the real thing.
"""

from __future__ import annotations

import pytest
import torch

from tests import codec_cases
from tests.kernel_checks import check_cache, lowp_attention
from vllm_kvq import codecs
from vllm_kvq.kernels import cuda as kcuda
from vllm_kvq.kv_format import KVFormat
from vllm_kvq.ops import reference
from vllm_kvq.testing import random_paged_batch, roundtrip

HAS_CUDA = torch.cuda.is_available()
CASES = [(cid, d) for cid in codec_cases.ids("cuda") for d in kcuda.HEAD_SIZES
         if d in codec_cases.case(cid).head_dims]
# sink records with one codec of each kind, with and without bound state (the GPU check's time is bounded)
SINK_CASES = [(cid, d) for cid, d in CASES
              if cid in ("turboquant3", "turboquant2.5+shift", "fibquant2", "fibquant2+shift+scale")]
GPU_CASES = [(cid, d, 0) for cid, d in CASES] + [(cid, d, 2) for cid, d in SINK_CASES]


def _fmt(cid: str, d: int, hk: int, sinks: int = 0, t: int = 16) -> KVFormat:
    case = codec_cases.case(cid)
    cs = [case.build(d, h) for h in range(hk)]
    return KVFormat(d, cs, cs, name=f"{cid}+sink{sinks}" if sinks else cid, sink_tokens=sinks,
                    block_size=t if sinks else None)


@pytest.mark.parametrize("cid", [c.id for c in codec_cases.CASES])
def test_why_not_agrees_with_the_matrix(cid):
    """A case claims "cuda" exactly when the extension takes it (store and decode, with and without sinks) at
    every compiled head size the case has."""
    case = codec_cases.case(cid)
    for d in kcuda.HEAD_SIZES:
        if d not in case.head_dims:
            continue
        for sinks in (0, 2):
            fmt = _fmt(cid, d, 2, sinks)
            whys = [kcuda.why_not(fmt, "store"), kcuda.why_not(fmt, "paged_attention", True, 4)]
            if "cuda" in case.impls:
                assert whys == [None, None], f"{cid} d={d} sinks={sinks}: {whys}"
            else:
                assert all(whys), f"{cid} d={d}: the CUDA extension takes it; add 'cuda' to its impls"


def test_why_not_declines_what_is_not_compiled():
    c = codecs.get("turboquant3", head_dim=64)
    fmt = KVFormat(64, [c], [c])
    assert "prefill" in kcuda.why_not(fmt, "paged_attention", False, 1)
    assert "1..8" in kcuda.why_not(fmt, "paged_attention", True, 9)
    c80 = codecs.get("turboquant3", head_dim=80)
    assert "head size 80" in kcuda.why_not(KVFormat(80, [c80], [c80]), "store")
    u = codecs.get("uniform4", head_dim=64)
    assert "uniform4" in kcuda.why_not(KVFormat(64, [c], [u]), "store")


def test_why_not_declines_fibquant_tables_that_do_not_fit(monkeypatch):
    """Keys are scored from a per-query-head table of (D / k) x 2**L floats in shared memory: a codebook whose
    table exceeds the limit is declined for decode (the store has no table and still runs). The limit is
    lowered here so that a preset crosses it (a real crossing needs a 2048-word codebook, minutes to build);
    test_csrc_compile checks the Python limit against the kernels' header."""
    fib2 = codecs.get("fibquant2", head_dim=128)  # 32 codes x 256 codewords: 32 KiB per query head
    assert kcuda.fib_table_bytes(fib2) == 32 * 256 * 4
    fmt = KVFormat(128, [fib2], [fib2])
    monkeypatch.setattr(kcuda, "FIB_TABLE_MAX_BYTES", 16 * 1024)
    why = kcuda.why_not(fmt, "paged_attention", True, 4)
    assert why and "32 KiB per query head" in why and "16 KiB" in why
    assert kcuda.why_not(fmt, "store") is None
    tq = codecs.get("turboquant2", head_dim=128)  # FibQuant values need no table: only keys are scored by lookups
    assert kcuda.why_not(KVFormat(128, [tq], [fib2]), "paged_attention") is None
    monkeypatch.undo()
    # every preset rate fits at both head sizes
    for name in ("fibquant0.75", "fibquant1.5", "fibquant1.75", "fibquant2", "fibquant2.5", "fibquant3"):
        for d in kcuda.HEAD_SIZES:
            c = codecs.get(name, head_dim=d)
            assert kcuda.fib_table_bytes(c) <= kcuda.FIB_TABLE_MAX_BYTES
            assert kcuda.why_not(KVFormat(d, [c], [c]), "paged_attention", True, 8) is None


# ---------------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _need_ext():
    if not kcuda.available():
        pytest.skip("vllm_kvq._C is not built")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cid,d,sinks", GPU_CASES, ids=[f"{c}-d{d}" + ("-sinks" if s else "") for c, d, s in GPU_CASES])
def test_gpu_cuda_extension_matches_reference(cid, d, sinks, gen):
    """Store: the reference's bytes (or a code flipped on a tie, sink records within a bf16 ulp). Decode:
    flash-attention's 2x rule against a bf16 PyTorch run, with and without split-K; GQA 4 (Llama-3.1-8B's
    32 / 8 heads, scaled down) at head size 128, GQA 3 (SmolLM2) at 64."""
    _need_ext()
    dev = torch.device("cuda")
    for hq, hk in ((16, 4),) if d == 128 else ((9, 3),):
        t = 16
        fmt = _fmt(cid, d, hk, sinks, t)
        blocks, n = 64, 700
        k = torch.randn(n, hk, d, generator=gen).to(torch.bfloat16).to(dev)
        v = torch.randn(n, hk, d, generator=gen).to(torch.bfloat16).to(dev)
        slots = torch.randperm(blocks * t, generator=gen)[:n].to(dev)
        slots[::7] = -1
        got, want = fmt.allocate(blocks, t, device=dev), fmt.allocate(blocks, t, device=dev)
        kcuda.store(k, v, got, slots, fmt)
        reference.store(k, v, want, slots, fmt)
        check_cache(fmt, k.float(), v.float(), slots, got, want)
        for splits in (1, 4):
            batch = random_paged_batch([1500, 17, 600], [1, 1, 1], t, generator=gen)
            total = int(batch.seq_lens.sum())
            k_ctx, v_ctx = torch.randn(total, hk, d, generator=gen), torch.randn(total, hk, d, generator=gen)
            k_ctx[:, :, :2] *= 4  # outlier channels, as real keys have
            cache = fmt.allocate(batch.num_blocks, t, device=dev)
            reference.store(k_ctx.to(dev), v_ctx.to(dev), cache, batch.ctx_slots.to(dev), fmt)
            q = (torch.randn(batch.num_tokens, hq, d, generator=gen) * 2).to(torch.bfloat16)
            args = (cache, batch.block_table.to(dev), batch.seq_lens.to(dev), batch.query_start_loc.to(dev), fmt)
            ref = reference.paged_attention(q.float().to(dev), *args, scale=d ** -0.5).cpu()
            out = kcuda.paged_attention(q.to(dev), *args, scale=d ** -0.5, num_splits=splits).float().cpu()
            k_deq, v_deq = roundtrip(fmt, k_ctx, v_ctx, batch.block_offsets())
            lowp = lowp_attention(q.float(), k_deq, v_deq, batch, d ** -0.5)
            err, err_lowp = (out - ref).abs().max().item(), (lowp.float() - ref).abs().max().item()
            assert err <= 2 * err_lowp + 1e-5, f"hq={hq} splits={splits}: CUDA error {err} > 2 x bf16 error {err_lowp}"

"""Paged attention over the packed cache: decode, prefill and chunked prefill in one kernel.

A program owns one tile of query rows of one sequence and one KV head: ``BQ`` query tokens times the ``G``
query heads of the KV head's GQA group (padded to ``GP``), so each KV head's codes are read once for the
whole group and the QK^T and PV products are ``tl.dot`` calls (tensor cores for fp16/bf16 queries).

- The query is rotated once into the key codec's domain (``q @ R_k^T``) and pre-scaled by
  ``scale * log2(e)`` so the softmax runs on exp2.
- Keys: TurboQuant scores are ``(q . centroids[codes]) * fp16_scale`` (the scale is applied to the score
  column, not to the 128 coordinates); uniform and raw codecs dequantize the tile.
- Values accumulate in the value codec's rotated domain (TurboQuant folds the per-token scale into the
  probabilities) and the output is rotated back once (``o @ R_v``).
- Tiles map to sequences by a binary search over ``query_start_loc`` (no host synchronization), and the grid
  is sized from tensor shapes alone, so a decode step can be captured in a CUDA graph.
- Decode steps split the context over ``NUM_SPLITS`` programs (split-K); a second kernel merges their
  partial (max, sum, accumulator) triples and applies the output rotation.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from vllm_kvq.kernels.triton import codec_jit as cj
from vllm_kvq.kernels.triton.codec_spec import heads_tensor, spec_of, tables
from vllm_kvq.kv_format import KVFormat

LOG2E = 1.4426950408889634
_DOT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _to_dot(x, DOT: tl.constexpr):
    if DOT == 1:
        return x.to(tl.float16)
    elif DOT == 2:
        return x.to(tl.bfloat16)
    elif DOT == 3:
        return (cj.bf16_bits(x) << 16).to(tl.float32, bitcast=True)
    else:
        return x


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """a @ b with operands rounded to the query's dtype and float32 accumulation. DOT: 0 float32, 1 fp16,
    2 bf16, 3 bf16 rounding emulated in float32 (the interpreter's bf16 dot returns garbage)."""
    if DOT == 0 or DOT == 3:
        return tl.dot(_to_dot(a, DOT), _to_dot(b, DOT), input_precision="ieee")
    else:
        return tl.dot(_to_dot(a, DOT), _to_dot(b, DOT))


@triton.jit
def _out(o, o_ptr, DOT: tl.constexpr):  # o_ptr: any pointer tensor of the output
    """o float32 -> the output dtype; DOT == 3 rounds to bf16 itself (the interpreter's cast truncates)."""
    if DOT == 3:
        return cj.bf16_bits(o).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return o.to(o_ptr.dtype.element_ty)


@triton.jit
def _store_out(o, rows, rmask, vrt_ptr, D, DP: tl.constexpr, RC: tl.constexpr, ROT: tl.constexpr,
               DOT: tl.constexpr):
    """Stores o (BM, DP) rotated back (``o @ R``) to row pointers ``rows`` (BM, 1), RC columns at a time so
    only a (DP, RC) slice of R is staged."""
    if ROT:
        j = tl.arange(0, DP)
        for c in tl.static_range(0, DP, RC):
            i = c + tl.arange(0, RC)
            # R[j, i] = R^T[i, j]: the inverse rotation is a transposed load of the same table.
            r = tl.load(vrt_ptr + i[None, :] * D + j[:, None], mask=(j[:, None] < D) & (i[None, :] < D), other=0.0)
            oc = tl.dot(o, r, input_precision="tf32x3")
            tl.store(rows + i[None, :], _out(oc, rows, DOT), mask=rmask[:, None] & (i[None, :] < D))
    else:
        j = tl.arange(0, DP)
        tl.store(rows + j[None, :], _out(o, rows, DOT), mask=rmask[:, None] & (j[None, :] < D))


@triton.jit
def _find_seq(qsl_ptr, pid, S, BQ: tl.constexpr):
    """Tile ``pid``'s sequence: the largest s with ``tile_start(s) <= pid``, where sequence s's tiles start at
    ``qsl[s] // BQ + s`` (each sequence may end in a partial tile) or, one token per tile, at ``qsl[s]``."""
    lo = pid * 0  # a tensor even when S is specialized to a constant
    hi = lo + S - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if BQ == 1:
            ok = tl.load(qsl_ptr + mid) <= pid
        else:
            ok = tl.load(qsl_ptr + mid) // BQ + mid <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _attn_kernel(q_ptr, sqn, sqh, o_ptr, son, soh,
                 cache_ptr, sB, sH, sT, sC, bt_ptr, sbt, seqlen_ptr, qsl_ptr, heads_ptr,
                 krt_ptr, kcent_ptr, vrt_ptr, vcent_ptr, part_ptr, ml_ptr,
                 S, N, HQ, qscale, split_tokens,
                 D: tl.constexpr, DP: tl.constexpr, T: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                 BQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 VOFF: tl.constexpr, DOT: tl.constexpr, RC: tl.constexpr,
                 K_KIND: tl.constexpr, K_B0: tl.constexpr, K_N0: tl.constexpr, K_B1: tl.constexpr,
                 K_SEG1: tl.constexpr, K_META: tl.constexpr, K_GS: tl.constexpr, K_W: tl.constexpr,
                 K_ROT: tl.constexpr, K_SMODE: tl.constexpr,
                 V_KIND: tl.constexpr, V_B0: tl.constexpr, V_N0: tl.constexpr, V_B1: tl.constexpr,
                 V_SEG1: tl.constexpr, V_META: tl.constexpr, V_GS: tl.constexpr, V_W: tl.constexpr,
                 V_ROT: tl.constexpr, V_SMODE: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(2)
    s = _find_seq(qsl_ptr, pid, S, BQ)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    t0 = pid - q_start if BQ == 1 else (pid - (q_start // BQ + s)) * BQ
    if t0 >= q_len:
        return
    ctx = tl.load(seqlen_ptr + s)
    kvh = tl.load(heads_ptr + tl.program_id(1))

    r = tl.arange(0, BM)
    tok = r // GP
    g = r % GP
    rmask = (g < G) & (tok < BQ) & (t0 + tok < q_len)
    qtok = (q_start + t0 + tok).to(tl.int64)
    qpos = ctx - q_len + t0 + tok
    qh = kvh * G + g
    d = tl.arange(0, DP)
    dm = d < D
    q_rows = q_ptr + qtok[:, None] * sqn + qh[:, None] * sqh
    if K_ROT:
        q = cj.rotate_rows(q_rows, rmask, krt_ptr, D, DP, BM, RC)
    else:
        q = tl.load(q_rows + d[None, :], mask=rmask[:, None] & dm[None, :], other=0.0).to(tl.float32)
    q = q * qscale

    kv_end = ctx - q_len + tl.minimum(t0 + BQ, q_len)
    lo = split * split_tokens
    hi = tl.minimum(kv_end, lo + split_tokens)
    m = tl.full((BM,), float("-inf"), tl.float32)
    l = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DP), tl.float32)
    head_off = kvh.to(tl.int64) * sH
    kcb = cj.codebook(kcent_ptr, D, DP, K_W)
    vcb = cj.codebook(vcent_ptr, D, DP, V_W)
    for n0 in range(lo, hi, BN):
        pos = n0 + tl.arange(0, BN)
        nmask = pos < hi
        blk = tl.load(bt_ptr + s.to(tl.int64) * sbt + pos // T, mask=nmask, other=0).to(tl.int64)
        rows = cache_ptr + blk * sB + head_off + (pos % T).to(tl.int64) * sT
        kv, ks = cj.decode_tile(rows, d, sC, nmask, D, kcb, kcent_ptr, DP, BN,
                                K_KIND, K_B0, K_N0, K_B1, K_SEG1, K_META, K_GS, K_W)
        sc = _mm(q, tl.trans(kv), DOT) * ks[None, :]
        ok = (pos[None, :] <= qpos[:, None]) & nmask[None, :]
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(sc - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        vv, vs = cj.decode_tile(rows + VOFF * sC, d, sC, nmask, D, vcb, vcent_ptr, DP, BN,
                                V_KIND, V_B0, V_N0, V_B1, V_SEG1, V_META, V_GS, V_W)
        acc = acc * alpha[:, None] + _mm(p * vs[None, :], vv, DOT)
        m = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.maximum(l, 1e-30)[:, None]
        _store_out(o, o_ptr + qtok[:, None] * son + qh[:, None] * soh, rmask, vrt_ptr, D, DP, RC, V_ROT, DOT)
    else:
        row = (split * N + qtok) * HQ + qh  # partials are (NUM_SPLITS, N, HQ, ...)
        tl.store(part_ptr + row[:, None] * DP + d[None, :], acc, mask=rmask[:, None])
        tl.store(ml_ptr + row * 2, m, mask=rmask)
        tl.store(ml_ptr + row * 2 + 1, l, mask=rmask)


@triton.jit
def _merge_kernel(o_ptr, son, soh, part_ptr, ml_ptr, heads_ptr, vrt_ptr, N, HQ,
                  D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, V_ROT: tl.constexpr, DOT: tl.constexpr, RC: tl.constexpr):
    """One program per (query token, KV head): merges the splits of the group's query heads."""
    n = tl.program_id(0).to(tl.int64)
    kvh = tl.load(heads_ptr + tl.program_id(1))
    g = tl.arange(0, BM)
    gm = g < G
    qh = kvh * G + g
    d = tl.arange(0, DP)
    dm = d < D
    m = tl.full((BM,), float("-inf"), tl.float32)
    l = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DP), tl.float32)
    for j in range(NUM_SPLITS):
        row = (j * N + n) * HQ + qh
        m_j = tl.load(ml_ptr + row * 2, mask=gm, other=float("-inf"))
        l_j = tl.load(ml_ptr + row * 2 + 1, mask=gm, other=0.0)
        a_j = tl.load(part_ptr + row[:, None] * DP + d[None, :], mask=gm[:, None], other=0.0)
        m_new = tl.maximum(m, m_j)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_j - m_safe)
        l = l * alpha + l_j * beta
        acc = acc * alpha[:, None] + a_j * beta[:, None]
        m = m_new
    o = acc / tl.maximum(l, 1e-30)[:, None]
    _store_out(o, o_ptr + n * son + qh[:, None] * soh, gm, vrt_ptr, D, DP, RC, V_ROT, DOT)


def launch_config(dp: int, gp: int, decode: bool) -> tuple[int, int, int, int]:
    """(query tokens per tile, rows per tile, context tokens per tile, warps). Chosen so that ptxas reports
    no register spills for sm_90 at head sizes 64-256 (checked by compiling, not yet timed on a GPU)."""
    bn = 32 if dp <= 128 else 16
    if decode:
        return 1, max(16, gp), bn, 8
    bq = max(1, 16 // gp)  # 32-row prefill tiles spill at head size 128
    return bq, max(16, bq * gp), bn, 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_SM_COUNT: dict = {}


def _num_splits(device: torch.device, programs: int, max_ctx: int, bn: int) -> int:
    """Splits that fill the GPU about twice over, each at least 4 tiles long; from shapes only."""
    if device.type != "cuda":
        return 1
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    want = math.ceil(2 * _SM_COUNT[device.index] / max(programs, 1))
    return max(1, min(want, max_ctx // (4 * bn), 64))


def paged_attention(query: torch.Tensor,  # (N, Hq, D)
                    cache: torch.Tensor,  # (B, Hk, T, C) uint8, any strides
                    block_table: torch.Tensor,  # (S, max_blocks) int
                    seq_lens: torch.Tensor,  # (S,) context length including this step's tokens
                    query_start_loc: torch.Tensor,  # (S + 1,) cumulative query lengths
                    fmt: KVFormat, *, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its packed context -> (N, Hq, D) in query's dtype.

    ``num_splits`` (decode batches only) overrides the split-K heuristic; tests use it on CPU.
    """
    n, hq, d = query.shape
    s = seq_lens.shape[0]
    out = torch.zeros(n, hq, d, dtype=query.dtype, device=query.device)
    if n == 0 or s == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    hk = fmt.num_kv_heads
    grp = hq // hk
    gp = triton.next_power_of_2(grp)
    dp = max(16, triton.next_power_of_2(d))
    t = cache.shape[2]
    # N == S means one token per sequence in any batch vLLM builds: a decode step, one token per tile.
    decode = n == s
    bq, bm, bn, warps = launch_config(dp, gp, decode)
    max_ctx = block_table.shape[1] * t
    splits = 1
    if decode:
        splits = num_splits if num_splits is not None else _num_splits(query.device, s * hk, max_ctx, bn)
    if splits > 1:  # short splits use short tiles, so every split gets work
        bn = max(16, min(bn, triton.next_power_of_2(triton.cdiv(max_ctx, splits))))
    split_tokens = triton.cdiv(triton.cdiv(max_ctx, splits), bn) * bn
    dot = _DOT_KIND.get(query.dtype, 0)
    if dot == 2 and _interpreting():
        dot = 3
    seq_lens = seq_lens.to(torch.int32)
    qsl = query_start_loc.to(torch.int32)
    bt = block_table.to(torch.int32) if block_table.dtype != torch.int32 else block_table
    if splits > 1:
        part = torch.empty(splits, n, hq, dp, dtype=torch.float32, device=query.device)
        ml = torch.empty(splits, n, hq, 2, dtype=torch.float32, device=query.device)
    else:
        part = ml = out
    for g in fmt.groups:
        ks, vs = spec_of(g.key), spec_of(g.value)
        krt, kcent, _ = tables(g.key, cache.device)
        vrt, vcent, _ = tables(g.value, cache.device)
        heads = heads_tensor(g.heads, cache.device)
        _attn_kernel[(n if bq == 1 else n // bq + s, len(g.heads), splits)](
            query, query.stride(0), query.stride(1), out, out.stride(0), out.stride(1),
            cache, *cache.stride(), bt, bt.stride(0), seq_lens, qsl, heads,
            krt, kcent, vrt, vcent, part, ml, s, n, hq, scale * LOG2E, split_tokens,
            D=d, DP=dp, T=t, G=grp, GP=gp, BQ=bq, BM=bm, BN=bn, NUM_SPLITS=splits,
            VOFF=g.key.nbytes, DOT=dot, RC=min(32, dp), **ks.constexprs("K"), **vs.constexprs("V"),
            num_warps=warps)
        if splits > 1:
            _merge_kernel[(n, len(g.heads))](
                out, out.stride(0), out.stride(1), part, ml, heads, vrt, n, hq,
                D=d, DP=dp, G=grp, BM=max(16, gp), NUM_SPLITS=splits, V_ROT=vs.rot, DOT=dot, RC=min(32, dp))
    return out

"""Paged attention over the packed cache: decode, prefill and chunked prefill in one kernel.

A program owns one tile of query rows of one sequence and one KV head: ``BQ`` query tokens times the ``G``
query heads of the KV head's GQA group (padded to ``GP``), so each KV head's codes are read once for the
whole group and the QK^T and PV products are ``tl.dot`` calls (tensor cores for fp16/bf16 queries).

- The kernel knows no codec: each side (K, V) calls its codec's Triton hooks (``prep`` once per program,
  ``decode`` per context tile), passed as constexpr functions with the codec's constexpr parameter tuple.
- The query goes through the key codec's ``query_transform`` (times the bound channel scale), is rotated
  once into the key codec's domain (``q @ R_k^T``) and pre-scaled by ``scale * log2(e)`` (softmax on exp2).
- Keys: scores are ``(q . vals) * row_scale`` with ``decode``'s (vals, row scale): TurboQuant keeps its fp16
  norm apart, so it multiplies the score column rather than the 128 coordinates.
- Values accumulate in the value codec's rotated domain (the row scale folds into the probabilities), the
  output is rotated back once (``o @ R_v``) and gets the value codec's ``output_transform`` (* scale + shift).
- Tiles map to sequences by a binary search over ``query_start_loc`` (no host synchronization), and the grid
  is sized from tensor shapes alone, so a decode step can be captured in a CUDA graph.
- Decode steps split the context over ``NUM_SPLITS`` programs (split-K); a second kernel merges their
  partial (max, sum, accumulator) triples and applies the output rotation.
- Position-aware key centring (``KB``, ``vllm_kvq.key_centre``) adds ``bias_query[row] . table[p]`` to every
  score: per context tile, a (rows, D) x (D, BN) product against the tile's table rows at about float32
  accuracy (``cm.dot3``: the bias can be tens of logits, beyond what a 16-bit dot keeps).
- Formats with ``exact_self`` (``vllm_kvq.ops`` merges each row's exact own term): ``EXCL`` makes the mask
  strictly causal (a row at position p sees j < p; a row that sees nothing is left at the launcher's zeros)
  and ``LSE`` stores each row's natural-log log-sum-exp, the merged one under split-K. Both are constexpr, so
  a format without them compiles the kernel it always did.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from vllm_kvq.codecs import _triton as ct
from vllm_kvq.kernels import heads_tensor
from vllm_kvq.kernels import num_splits as _num_splits
from vllm_kvq.kernels.triton import common as cm
from vllm_kvq.kernels.triton.store import side_args
from vllm_kvq.kv_format import KVFormat

LOG2E = 1.4426950408889634
SHORT_QUERY = 8  # tokens per sequence (on average) up to which a batch gets split-K
_DOT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _to_dot(x, DOT: tl.constexpr):
    if DOT == 1:
        return x.to(tl.float16)
    elif DOT == 2:
        return x.to(tl.bfloat16)
    elif DOT == 3:
        return (ct.bf16_bits(x) << 16).to(tl.float32, bitcast=True)
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
        return ct.bf16_bits(o).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return o.to(o_ptr.dtype.element_ty)


@triton.jit
def _store_chunk(o, c, rows, rmask, vrt_ptr, shift_ptr, scale_ptr, D, DP: tl.constexpr, RC: tl.constexpr,
                 SHIFT: tl.constexpr, SCALE: tl.constexpr, DOT: tl.constexpr):
    # cm.dot3 precision: tf32x3 for float32 outputs, else bf16x3 (the output is rounded to 16 bits anyway).
    XD: tl.constexpr = 0 if DOT == 0 else (3 if DOT == 3 else 2)
    j = tl.arange(0, DP)
    i = c + tl.arange(0, RC)
    im = i[None, :] < D
    # R[j, i] = R^T[i, j]: the inverse rotation is a transposed load of the same table.
    r = tl.load(vrt_ptr + i[None, :] * D + j[:, None], mask=(j[:, None] < D) & im, other=0.0)
    oc = cm.dot3(o, r, XD)
    if SCALE:
        oc = oc * tl.load(scale_ptr + i[None, :], mask=im, other=1.0)
    if SHIFT:
        oc += tl.load(shift_ptr + i[None, :], mask=im, other=0.0)
    tl.store(rows + i[None, :], _out(oc, rows, DOT), mask=rmask[:, None] & im)


@triton.jit
def _store_out(o, rows, rmask, vrt_ptr, shift_ptr, scale_ptr, D, DP: tl.constexpr, RC: tl.constexpr,
               ROT: tl.constexpr, SHIFT: tl.constexpr, SCALE: tl.constexpr, DOT: tl.constexpr):
    """Stores o (BM, DP) rotated back (``o @ R``) and mapped through the value codec's output transform
    (``* scale + shift``, per-head rows of the stacked state at ``scale_ptr`` / ``shift_ptr``) to row pointers
    ``rows`` (BM, 1), RC columns at a time so only a (DP, RC) slice of R is staged."""
    if ROT:
        if o.shape[0] < 64:
            for c in tl.static_range(0, DP, RC):
                _store_chunk(o, c, rows, rmask, vrt_ptr, shift_ptr, scale_ptr, D, DP, RC, SHIFT, SCALE, DOT)
        else:  # unrolled, the slices' products overlap and spill at 64+ rows (ptxas, sm_90)
            for c in range(0, DP, RC):
                _store_chunk(o, c, rows, rmask, vrt_ptr, shift_ptr, scale_ptr, D, DP, RC, SHIFT, SCALE, DOT)
    else:
        j = tl.arange(0, DP)
        jm = j[None, :] < D
        if SCALE:
            o = o * tl.load(scale_ptr + j[None, :], mask=jm, other=1.0)
        if SHIFT:
            o += tl.load(shift_ptr + j[None, :], mask=jm, other=0.0)
        tl.store(rows + j[None, :], _out(o, rows, DOT), mask=rmask[:, None] & jm)


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
def _key_bias(b_rows, rmask, tab_ptr, n_tab, n0, D, DP: tl.constexpr, RC: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, XD: tl.constexpr):
    """(BM, BN) score bias, in exp2 units, of the context tile starting at ``n0``: ``b_rows[r] . table[p] *
    log2(e)`` for row r (bias-query rows at pointers ``b_rows`` (BM, 1)) and the key at position p; table rows
    past ``n_tab`` read as 0 (only masked keys reach them). At about float32 accuracy (the bias can be tens of
    logits, beyond what a 16-bit dot keeps), the bias-query rows read again per tile instead of held in
    registers beside the rotated query: tiles under 64 rows (decode) sum D rank-1 float32 updates (a dot there
    takes the register-operand mma and spills at head size 128), larger tiles take RC coordinates at a time
    as ``cm.dot3`` products."""
    pos = n0 + tl.arange(0, BN)
    pm = pos < n_tab
    tab = tab_ptr + pos.to(tl.int64) * D
    acc = tl.zeros((BM, BN), tl.float32)
    if BM < 64:
        for i in range(0, D):
            x = tl.load(b_rows + i, mask=rmask[:, None], other=0.0)  # (BM, 1)
            t = tl.load(tab + i, mask=pm, other=0.0)  # (BN,)
            acc += x * t[None, :]
    else:
        for i0 in range(0, DP, RC):
            i = i0 + tl.arange(0, RC)
            im = i < D
            x = tl.load(b_rows + i[None, :], mask=rmask[:, None] & im[None, :], other=0.0)  # (BM, RC)
            t = tl.load(tab[:, None] + i[None, :], mask=pm[:, None] & im[None, :], other=0.0)  # (BN, RC)
            acc += cm.dot3(x, tl.trans(t), XD)
    return acc * 1.4426950408889634


# S and N change with every batch: not specializing them (== 1, % 16) keeps serving on one compiled variant.
@triton.jit(do_not_specialize=["S", "N"])
def _attn_kernel(q_ptr, sqn, sqh, o_ptr, son, soh,
                 cache_ptr, sB, sH, sT, sC, bt_ptr, sbt, seqlen_ptr, qsl_ptr, heads_ptr,
                 kb_q, skbn, skbh, kb_tab, n_tab, lse_ptr, sln, slh,
                 k_rt, k_tab0, k_tab1, k_sub, k_fac, v_rt, v_tab0, v_tab1, v_sub, v_fac, part_ptr, ml_ptr,
                 S, N, HQ, qscale,
                 D: tl.constexpr, DP: tl.constexpr, T: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                 BQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 VOFF: tl.constexpr, DOT: tl.constexpr, RC: tl.constexpr, KB: tl.constexpr,
                 SINK: tl.constexpr, SOFF: tl.constexpr, SB: tl.constexpr, EXCL: tl.constexpr, LSE: tl.constexpr,
                 K_PREP: tl.constexpr, K_DEC: tl.constexpr, K_P: tl.constexpr, K_ROT: tl.constexpr,
                 K_SUB: tl.constexpr, K_FAC: tl.constexpr,
                 V_PREP: tl.constexpr, V_DEC: tl.constexpr, V_P: tl.constexpr, V_ROT: tl.constexpr,
                 V_SUB: tl.constexpr, V_FAC: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(2)
    s = _find_seq(qsl_ptr, pid, S, BQ)
    q_start = tl.load(qsl_ptr + s)
    q_len = tl.load(qsl_ptr + s + 1) - q_start
    t0 = pid - q_start if BQ == 1 else (pid - (q_start // BQ + s)) * BQ
    if t0 >= q_len:
        return
    ctx = tl.load(seqlen_ptr + s)
    gh = tl.program_id(1)  # head within the group: row of the stacked state
    kvh = tl.load(heads_ptr + gh)

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
    # The key codec's query transform: times its bound channel scale (a key shift needs nothing).
    if K_ROT:
        # The rotated query is rounded to the dot's 16 bits: bf16x3 is precise enough and lighter than tf32x3.
        XD: tl.constexpr = 0 if DOT == 0 else (3 if DOT == 3 else 2)
        q = cm.rotate_rows(q_rows, rmask, k_rt, D, DP, BM, RC, k_sub, k_fac + gh * D, False, K_FAC, False, XD)
    else:
        q = tl.load(q_rows + d[None, :], mask=rmask[:, None] & dm[None, :], other=0.0).to(tl.float32)
        q = cm.transform(q, d, dm, k_sub, k_fac + gh * D, False, K_FAC, False)
    q = q * qscale
    KXD: tl.constexpr = 0 if DOT == 0 else (3 if DOT == 3 else 2)  # the key bias's dot3 precision

    kv_end = ctx - q_len + tl.minimum(t0 + BQ, q_len)
    if EXCL:  # the tile's last row sees up to its own position, exclusive
        kv_end -= 1
    # Each sequence splits its own context (whole tiles per split): the host's split count is a launch
    # parameter only, so a CUDA graph captured at short contexts stays exact when it replays at long ones.
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BN) * BN
    lo = split * split_len
    hi = tl.minimum(kv_end, lo + split_len)
    m = tl.full((BM,), float("-inf"), tl.float32)
    l = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DP), tl.float32)
    head_off = kvh.to(tl.int64) * sH
    kctx = K_PREP(k_tab0, k_tab1, D, DP, K_P)
    vctx = V_PREP(v_tab0, v_tab1, D, DP, V_P)
    for n0 in range(lo, hi, BN):
        pos = n0 + tl.arange(0, BN)
        nmask = pos < hi
        if KB:  # before the tile's decode: the bias's temporaries are dead by the time the codes are live
            kb = _key_bias(kb_q + qtok[:, None] * skbn + qh[:, None] * skbh, rmask, kb_tab, n_tab, n0, D, DP, RC,
                           BM, BN, KXD)
        blk = tl.load(bt_ptr + s.to(tl.int64) * sbt + pos // T, mask=nmask, other=0).to(tl.int64)
        rows = cache_ptr + blk * sB + head_off + (pos % T).to(tl.int64) * sT
        kv, ks = K_DEC(rows, sC, nmask, D, kctx, k_tab0, k_tab1, DP, BN, K_P)
        if SINK > 0:  # each block's first tokens come from its bf16 sink records
            off = pos % T
            smask = nmask & (off < SINK)
            blockrow = cache_ptr + blk * sB + head_off
            if tl.max(smask.to(tl.int32), axis=0) > 0:
                kv = tl.where(smask[:, None], cm.load_sink(blockrow, off, smask, 0, sT, sC, D, DP, SOFF, SB), kv)
                ks = tl.where(smask, 1.0, ks)
        sc = _mm(q, tl.trans(kv), DOT) * ks[None, :]
        if KB:  # sinks included: their records hold centred keys too
            sc += kb
        if EXCL:
            ok = (pos[None, :] < qpos[:, None]) & nmask[None, :]
        else:
            ok = (pos[None, :] <= qpos[:, None]) & nmask[None, :]
        sc = tl.where(ok, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(sc - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        vv, vs = V_DEC(rows + VOFF * sC, sC, nmask, D, vctx, v_tab0, v_tab1, DP, BN, V_P)
        if SINK > 0:
            if tl.max(smask.to(tl.int32), axis=0) > 0:
                vv = tl.where(smask[:, None], cm.load_sink(blockrow, off, smask, 1, sT, sC, D, DP, SOFF, SB), vv)
                vs = tl.where(smask, 1.0, vs)
        acc = acc * alpha[:, None] + _mm(p * vs[None, :], vv, DOT)
        m = m_new

    if NUM_SPLITS == 1:
        o = acc / tl.maximum(l, 1e-30)[:, None]
        # a row that sees no key keeps its zeros (the value codec's output transform would add its shift)
        omask = rmask & (l > 0) if EXCL else rmask
        if LSE:
            tl.store(lse_ptr + qtok * sln + qh * slh, _lse(m, l), mask=rmask)
        _store_out(o, o_ptr + qtok[:, None] * son + qh[:, None] * soh, omask, v_rt, v_sub + gh * D, v_fac + gh * D,
                   D, DP, RC, V_ROT, V_SUB, V_FAC, DOT)
    else:
        row = (split * N + qtok) * HQ + qh  # partials are (NUM_SPLITS, N, HQ, ...)
        tl.store(part_ptr + row[:, None] * DP + d[None, :], acc, mask=rmask[:, None])
        tl.store(ml_ptr + row * 2, m, mask=rmask)
        tl.store(ml_ptr + row * 2 + 1, l, mask=rmask)


@triton.jit
def _lse(m, l):
    """Natural-log log-sum-exp of scores in exp2 units with running max m and sum l; -inf where l == 0."""
    return tl.where(l > 0, (m + tl.log2(tl.maximum(l, 1e-30))) * 0.6931471805599453, float("-inf"))


@triton.jit
def _merge_kernel(o_ptr, son, soh, part_ptr, ml_ptr, heads_ptr, vrt_ptr, v_sub, v_fac, lse_ptr, sln, slh, N, HQ,
                  D: tl.constexpr, DP: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, V_ROT: tl.constexpr, V_SUB: tl.constexpr, V_FAC: tl.constexpr,
                  DOT: tl.constexpr, RC: tl.constexpr, EXCL: tl.constexpr, LSE: tl.constexpr):
    """One program per (query token, KV head): merges the splits of the group's query heads. A split with
    nothing to attend (past the context, or emptied by ``EXCL``) holds (-inf, 0, 0) and weighs 0."""
    n = tl.program_id(0).to(tl.int64)
    gh = tl.program_id(1)
    kvh = tl.load(heads_ptr + gh)
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
    if LSE:
        tl.store(lse_ptr + n * sln + qh * slh, _lse(m, l), mask=gm)
    o = acc / tl.maximum(l, 1e-30)[:, None]
    omask = gm & (l > 0) if EXCL else gm  # a row with nothing to attend keeps its zeros
    _store_out(o, o_ptr + n * son + qh[:, None] * soh, omask, vrt_ptr, v_sub + gh * D, v_fac + gh * D, D, DP, RC,
               V_ROT, V_SUB, V_FAC, DOT)


class Tile(NamedTuple):
    bq: int  # query tokens per tile
    bm: int  # rows per tile: bq query tokens x the GQA group padded to a power of two (token-major)
    bn: int  # context tokens per tile
    warps: int
    stages: int


def launch_config(dp: int, gp: int, decode: bool, fp32: bool = False, split: bool = False,
                  biased_sinks: bool = False, biased_excl: bool = False) -> Tile:
    """Tile shape for padded head size ``dp``, padded GQA group ``gp``, float32 (else 16-bit) queries,
    split-K (``split``: decode steps and short-query batches), ``biased_sinks`` (a format with sink records
    and position-aware key centring's score bias: at head size 128 its 128-row tiles spill, so it takes 64) and
    ``biased_excl`` (the score bias with exact_self's exclusion and log-sum-exp: at head size 128 its 128-row
    tiles sit at 255 registers and TurboQuant 2.5 spilled with the lse store placed otherwise, so it takes 64).

    Prefill and chunked-prefill tiles hold 128 rows of (query token, GQA head) pairs, so one decoded K/V tile
    serves 128 query rows (32 tokens of a group of 4), and two warpgroups each own Hopper's 64-row wgmma
    shape (tiles under 64 rows fall back to the older mma with register operands and spill). The decoded
    tile is rounded to bf16 and staged in shared memory as the B operand. Context tiles are 32 tokens up to
    head size 64 and 16 at 128 (32 spills with sinks). Split short-query batches (speculative-decoding
    verification) at head size 128 use 64 rows: storing 128-row float32 partials spills with sinks, and their
    queries are short anyway. Two cases keep 16-row tiles: head size 256, where even 64 rows spill (the
    float32 accumulator alone is 128 registers a thread), and float32 queries, whose float32 operands double
    the registers. Decode steps use one token per tile. Every entry compiles for sm_90 without spills
    (docs/performance.md, test_prefill_tiles_compile_for_sm90_without_spills); none is timed yet."""
    bn = 32 if dp <= (64 if fp32 else 128) else 16
    if decode:
        return Tile(1, max(16, gp), bn, 8, 3)
    rows = 16 if fp32 or dp > 128 else 64 if (split or biased_sinks or biased_excl) and dp > 64 else 128
    bn = 32 if dp <= 64 else 16
    bq = max(1, rows // gp)
    return Tile(bq, max(16, bq * gp), bn, 8, 3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_key_bias(key_bias, query: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (bias queries, table) arguments: the validated ``key_bias``, or placeholders (unread)."""
    if key_bias is None:
        return query, query
    bq, table = key_bias
    n, hq, d = query.shape
    if bq.shape != (n, hq, d) or bq.dtype != torch.float32 or bq.device != query.device:
        raise ValueError(f"key_bias[0]: expected float32 ({n}, {hq}, {d}) on {query.device}, got {bq.dtype} "
                         f"{tuple(bq.shape)} on {bq.device}")
    if (table.dim() != 2 or table.shape[1] != d or table.shape[0] < positions or table.dtype != torch.float32
            or table.device != query.device):
        raise ValueError(f"key_bias[1]: expected float32 (>= {positions}, {d}) on {query.device} (one row per "
                         f"position the block table addresses), got {table.dtype} {tuple(table.shape)} on "
                         f"{table.device}")
    return (bq if bq.stride(-1) == 1 else bq.contiguous()), table.contiguous()


def paged_attention(query: torch.Tensor,  # (N, Hq, D)
                    cache: torch.Tensor,  # (B, Hk, T, C) uint8, any strides
                    block_table: torch.Tensor,  # (S, max_blocks) int
                    seq_lens: torch.Tensor,  # (S,) context length including this step's tokens
                    query_start_loc: torch.Tensor,  # (S + 1,) cumulative query lengths
                    fmt: KVFormat, *, scale: float, max_seq_len: int | None = None,
                    num_splits: int | None = None,
                    key_bias: tuple[torch.Tensor, torch.Tensor] | None = None,  # ((N, Hq, D), (C, D)) float32
                    exclude_self: bool = False,
                    lse: torch.Tensor | None = None,  # (N, Hq) float32, filled
                    ) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its packed context -> (N, Hq, D) in query's dtype.

    ``max_seq_len`` (a bound on ``seq_lens`` the engine knows on the host) picks the split-K count; without
    it the block table's width is used. Each sequence divides its own context among the splits in the
    kernel, so a stale bound (a replayed CUDA graph) costs speed, never correctness. ``num_splits``
    overrides the heuristic (any batch); tests use it on CPU. ``key_bias`` (position-aware key centring, see
    ``ops.paged_attention``): ``key_bias[0][row] . key_bias[1][p]`` is added to the score of the key at
    position p; the table must cover every position the block table addresses.

    ``exclude_self`` and ``lse`` (formats with ``exact_self``, see ``reference.paged_attention``): a row at
    position p attends j < p only (a row with none gets output 0), and ``lse`` receives each row's natural-log
    log-sum-exp of the scores it attended (-inf for a row with none).
    """
    n, hq, d = query.shape
    s = seq_lens.shape[0]
    out = torch.zeros(n, hq, d, dtype=query.dtype, device=query.device)
    if lse is not None:
        if lse.shape != (n, hq) or lse.dtype != torch.float32 or lse.device != query.device:
            raise ValueError(f"lse: expected float32 ({n}, {hq}) on {query.device}, got {lse.dtype} "
                             f"{tuple(lse.shape)} on {lse.device}")
        lse.fill_(-math.inf)  # rows no tile covers (past query_start_loc[-1]: padding) read as in the reference
    if n == 0 or s == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    t = cache.shape[2]
    kb_q, kb_tab = _check_key_bias(key_bias, query, block_table.shape[1] * t)
    hk = fmt.num_kv_heads
    grp = hq // hk
    gp = triton.next_power_of_2(grp)
    dp = max(16, triton.next_power_of_2(d))
    # N == S means one token per sequence in any batch vLLM builds: a decode step, one token per tile.
    decode = n == s
    fp32 = query.dtype == torch.float32
    biased_sinks = key_bias is not None and fmt.sink_tokens > 0
    biased_excl = key_bias is not None and exclude_self
    bq, bm, bn, warps, stages = launch_config(dp, gp, decode, fp32, biased_sinks=biased_sinks,
                                              biased_excl=biased_excl)
    max_ctx = block_table.shape[1] * t
    if max_seq_len is not None:
        max_ctx = max(1, min(max_ctx, int(max_seq_len)))
    # Split-K for decode steps and for batches of short queries (speculative-decoding verification, decodes
    # mixed with small chunks: at most SHORT_QUERY tokens per sequence on average), which would otherwise
    # give each sequence's long context to one program. Long prefills fill the GPU with query tiles.
    splits = 1
    if num_splits is not None:
        splits = num_splits
    elif decode or n <= SHORT_QUERY * s:
        splits = _num_splits(query.device, triton.cdiv(n, bq) * hk, max_ctx, bn)
    if splits > 1 and not decode:
        bq, bm, bn, warps, stages = launch_config(dp, gp, decode, fp32, split=True, biased_sinks=biased_sinks,
                                                  biased_excl=biased_excl)
    if splits > 1:  # short splits use short tiles, so every split gets work
        bn = max(16, min(bn, triton.next_power_of_2(triton.cdiv(max_ctx, splits))))
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
    lse_t = out if lse is None else lse  # a placeholder when LSE is off (unread)
    lse_st = (0, 0) if lse is None else (lse.stride(0), lse.stride(1))
    for g in fmt.groups:
        kp, kc, kh = side_args(g, "k", cache.device)
        vp, vc, vh = side_args(g, "v", cache.device)
        heads = heads_tensor(g.heads, cache.device)
        _attn_kernel[(n if bq == 1 else n // bq + s, len(g.heads), splits)](
            query, query.stride(0), query.stride(1), out, out.stride(0), out.stride(1),
            cache, *cache.stride(), bt, bt.stride(0), seq_lens, qsl, heads,
            kb_q, kb_q.stride(0), kb_q.stride(1), kb_tab, kb_tab.shape[0], lse_t, *lse_st, *kp, *vp, part, ml, s, n, hq,
            scale * LOG2E,
            D=d, DP=dp, T=t, G=grp, GP=gp, BQ=bq, BM=bm, BN=bn, NUM_SPLITS=splits,
            VOFF=g.key.nbytes, DOT=dot, RC=min(32, dp), KB=key_bias is not None, SINK=fmt.sink_tokens, SOFF=fmt.sink_offset,
            SB=max(1, fmt.sink_bytes), EXCL=exclude_self, LSE=lse is not None, K_PREP=kh.prep, K_DEC=kh.decode, **kc,
            V_PREP=vh.prep, V_DEC=vh.decode, **vc, num_warps=warps, num_stages=stages)
        if splits > 1:
            _merge_kernel[(n, len(g.heads))](
                out, out.stride(0), out.stride(1), part, ml, heads, vp[0], vp[3], vp[4], lse_t, *lse_st, n, hq,
                D=d, DP=dp, G=grp, BM=max(16, gp), NUM_SPLITS=splits, V_ROT=vc["V_ROT"], V_SUB=vc["V_SUB"],
                V_FAC=vc["V_FAC"], DOT=dot, RC=min(32, dp), EXCL=exclude_self, LSE=lse is not None)
    return out

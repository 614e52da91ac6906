"""Device helpers the generic store and attention kernels share: the rotation matmul with a codec's
per-head state transform folded into its input, and the sink records' bytes (``kv_format``)."""

import triton
import triton.language as tl

from vllm_kvq.codecs._triton import bf16_bits


@triton.jit
def to_bf16(x, XD: tl.constexpr):
    """float32 -> bf16 (XD 2) or, XD 3, float32 holding bf16-rounded values: the interpreter's casts to bf16
    truncate and its bf16 dot returns garbage, so tests emulate the rounding in integer arithmetic."""
    if XD == 3:
        return (bf16_bits(x) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def dot3(a, b, XD: tl.constexpr):
    """a @ b (float32 operands, float32 result) to about fp32 accuracy. XD 0: tf32x3 on tensor cores.
    XD 2/3: three bf16 products of the operands split as hi + lo (hi*hi + lo*hi + hi*lo, ~16 bits): two bf16
    halves of an (M, K) A operand take half the registers of tf32x3's two float32 halves, which is what
    keeps 64-128-row attention tiles free of spills."""
    if XD == 0:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        a_hi = to_bf16(a, XD)
        a_lo = to_bf16(a - a_hi.to(tl.float32), XD)
        b_hi = to_bf16(b, XD)
        b_lo = to_bf16(b - b_hi.to(tl.float32), XD)
        if XD == 3:
            y = tl.dot(a_hi, b_hi, input_precision="ieee")
            y = tl.dot(a_lo, b_hi, y, input_precision="ieee")
            return tl.dot(a_hi, b_lo, y, input_precision="ieee")
        else:
            return tl.dot(a_hi, b_lo, tl.dot(a_lo, b_hi, tl.dot(a_hi, b_hi)))


@triton.jit
def _rotate_chunk(y, c, rows, rmask, rt_ptr, D, DP: tl.constexpr, RC: tl.constexpr, sub_ptr, fac_ptr,
                  SUB: tl.constexpr, FAC: tl.constexpr, DIV: tl.constexpr, XD: tl.constexpr):
    d = tl.arange(0, DP)
    j = c + tl.arange(0, RC)
    jm = j < D
    xc = tl.load(rows + j[None, :], mask=rmask[:, None] & jm[None, :], other=0.0).to(tl.float32)
    xc = transform(xc, j, jm, sub_ptr, fac_ptr, SUB, FAC, DIV)
    rt = tl.load(rt_ptr + j[:, None] * D + d[None, :], mask=jm[:, None] & (d[None, :] < D), other=0.0)
    return y + dot3(xc, rt, XD)


@triton.jit
def rotate_rows(rows, rmask, rt_ptr, D, DP: tl.constexpr, BM: tl.constexpr, RC: tl.constexpr,
                sub_ptr, fac_ptr, SUB: tl.constexpr, FAC: tl.constexpr, DIV: tl.constexpr, XD: tl.constexpr = 0):
    """(BM, DP) float32 ``t(x) @ R^T`` of the rows at pointers ``rows`` (BM, 1), with the per-coordinate
    transform ``t(x) = (x - sub) / fac`` (DIV) or ``(x - sub) * fac`` applied as each slice is read (SUB/FAC
    say which parts exist). x is read RC coordinates at a time, so only an (RC, DP) slice of R^T is staged.
    XD picks ``dot3``'s precision: 0 (tf32x3) where codes are chosen from the result (store), bf16x3 where
    the result is rounded to bf16 anyway (attention queries)."""
    y = tl.zeros((BM, DP), tl.float32)
    if BM < 64:
        for c in tl.static_range(0, DP, RC):
            y = _rotate_chunk(y, c, rows, rmask, rt_ptr, D, DP, RC, sub_ptr, fac_ptr, SUB, FAC, DIV, XD)
    else:  # unrolled, the compiler overlaps the slices' loads and spills at 64+ rows (ptxas, sm_90)
        for c in range(0, DP, RC):
            y = _rotate_chunk(y, c, rows, rmask, rt_ptr, D, DP, RC, sub_ptr, fac_ptr, SUB, FAC, DIV, XD)
    return y


@triton.jit
def transform(x, j, jm, sub_ptr, fac_ptr, SUB: tl.constexpr, FAC: tl.constexpr, DIV: tl.constexpr):
    """x (BM, len(j)) at coordinates j -> ``(x - sub[j]) / fac[j]`` (DIV) or ``* fac[j]``, in float32 with
    correctly rounded division (the reference's torch ops)."""
    if SUB:
        x = x - tl.load(sub_ptr + j, mask=jm, other=0.0)[None, :]
    if FAC:
        f = tl.load(fac_ptr + j, mask=jm, other=1.0)[None, :]
        if DIV:
            x = tl.math.div_rn(x, tl.broadcast_to(f, x.shape))
        else:
            x = x * f
    return x


@triton.jit
def area_ptrs(blockrow, o, sT, sC, SOFF: tl.constexpr, SB: tl.constexpr):
    """Pointers to byte ``o`` (any shape, offset into a block's sink area) of the block whose (head's) first
    slot is ``blockrow`` (broadcastable to o): slot o // SB, byte SOFF + o % SB (see ``kv_format``)."""
    return blockrow + (o // SB) * sT + (SOFF + o % SB) * sC


@triton.jit
def store_sink(blockrow, off, smask, y, half: tl.constexpr, sT, sC, D, DP: tl.constexpr,
               SOFF: tl.constexpr, SB: tl.constexpr):
    """Writes bf16(y) (BN, DP) as the K (half 0) or V (half 1) part of the sink records ``off`` (BN,)."""
    d = tl.arange(0, DP)[None, :]
    m = smask[:, None] & (d < D)
    bits = bf16_bits(y)
    o = off[:, None] * (4 * D) + half * 2 * D + 2 * d
    tl.store(area_ptrs(blockrow[:, None], o, sT, sC, SOFF, SB), (bits & 0xFF).to(tl.uint8), mask=m)
    tl.store(area_ptrs(blockrow[:, None], o + 1, sT, sC, SOFF, SB), ((bits >> 8) & 0xFF).to(tl.uint8), mask=m)


@triton.jit
def load_sink(blockrow, off, smask, half: tl.constexpr, sT, sC, D, DP: tl.constexpr,
              SOFF: tl.constexpr, SB: tl.constexpr):
    """(BN, DP) float32 K (half 0) or V (half 1) of the sink records ``off`` (BN,) of the blocks at blockrow."""
    d = tl.arange(0, DP)[None, :]
    m = smask[:, None] & (d < D)
    o = off[:, None] * (4 * D) + half * 2 * D + 2 * d
    lo = tl.load(area_ptrs(blockrow[:, None], o, sT, sC, SOFF, SB), mask=m, other=0).to(tl.int32)
    hi = tl.load(area_ptrs(blockrow[:, None], o + 1, sT, sC, SOFF, SB), mask=m, other=0).to(tl.int32)
    return (lo | (hi << 8)).to(tl.int16).to(tl.bfloat16, bitcast=True).to(tl.float32)

"""Device helpers the generic store and attention kernels share: the rotation matmul with a codec's
per-head state transform folded into its input, and the sink records' bytes (``kv_format``)."""

import triton
import triton.language as tl

from vllm_kvq.codecs._triton import bf16_bits


@triton.jit
def rotate_rows(rows, rmask, rt_ptr, D, DP: tl.constexpr, BM: tl.constexpr, RC: tl.constexpr,
                sub_ptr, fac_ptr, SUB: tl.constexpr, FAC: tl.constexpr, DIV: tl.constexpr):
    """(BM, DP) float32 ``t(x) @ R^T`` of the rows at pointers ``rows`` (BM, 1), with the per-coordinate
    transform ``t(x) = (x - sub) / fac`` (DIV) or ``(x - sub) * fac`` applied as each slice is read (SUB/FAC
    say which parts exist). x is read RC coordinates at a time, so only an (RC, DP) slice of R^T is staged."""
    d = tl.arange(0, DP)
    y = tl.zeros((BM, DP), tl.float32)
    for c in tl.static_range(0, DP, RC):
        j = c + tl.arange(0, RC)
        jm = j < D
        xc = tl.load(rows + j[None, :], mask=rmask[:, None] & jm[None, :], other=0.0).to(tl.float32)
        xc = transform(xc, j, jm, sub_ptr, fac_ptr, SUB, FAC, DIV)
        rt = tl.load(rt_ptr + j[:, None] * D + d[None, :], mask=jm[:, None] & (d[None, :] < D), other=0.0)
        y += tl.dot(xc, rt, input_precision="tf32x3")
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

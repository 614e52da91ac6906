"""Device helpers the generic store and attention kernels share: the rotation matmul with a codec's
per-head state transform folded into its input, and the inverse rotation on the way out."""

import triton
import triton.language as tl


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

"""Device helpers shared by the store and attention kernels: byte-level loads and stores, and one codec's
encode (store side) and decode (attention side), selected by the compile-time constants of ``codec_spec``.

Cache rows are byte pointers with an arbitrary byte stride ``sC``; fp16 metadata may sit at odd offsets, so
16-bit values are always assembled from two byte loads.
"""

import triton
import triton.language as tl

KIND_TQ = tl.constexpr(0)
KIND_UNI = tl.constexpr(1)
KIND_BF16 = tl.constexpr(2)
KIND_FP16 = tl.constexpr(3)
MAX_REG_CODEBOOK = tl.constexpr(16)  # centroid tables up to 4-bit codes live in registers


@triton.jit
def load_u16(ptrs, sC, mask):
    lo = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    hi = tl.load(ptrs + sC, mask=mask, other=0).to(tl.int32)
    return lo | (hi << 8)


@triton.jit
def load_f16(ptrs, sC, mask):
    return load_u16(ptrs, sC, mask).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def store_u16(ptrs, sC, bits, mask):
    """Stores the low 16 bits of int32 ``bits`` little-endian."""
    tl.store(ptrs, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptrs + sC, ((bits >> 8) & 0xFF).to(tl.uint8), mask=mask)


@triton.jit
def f16_bits(x):
    """fp32 -> the int32 holding its fp16 bit pattern (round to nearest even)."""
    return x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def bf16_bits(x):
    """fp32 -> the int32 holding its bf16 bit pattern, rounded to nearest even in integer arithmetic
    (the Triton interpreter's own fp32 -> bf16 cast truncates)."""
    b = x.to(tl.int32, bitcast=True)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


@triton.jit
def load_codes(rows, d, sC, mask, B0: tl.constexpr, N0: tl.constexpr, B1: tl.constexpr, SEG1: tl.constexpr):
    """rows (BN, 1) byte pointers, d (1, DP) coordinates -> (BN, DP) int32 codes (packing.py's formula)."""
    in0 = d < N0
    bit = tl.where(in0, d * B0, SEG1 * 8 + (d - N0) * B1)
    nb = tl.where(in0, B0, B1)
    sh = bit % 8
    p = rows + (bit // 8) * sC
    lo = tl.load(p, mask=mask, other=0).to(tl.int32)
    # Only codes that straddle a byte boundary read the next byte (it may lie past the slot's end).
    hi = tl.load(p + sC, mask=mask & (sh + nb > 8), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> sh) & ((1 << nb) - 1)


@triton.jit
def load_codes_grouped(rows, sC, nmask, D, DP: tl.constexpr, BN: tl.constexpr,
                       B0: tl.constexpr, N0: tl.constexpr, B1: tl.constexpr, SEG1: tl.constexpr):
    """rows (BN,) byte pointers -> (BN, DP) int32 codes, the inverse of ``pack_store``: eight b-bit codes
    are exactly b bytes, so each group of eight is one load of b bytes into a 64-bit word. This reads each
    code byte once (``load_codes`` reads two bytes per code)."""
    BP: tl.constexpr = 8 if max(B0, B1) > 4 else (4 if max(B0, B1) > 2 else max(B0, B1))
    g3 = tl.arange(0, DP // 8)[None, :, None]
    m3 = tl.arange(0, BP)[None, None, :]
    in0 = g3 * 8 < N0
    b3 = tl.where(in0, B0, B1)
    start = tl.where(in0, g3 * B0, SEG1 + (g3 - N0 // 8) * B1)
    mask = nmask[:, None, None] & (g3 * 8 < D) & (m3 < b3)
    # Up to 4-bit codes a group fits 32 bits (the sign bit is masked off after the shifts).
    WT: tl.constexpr = tl.int32 if BP <= 4 else tl.int64
    byte = tl.load(rows[:, None, None] + (start + m3) * sC, mask=mask, other=0).to(WT)
    word = tl.sum(byte << (m3 * 8).to(WT), axis=2)  # (BN, DP // 8)
    i3 = tl.arange(0, 8)[None, None, :]
    bw = tl.where(tl.arange(0, DP // 8)[None, :, None] * 8 < N0, B0, B1)
    code = (word[:, :, None] >> (i3 * bw).to(WT)) & ((1 << bw) - 1).to(WT)
    return tl.reshape(code.to(tl.int32), (BN, DP))


@triton.jit
def codebook(cent_ptr, D, DP: tl.constexpr, W: tl.constexpr):
    """(W, DP) float32: row c holds code c's centroid at every coordinate; loaded once per program so the
    per-element lookup is a register gather, not a memory access. Wider tables than MAX_REG_CODEBOOK stay
    in memory (a (1, DP) placeholder is returned)."""
    if W > MAX_REG_CODEBOOK:
        table = tl.zeros((1, DP), tl.float32)
    else:
        c = tl.arange(0, W)[:, None]
        d = tl.arange(0, DP)[None, :]
        table = tl.load(cent_ptr + d * W + c, mask=d < D, other=0.0)
    return table


@triton.jit
def decode_tile(rows, d, sC, nmask, D, cent, cent_ptr, DP: tl.constexpr, BN: tl.constexpr,
                KIND: tl.constexpr, B0: tl.constexpr, N0: tl.constexpr, B1: tl.constexpr, SEG1: tl.constexpr,
                META: tl.constexpr, GS: tl.constexpr, W: tl.constexpr):
    """rows (BN,) byte pointers of one codec's packed vectors, cent its ``codebook`` (TurboQuant only)
    -> (vals (BN, DP), scale (BN,)) in the rotated
    domain with ``decoded = vals * scale[:, None]``. TurboQuant keeps its fp16 scale apart so attention can
    fold it into scores and probabilities; the other codecs return scale 1."""
    r = rows[:, None]
    dd = d[None, :]
    m2 = nmask[:, None] & (dd < D)
    if KIND == KIND_TQ:
        code = load_codes_grouped(rows, sC, nmask, D, DP, BN, B0, N0, B1, SEG1)
        if W <= MAX_REG_CODEBOOK:
            vals = tl.gather(cent, code, 0)
        else:  # 5- to 8-bit codebooks are too wide for registers: gather from the (L1-resident) table
            vals = tl.load(cent_ptr + dd * W + code, mask=m2, other=0.0)
        scale = load_f16(rows + META * sC, sC, nmask)
    elif KIND == KIND_UNI:
        code = load_codes_grouped(rows, sC, nmask, D, DP, BN, B0, N0, B1, SEG1)
        meta = r + (META + 4 * (dd // GS)) * sC
        vals = code.to(tl.float32) * load_f16(meta, sC, m2) + load_f16(meta + 2 * sC, sC, m2)
        scale = tl.full(rows.shape, 1.0, tl.float32)
    else:
        bits = load_u16(r + 2 * dd * sC, sC, m2).to(tl.int16)
        if KIND == KIND_BF16:
            vals = bits.to(tl.bfloat16, bitcast=True).to(tl.float32)
        else:
            vals = bits.to(tl.float16, bitcast=True).to(tl.float32)
        scale = tl.full(rows.shape, 1.0, tl.float32)
    return vals, scale


@triton.jit
def pack_store(code, rows, nmask, sC, D, DP: tl.constexpr, BN: tl.constexpr,
               B0: tl.constexpr, N0: tl.constexpr, B1: tl.constexpr, SEG1: tl.constexpr):
    """code (BN, DP) int32 -> bit-packed bytes at rows (BN,). Eight b-bit codes are exactly b bytes, so each
    group of eight coordinates becomes one 64-bit word whose low b bytes are stored."""
    c3 = tl.reshape(code.to(tl.int64), (BN, DP // 8, 8))
    i3 = tl.arange(0, 8)[None, None, :]
    g3 = tl.arange(0, DP // 8)[None, :, None]
    in0 = g3 * 8 < N0
    b3 = tl.where(in0, B0, B1)
    word = tl.sum(c3 << (i3 * b3).to(tl.int64), axis=2)  # disjoint bits: the sum is an OR
    start = tl.where(in0, g3 * B0, SEG1 + (g3 - N0 // 8) * B1)
    byte = ((word[:, :, None] >> (i3 * 8).to(tl.int64)) & 0xFF).to(tl.uint8)
    m3 = nmask[:, None, None] & (g3 * 8 < D) & (i3 < b3)
    tl.store(rows[:, None, None] + (start + i3) * sC, byte, mask=m3)


@triton.jit
def rotate_rows(rows, rmask, rt_ptr, D, DP: tl.constexpr, BM: tl.constexpr, RC: tl.constexpr):
    """(BM, DP) float32 ``x @ R^T`` of the rows at pointers ``rows`` (BM, 1), in float32 (ieee). x is read
    RC coordinates at a time, so only an (RC, DP) slice of R^T is staged in shared memory."""
    d = tl.arange(0, DP)
    y = tl.zeros((BM, DP), tl.float32)
    for c in tl.static_range(0, DP, RC):
        j = c + tl.arange(0, RC)
        xc = tl.load(rows + j[None, :], mask=rmask[:, None] & (j[None, :] < D), other=0.0).to(tl.float32)
        rt = tl.load(rt_ptr + j[:, None] * D + d[None, :], mask=(j[:, None] < D) & (d[None, :] < D), other=0.0)
        y += tl.dot(xc, rt, input_precision="tf32x3")
    return y


@triton.jit
def rne(x):
    """Round half to even (torch.round) for |x| < 2**22, independent of libdevice."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def encode_store(x, src, rows, nmask, sC, D, rt_ptr, cent_ptr, thr_ptr,
                 DP: tl.constexpr, BN: tl.constexpr, RC: tl.constexpr,
                 KIND: tl.constexpr, B0: tl.constexpr, N0: tl.constexpr, B1: tl.constexpr, SEG1: tl.constexpr,
                 META: tl.constexpr, GS: tl.constexpr, W: tl.constexpr, ROT: tl.constexpr, SMODE: tl.constexpr):
    """x (BN, DP) float32 (zero past D), read from row pointers src (BN, 1) -> the codec's packed bytes at
    rows (BN,) byte pointers."""
    d = tl.arange(0, DP)
    dm = d < D
    if KIND == KIND_BF16:
        bits = bf16_bits(x)
        store_u16(rows[:, None] + 2 * d[None, :] * sC, sC, bits, nmask[:, None] & dm[None, :])
    elif KIND == KIND_FP16:
        store_u16(rows[:, None] + 2 * d[None, :] * sC, sC, f16_bits(x), nmask[:, None] & dm[None, :])
    else:
        if ROT:
            y = rotate_rows(src, nmask, rt_ptr, D, DP, BN, RC)
        else:
            y = x
        if KIND == KIND_TQ:
            # Correctly rounded sqrt/div (GPUs default to approximate ones) keep the codes on torch's side of a threshold.
            norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
            y = tl.math.div_rn(y, tl.maximum(norm, 1e-30)[:, None])
            code = tl.zeros((BN, DP), tl.int32)
            for j in tl.static_range(W - 1):
                t = tl.load(thr_ptr + d * W + j, mask=dm, other=float("inf"))
                code += (y > t[None, :]).to(tl.int32)
            c = tl.load(cent_ptr + d[None, :] * W + code, mask=dm[None, :], other=0.0)
            if SMODE == 0:
                scale = norm
            else:
                c2 = tl.maximum(tl.sum(c * c, axis=1), 1e-30)
                if SMODE == 1:
                    scale = tl.math.div_rn(norm, tl.sqrt_rn(c2))
                else:
                    scale = tl.math.div_rn(norm * tl.sum(y * c, axis=1), c2)
            store_u16(rows + META * sC, sC, f16_bits(scale), nmask)
        else:
            qmax: tl.constexpr = (1 << B0) - 1
            grp = d // GS
            lo = tl.zeros((BN, DP), tl.float32)
            hi = tl.zeros((BN, DP), tl.float32)
            for g in tl.static_range(DP // GS):
                sel = (grp == g) & dm
                lo_g = tl.min(tl.where(sel[None, :], y, float("inf")), axis=1)
                hi_g = tl.max(tl.where(sel[None, :], y, float("-inf")), axis=1)
                lo = tl.where(sel[None, :], lo_g[:, None], lo)
                hi = tl.where(sel[None, :], hi_g[:, None], hi)
            s16 = tl.math.div_rn(hi - lo, tl.full((BN, DP), qmax, tl.float32)).to(tl.float16)
            mn16 = lo.to(tl.float16)
            s32 = s16.to(tl.float32)
            safe = tl.where(s32 > 0, s32, 1.0)
            q = rne(tl.math.div_rn(y - mn16.to(tl.float32), safe))
            code = tl.minimum(tl.maximum(q, 0.0), qmax).to(tl.int32)
            first = dm & (d % GS == 0)
            mrow = rows[:, None] + (META + 4 * grp[None, :]) * sC
            mmask = nmask[:, None] & first[None, :]
            store_u16(mrow, sC, s16.to(tl.int16, bitcast=True).to(tl.int32), mmask)
            store_u16(mrow + 2 * sC, sC, mn16.to(tl.int16, bitcast=True).to(tl.int32), mmask)
        pack_store(code, rows, nmask, sC, D, DP, BN, B0, N0, B1, SEG1)

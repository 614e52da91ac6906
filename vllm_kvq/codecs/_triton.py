"""Device helpers the codecs' Triton hooks share: byte-level loads and stores and exact bit packing.

Cache rows are byte pointers with an arbitrary byte stride ``sC``; fp16 metadata may sit at odd offsets, so
16-bit values are always assembled from two byte loads. Imported only by codec files' Triton hooks, so the
package imports without Triton.
"""

import triton
import triton.language as tl


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
def rne(x):
    """Round half to even (torch.round) for |x| < 2**22, independent of libdevice."""
    return (x + 12582912.0) - 12582912.0

"""Exact bit packing: a b-bit code costs b bits.

Code j of a row occupies bits [j*b, (j+1)*b) of a little-endian bit stream, so code j starts in byte
(j*b) // 8 at bit (j*b) % 8 and may straddle into the next byte. Kernels unpack with one 16-bit load:
``((byte[o // 8] | byte[o // 8 + 1] << 8) >> (o % 8)) & (2**b - 1)`` with ``o = j * b``.
"""

from __future__ import annotations

import torch


def packed_nbytes(n_codes: int, bits: int) -> int:
    return (n_codes * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (N, D) integer in [0, 2**bits) -> (N, ceil(D*bits/8)) uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n, d = codes.shape
    nbytes = packed_nbytes(d, bits)
    # 8 codes of b bits are exactly b bytes: build each group as one integer (at most 64 bits) and cut it
    # into bytes. Zero codes pad the last group; the bytes they alone occupy are dropped.
    groups = -(-d // 8)
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, groups * 8 - d)).reshape(n, groups, 8)
    # The bits of different codes are disjoint, so the sum is an OR; for b = 8 it wraps through the sign
    # bit of int64, which the byte extraction below (shift then mask) does not mind.
    word = (c << (torch.arange(8, device=codes.device, dtype=torch.int64) * bits)).sum(-1, keepdim=True)
    out = (word >> (torch.arange(bits, device=codes.device, dtype=torch.int64) * 8)) & 0xFF  # (N, groups, b)
    return out.reshape(n, groups * bits)[:, :nbytes].to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """packed (N, ceil(n_codes*bits/8)) uint8 -> (N, n_codes) int64 codes."""
    n = packed.shape[0]
    groups = -(-n_codes // 8)
    p = torch.nn.functional.pad(packed.to(torch.int64), (0, groups * bits - packed.shape[1])).reshape(n, groups, bits)
    word = (p << (torch.arange(bits, device=packed.device, dtype=torch.int64) * 8)).sum(-1, keepdim=True)
    codes = (word >> (torch.arange(8, device=packed.device, dtype=torch.int64) * bits)) & ((1 << bits) - 1)
    return codes.reshape(n, groups * 8)[:, :n_codes]

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
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = ((codes.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(n, d * bits)
    pad = (-stream.shape[1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    return (stream.reshape(n, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """packed (N, ceil(n_codes*bits/8)) uint8 -> (N, n_codes) int64 codes."""
    n = packed.shape[0]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(n, -1)[:, : n_codes * bits]
    weights = (1 << torch.arange(bits, device=packed.device, dtype=torch.int64))
    return (stream.reshape(n, n_codes, bits).to(torch.int64) * weights).sum(-1)

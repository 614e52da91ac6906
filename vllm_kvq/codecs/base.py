"""The vector-codec interface every codec implements.

A codec maps rows x (N, D) to fixed-size packed rows (N, nbytes) uint8. Attention never needs x itself:
it works in the codec's *rotated domain*, where ``decode(c) == unrotate(decode_rotated(c))``. Scores are
``rotate(q) . decode_rotated(k)`` (rotations are orthogonal, so inner products are unchanged) and value
sums are accumulated there and rotated back once per output row.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from vllm_kvq.codecs.rotation import Rotation


@dataclass(frozen=True)
class Field:
    """One contiguous piece of a packed row: name, byte offset, byte size, what it holds."""

    name: str
    offset: int
    nbytes: int
    what: str


class VectorCodec(abc.ABC):
    name: str  # registry name, e.g. "turboquant3"
    head_dim: int
    nbytes: int  # packed bytes per vector, metadata included
    bits_per_value: float  # code bits per coordinate, metadata excluded
    rotation: Rotation

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) float -> (N, nbytes) uint8."""

    @abc.abstractmethod
    def decode_rotated(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, nbytes) uint8 -> (N, D) float32 in the rotated domain."""

    @abc.abstractmethod
    def fields(self) -> list[Field]:
        """The byte layout of one packed row, in order."""

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, nbytes) uint8 -> (N, D) float32."""
        return self.rotation.inverse(self.decode_rotated(codes))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation.apply(x.float())

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return self.rotation.inverse(y.float())

    @property
    def key(self) -> tuple:
        """Codecs with equal keys encode identically (used to group heads)."""
        return (type(self).__name__, self.name, self.head_dim, self.params())

    def params(self) -> tuple:
        return ()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.head_dim:
            raise ValueError(f"{self.name}: expected x of shape (N, {self.head_dim}), got {tuple(x.shape)}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != self.nbytes:
            raise ValueError(
                f"{self.name}: expected codes uint8 (N, {self.nbytes}), got {codes.dtype} {tuple(codes.shape)}")

    def describe(self) -> str:
        lines = [f"{self.name} (head_dim={self.head_dim}, {self.nbytes} bytes/vector, rotation={self.rotation.kind})"]
        for f in self.fields():
            lines.append(f"  [{f.offset:4d}:{f.offset + f.nbytes:4d}] {f.name:<10} {f.what}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{self.name} d={self.head_dim} {self.nbytes}B>"


def fp16_to_bytes(x: torch.Tensor) -> torch.Tensor:
    """x (N,) float -> (N, 2) uint8, little-endian fp16."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def bytes_to_fp16(b: torch.Tensor) -> torch.Tensor:
    """b (N, 2) uint8 -> (N,) float32."""
    return bytes_view(b, torch.float16).reshape(-1).float()


def bytes_view(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """b (N, k * itemsize) uint8 -> (N, k) ``dtype``, reinterpreting the bytes.

    A fresh copy, not ``b.contiguous()``: a one-row slice of a packed row is already "contiguous" but may
    start at an odd byte (a V code after a 27-byte K code), and ``view`` needs an aligned storage offset.
    """
    return b.clone(memory_format=torch.contiguous_format).view(dtype)

"""Seeded random rotations shared by the codecs.

Power-of-two head dims use a randomized Hadamard transform, ``R x = H (s * x) / sqrt(d)`` with random signs
``s`` and the Walsh-Hadamard matrix ``H`` applied by the fast transform (d log d). Other head dims (80, 96,
112, ...) use a seeded Haar-random orthogonal matrix. Both are exactly orthogonal, so ``R^T`` inverts ``R``,
and both are deterministic functions of (dim, seed), so every process builds the same rotation.
"""

from __future__ import annotations

import functools
import math

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform over the last dim (a power of two)."""
    d = x.shape[-1]
    if not is_power_of_two(d):
        raise ValueError(f"fwht needs a power-of-two size, got {d}")
    lead = x.shape[:-1]
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.reshape(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, d)


class Rotation:
    """An orthogonal map of R^d: ``apply`` rotates rows, ``inverse`` undoes it."""

    kind: str = "identity"

    def __init__(self, dim: int):
        self.dim = dim

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y

    @functools.cached_property
    def _matrix_cpu(self) -> torch.Tensor:
        return self.apply(torch.eye(self.dim, dtype=torch.float64)).T.contiguous()

    def matrix(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense R (D, D) with ``apply(x) == x @ R.T``; what kernels load."""
        return self._matrix_cpu.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"


class HadamardRotation(Rotation):
    kind = "hadamard"

    def __init__(self, dim: int, seed: int):
        super().__init__(dim)
        g = torch.Generator().manual_seed(seed)
        self.signs = (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).to(torch.float32)
        self._norm = 1.0 / math.sqrt(dim)

    def apply(self, x):
        return fwht(x * self.signs.to(device=x.device, dtype=x.dtype)) * self._norm

    def inverse(self, y):
        return fwht(y) * self._norm * self.signs.to(device=y.device, dtype=y.dtype)


class DenseRotation(Rotation):
    kind = "haar"

    def __init__(self, dim: int, seed: int):
        super().__init__(dim)
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        # Sign-fix the QR factor so the matrix is Haar distributed and independent of the LAPACK build.
        self._q = (q * torch.sign(torch.diagonal(r))).contiguous()
        self._q32 = self._q.to(torch.float32)

    def apply(self, x):
        return x @ self._q32.to(device=x.device, dtype=x.dtype).T

    def inverse(self, y):
        return y @ self._q32.to(device=y.device, dtype=y.dtype)

    @functools.cached_property
    def _matrix_cpu(self):
        return self._q


@functools.lru_cache(maxsize=None)
def make_rotation(dim: int, seed: int, kind: str = "auto") -> Rotation:
    """kind: "auto" (Hadamard for powers of two, Haar otherwise), "hadamard", "haar" or "identity"."""
    if kind == "auto":
        kind = "hadamard" if is_power_of_two(dim) else "haar"
    if kind == "hadamard":
        return HadamardRotation(dim, seed)
    if kind == "haar":
        return DenseRotation(dim, seed)
    if kind == "identity":
        return Rotation(dim)
    raise ValueError(f"unknown rotation kind {kind!r}; allowed: auto, hadamard, haar, identity")

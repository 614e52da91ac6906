"""Lloyd-Max scalar codebooks for one coordinate of a uniformly random unit vector in R^d.

After a random rotation each coordinate of x/||x|| follows the density f(t) ~ (1 - t^2)^((d-3)/2) on
[-1, 1]. The MSE-optimal b-bit quantizer of that marginal (Lloyd 1982, Max 1960) is computed here by the
Lloyd iteration on a fine grid in float64, and cached in memory and under ``~/.cache/vllm_kvq``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

_GRID = 1 << 17
_ITERS = 2000
_VERSION = 1


@dataclass(frozen=True)
class Codebook:
    dim: int
    bits: int
    centroids: tuple[float, ...]  # 2**bits values, increasing
    thresholds: tuple[float, ...]  # 2**bits - 1 midpoints between neighbouring centroids
    mse: float  # expected squared error of one coordinate; D_mse of the whole vector = dim * mse

    def centroids_tensor(self, device="cpu") -> torch.Tensor:
        return torch.tensor(self.centroids, dtype=torch.float32, device=device)

    def thresholds_tensor(self, device="cpu") -> torch.Tensor:
        return torch.tensor(self.thresholds, dtype=torch.float32, device=device)


def _density(dim: int):
    # Support is effectively |t| < ~12/sqrt(d) for large d; the grid covers it densely.
    half = min(1.0, 14.0 / math.sqrt(dim))
    t = torch.linspace(-half, half, _GRID, dtype=torch.float64)
    w = torch.clamp(1.0 - t * t, min=0.0) ** ((dim - 3) / 2.0)
    return t, w / w.sum()


def _solve(dim: int, bits: int) -> Codebook:
    t, w = _density(dim)
    levels = 1 << bits
    sigma = 1.0 / math.sqrt(dim)
    # Start from equal-mass quantiles.
    cdf = torch.cumsum(w, 0)
    qs = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    c = t[torch.searchsorted(cdf, qs).clamp(max=_GRID - 1)].clone()
    c[0], c[-1] = min(c[0].item(), -sigma), max(c[-1].item(), sigma)
    for _ in range(_ITERS):
        thr = (c[1:] + c[:-1]) / 2
        idx = torch.bucketize(t, thr)
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, w)
        moment = torch.zeros(levels, dtype=torch.float64).index_add_(0, idx, w * t)
        new = torch.where(mass > 0, moment / mass.clamp(min=1e-300), c)
        new = (new - new.flip(0)) / 2  # the density is symmetric; keep the codebook exactly so
        if torch.max(torch.abs(new - c)).item() < 1e-12:
            c = new
            break
        c = new
    thr = (c[1:] + c[:-1]) / 2
    idx = torch.bucketize(t, thr)
    mse = float((w * (t - c[idx]) ** 2).sum())
    return Codebook(dim, bits, tuple(c.tolist()), tuple(thr.tolist()), mse)


def _cache_dir() -> Path:
    """``$VLLM_KVQ_CACHE``, else ``$XDG_CACHE_HOME/vllm_kvq`` (default ``~/.cache/vllm_kvq``)."""
    if os.environ.get("VLLM_KVQ_CACHE"):
        return Path(os.environ["VLLM_KVQ_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm_kvq"


@functools.lru_cache(maxsize=None)
def lloyd_max_codebook(dim: int, bits: int) -> Codebook:
    if dim < 4 or not 1 <= bits <= 8:
        raise ValueError(f"need dim >= 4 and bits in 1..8, got dim={dim}, bits={bits}")
    path = _cache_dir() / f"lloyd_max_v{_VERSION}_d{dim}_b{bits}.json"
    try:
        data = json.loads(path.read_text())
        return Codebook(dim, bits, tuple(data["centroids"]), tuple(data["thresholds"]), data["mse"])
    except (OSError, ValueError, KeyError):
        pass
    book = _solve(dim, bits)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"centroids": book.centroids, "thresholds": book.thresholds, "mse": book.mse}))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs recomputation
    return book

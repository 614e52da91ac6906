"""FibQuant codebooks: MSE-optimised codebooks for a block of k coordinates of a random unit vector in R^d.

After a random rotation a unit vector's k-block y (k consecutive coordinates) is not a product source: its
direction is uniform on the k-sphere, independent of its radius, and r^2 = ||y||^2 follows
Beta(k/2, (d-k)/2) (the "spherical-Beta" source of Lee & Kim, "FibQuant", 2026). The codebook of 2**bits
codewords is built here in two steps:

1. Initialisation: S shells at Beta-quantile radii (the mid-quantiles of r), each holding quasi-uniform
   directions: evenly spaced angles (k = 2), a Fibonacci sphere (k = 3) or the Roberts-Kronecker sequence
   pushed through the Gaussian inverse CDF and normalised (k >= 4). Points are shared between shells in
   proportion to the high-rate optimal point density p^(k/(k+2)) integrated over each shell.
2. Lloyd (k-means) on samples of the exact source (blocks of Gaussian vectors normalised in R^d), from
   several initialisations (different shell counts and direction rotations); the restart with the lowest
   distortion on an independent validation sample wins.

Everything is seeded by (d, k, bits), so every process computes the same codebook; the result is rounded to
float32 (so float64 summation-order noise cannot reach the stored table) and cached in memory and, like the
Lloyd-Max tables, under ``~/.cache/vllm_kvq``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass

import torch

from vllm_kvq.codecs.lloyd_max import _cache_dir

_VERSION = 1
_MAX_ITERS = 80
_GRID = 1 << 16
MAX_BLOCK = 16
MAX_INDEX_BITS = 12  # 4096 codewords: an exact nearest-codeword search per block stays cheap


@dataclass(frozen=True)
class VectorCodebook:
    dim: int  # d, the dimension of the unit vector the block is cut from
    block: int  # k, coordinates per block
    bits: int  # index bits per block; 2**bits codewords
    codewords: tuple[tuple[float, ...], ...]  # (2**bits, k)
    mse: float  # expected squared error per coordinate (D_mse of a whole unit vector = dim * mse)

    def tensor(self, device="cpu") -> torch.Tensor:
        """(2**bits, k) float32."""
        return torch.tensor(self.codewords, dtype=torch.float32, device=device)


def _seed(dim: int, block: int, bits: int) -> int:
    return 1_000_003 * dim + 1009 * block + bits


def sample_blocks(dim: int, block: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n samples (n, k) float32 of one k-block of a uniformly random unit vector in R^dim.

    Every block of a rotated unit vector has this law, so all dim // k blocks of each vector are used.
    """
    per = dim // block
    m = -(-n // per)
    g = torch.randn(m, dim, generator=gen, dtype=torch.float64)
    u = g / torch.linalg.vector_norm(g, dim=1, keepdim=True)
    return u[:, :per * block].reshape(-1, block)[:n].to(torch.float32).contiguous()


def _radius_grid(dim: int, block: int):
    """(r grid, density of r on it); r^2 ~ Beta(k/2, (d-k)/2), so p(r) ~ r^(k-1) (1 - r^2)^((d-k-2)/2)."""
    hi = min(1.0, 14.0 / math.sqrt(dim) + math.sqrt(block / dim))
    r = torch.linspace(0.0, hi, _GRID, dtype=torch.float64)[1:]
    logp = (block - 1) * torch.log(r) + (dim - block - 2) / 2.0 * torch.log1p(-(r * r).clamp(max=1 - 1e-15))
    p = torch.exp(logp - logp.max())
    return r, p / p.sum()


def _shells(dim: int, block: int, n_words: int, n_shells: int) -> list[tuple[float, int]]:
    """[(radius, points)] for S shells of equal probability, points summing to n_words."""
    r, p = _radius_grid(dim, block)
    cdf = torch.cumsum(p, 0)
    edges = torch.searchsorted(cdf, torch.arange(1, n_shells, dtype=torch.float64) / n_shells)
    bounds = [0, *edges.tolist(), len(r)]
    mids = torch.searchsorted(cdf, (torch.arange(n_shells, dtype=torch.float64) + 0.5) / n_shells)
    radii = r[mids.clamp(max=len(r) - 1)].tolist()
    # High-rate theory: optimal point density ~ p(x)^(k/(k+2)) in R^k; with p(x) = p(r) / (area r^(k-1)) the
    # number of points in a shell is proportional to the integral of p(r)^(k/(k+2)) r^(2(k-1)/(k+2)) dr.
    a = block / (block + 2.0)
    dens = p.pow(a) * r.pow(2.0 * (block - 1) / (block + 2.0))
    w = torch.tensor([float(dens[bounds[i]:bounds[i + 1]].sum()) for i in range(n_shells)], dtype=torch.float64)
    share = w / w.sum() * (n_words - n_shells)  # one point per shell guaranteed, the rest by share
    counts = [1 + int(math.floor(s)) for s in share.tolist()]
    rest = sorted(range(n_shells), key=lambda i: -(share[i] - math.floor(share[i])))
    for i in rest[:n_words - sum(counts)]:
        counts[i] += 1
    return list(zip(radii, counts))


def _kronecker_alpha(k: int) -> torch.Tensor:
    """Roberts' generalised golden ratio: alpha_j = phi_k^-(j+1), phi_k the root > 1 of x^(k+1) = x + 1."""
    phi = 2.0
    for _ in range(64):
        phi = (1.0 + phi) ** (1.0 / (k + 1))
    return torch.tensor([phi ** -(j + 1) for j in range(k)], dtype=torch.float64)


def quasi_uniform_directions(k: int, m: int, offset: float = 0.0) -> torch.Tensor:
    """(m, k) float64 unit vectors spread quasi-uniformly over the sphere S^(k-1)."""
    i = torch.arange(m, dtype=torch.float64)
    if k == 1:
        return torch.where(i % 2 == 0, 1.0, -1.0).unsqueeze(1)
    if k == 2:
        t = 2 * math.pi * (i + 0.5 + offset) / m
        return torch.stack((torch.cos(t), torch.sin(t)), dim=1)
    if k == 3:
        z = 1 - 2 * (i + 0.5) / m
        golden = math.pi * (3 - math.sqrt(5))
        t = golden * i + 2 * math.pi * offset
        s = torch.sqrt((1 - z * z).clamp(min=0))
        return torch.stack((s * torch.cos(t), s * torch.sin(t), z), dim=1)
    pts = torch.frac(0.5 + offset + (i + 1).unsqueeze(1) * _kronecker_alpha(k))
    g = torch.special.ndtri(pts.clamp(1e-9, 1 - 1e-9))
    return g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp(min=1e-12)


def initial_codebook(dim: int, block: int, n_words: int, n_shells: int, gen: torch.Generator | None = None
                     ) -> torch.Tensor:
    """(n_words, k) float32: Beta-quantile radii times quasi-uniform directions, each shell randomly rotated
    (by ``gen``; identity without one) so that neighbouring shells do not line up."""
    out = []
    for s, (rad, cnt) in enumerate(_shells(dim, block, n_words, n_shells)):
        d = quasi_uniform_directions(block, cnt, offset=0.5 * (s % 2) / max(cnt, 1))
        if gen is not None and block > 1:
            q, rr = torch.linalg.qr(torch.randn(block, block, generator=gen, dtype=torch.float64))
            d = d @ (q * torch.sign(torch.diagonal(rr))).T
        out.append(rad * d)
    return torch.cat(out).to(torch.float32)


def nearest(x: torch.Tensor, words: torch.Tensor, chunk: int = 1 << 15) -> torch.Tensor:
    """Index (n,) of the codeword nearest to each row of x (n, k); ties go to the lower index."""
    half_sq = 0.5 * (words * words).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = torch.argmin(half_sq - x[s:s + chunk] @ words.T, dim=1)
    return out


def distortion(x: torch.Tensor, words: torch.Tensor) -> float:
    """Mean squared error per coordinate of x (n, k) quantized to its nearest codeword."""
    return float(((x - words[nearest(x, words)]) ** 2).sum(1).mean()) / x.shape[1]


def lloyd(x: torch.Tensor, words: torch.Tensor, max_iters: int = _MAX_ITERS, tol: float = 1e-6) -> torch.Tensor:
    """k-means from ``words`` on samples x (n, k); an empty cell is moved to the worst-coded sample."""
    words = words.clone()
    n_words = words.shape[0]
    last = math.inf
    for _ in range(max_iters):
        idx = nearest(x, words)
        err = ((x - words[idx]) ** 2).sum(1)
        cur = float(err.mean())
        count = torch.bincount(idx, minlength=n_words).to(x.dtype)
        sums = torch.zeros(words.shape, dtype=torch.float64).index_add_(0, idx, x.double())
        empty = (count == 0).nonzero().flatten()
        mean = (sums / count.clamp(min=1).unsqueeze(1)).to(words.dtype)
        words = torch.where(count.unsqueeze(1) > 0, mean, words)
        if len(empty):
            worst = torch.topk(err, len(empty)).indices
            words[empty] = x[worst]
        elif last - cur <= tol * cur:
            break
        last = cur
    return words


def _shell_counts(dim: int, block: int, n_words: int) -> list[int]:
    """Shell counts to try as restarts: around the count that gives each shell ~ n^((k-1)/k) directions."""
    if block == 1:
        return [n_words // 2]
    base = max(1, round(n_words ** (1.0 / block)))
    if block == 2:
        base = max(1, round(math.sqrt(n_words) / 2))
    cands = sorted({max(1, min(n_words, c)) for c in (base, base - 1, base + 1, 2 * base)})
    return cands[:4]


def _solve(dim: int, block: int, bits: int) -> VectorCodebook:
    n_words = 1 << bits
    gen = torch.Generator().manual_seed(_seed(dim, block, bits))
    # Stage 1: every restart on a small sample (~40 per cell), judged on an independent one. Stage 2: the
    # winner refined on a larger sample (~160 per cell), which is where the last digits of the MSE come from.
    small = int(min(max(40 * n_words, 8_000), 160_000))
    large = int(min(max(160 * n_words, 40_000), 300_000))
    train, valid = sample_blocks(dim, block, small, gen), sample_blocks(dim, block, small, gen)
    best, best_mse = None, math.inf
    for shells in _shell_counts(dim, block, n_words):
        words = lloyd(train, initial_codebook(dim, block, n_words, shells, gen), max_iters=40, tol=1e-4)
        mse = distortion(valid, words)
        if mse < best_mse:
            best, best_mse = words, mse
    words = lloyd(sample_blocks(dim, block, large, gen), best, max_iters=20, tol=1e-5)
    words32 = words.to(torch.float32)
    mse = distortion(sample_blocks(dim, block, large, gen), words32)
    return VectorCodebook(dim, block, bits, tuple(tuple(w) for w in words32.tolist()), mse)


def check_params(dim: int, block: int, bits: int) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"fibquant block must be an integer in 1..{MAX_BLOCK}, got {block!r}")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_INDEX_BITS:
        raise ValueError(f"fibquant index bits per block must be an integer in 1..{MAX_INDEX_BITS} "
                         f"(at most {1 << MAX_INDEX_BITS} codewords), got {bits!r}")
    if dim < block + 3:
        raise ValueError(f"fibquant needs head_dim >= block + 3, got head_dim={dim}, block={block}")


@functools.lru_cache(maxsize=None)
def fib_codebook(dim: int, block: int, bits: int) -> VectorCodebook:
    """The codebook of 2**bits codewords for k-blocks of a random unit vector in R^dim (cached)."""
    check_params(dim, block, bits)
    path = _cache_dir() / f"fibquant_v{_VERSION}_d{dim}_k{block}_b{bits}.json"
    try:
        data = json.loads(path.read_text())
        words = tuple(tuple(float(v) for v in w) for w in data["codewords"])
        if len(words) == 1 << bits and all(len(w) == block for w in words):
            return VectorCodebook(dim, block, bits, words, float(data["mse"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    book = _solve(dim, block, bits)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"codewords": book.codewords, "mse": book.mse}))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs recomputation
    return book

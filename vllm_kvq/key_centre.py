"""Position-aware key centring: the calibrated key mean follows RoPE.

RoPE turns the mean of post-RoPE keys with the position: a model whose pre-RoPE keys have mean ``mu`` hands
the cache keys whose mean at position p is ``R_p mu`` (each rotate-half pair (i, i + R/2) turned by
``p * freq[i]``). A fixed post-RoPE mean is right only for the positions it was measured on (the needle study
in docs/quality.md: retrieval at 4K fell from 8/10 to 4/10 with a mean measured on positions 0-1023), and
keeping only the pairs that barely turn gives most of the gain away. So the cache stores

    k' = (k - m_p) / s,   m_p = R_p mu   for the key at position p,

the mean turned to the key's own position (every pair keeps its mean). Unlike a fixed mean, ``q . m_p``
differs between positions, so attention adds it back as a score bias per (query row, key), computed from two
small factors:

    q . R_p mu = sum_i A_i cos(p freq_i) + B_i sin(p freq_i),
    A_i = q_i mu_i + q_{i+h} mu_{i+h},   B_i = q_{i+h} mu_i - q_i mu_{i+h}    (h = R/2)

i.e. ``bias(row, p) = bias_query(row) . table[p]`` with ``table[p] = [cos(p freq), sin(p freq), 0...]``,
shared by every layer and head (and every format with the same frequencies). The store subtracts ``m_p``
computed from the same table row, so the shift and its bias are the same numbers and the scores are exact up
to the codec's error at every position. Everything depends only on a key's position: a prefix-cache hit and a
chunked prefill see the cold run's bytes and scores. Channels past the rotary ones (partial rotary) keep the
fixed mean, which softmax ignores.

An earlier version turned the mean to the start of each 16-position chunk (one bias per 16 keys, fast pairs
without a mean); per position measured better through vLLM (docs/quality.md, "Per-position key centring,
served") at one D-length product per (row, key), which the CPU kernels evaluate 16 keys at a time from one
table row and the first 16 (angle addition, csrc/cpu/key_bias.h).
"""

from __future__ import annotations

import math

import torch

_TABLES: dict[tuple, torch.Tensor] = {}  # (freq bytes, head_dim, device) -> the shared position table


def position_table(freq: torch.Tensor, head_dim: int, positions: int, device) -> torch.Tensor:
    """(>= positions, head_dim) float32: row p = [cos(p freq), sin(p freq), 0 for unrotated channels], from
    float64 angles; one table per (frequencies, head size, device), grown by powers of two."""
    f = freq.double().cpu()
    key = (f.numpy().tobytes(), head_dim, str(device))
    t = _TABLES.get(key)
    if t is None or t.shape[0] < positions:
        n = 1 << max(10, math.ceil(math.log2(max(positions, 1))))
        half = f.numel()
        ang = torch.arange(n, dtype=torch.float64)[:, None] * f[None]
        t = torch.zeros(n, head_dim, dtype=torch.float32)
        t[:, :half] = torch.cos(ang).float()
        t[:, half:2 * half] = torch.sin(ang).float()
        t = t.to(device)
        _TABLES[key] = t
    return t


class KeyRope:
    """The per-layer state of position-aware key centring: the pre-RoPE key mean of every KV head and the
    model's RoPE frequencies."""

    def __init__(self, mu: torch.Tensor,  # (Hk, D) pre-RoPE key mean
                 freq: torch.Tensor):  # (R/2,) angular frequency of each rotate-half pair
        hk, d = mu.shape
        half = freq.numel()
        if freq.dim() != 1 or not 0 < 2 * half <= d:
            raise ValueError(f"rope frequencies: expected (R/2,) with 0 < R <= head_size={d}, got {tuple(freq.shape)}")
        self.freq = freq.double().cpu()
        self.half, self.rot, self.head_dim = half, 2 * half, d
        self.mu = mu.float().cpu().contiguous()
        self._on_device: dict[str, torch.Tensor] = {}  # mu and the bias matrix, per device

    def table(self, positions: int, device) -> torch.Tensor:
        """(>= positions, D) float32: row p = [cos(p freq), sin(p freq), 0 for unrotated channels]. The shared
        table, held here too, so the per-call path (every layer, every step) neither hashes the frequencies
        nor looks it up."""
        key = "table:" + str(device)
        t = self._on_device.get(key)
        if t is None or t.shape[0] < positions:
            t = self._on_device[key] = position_table(self.freq, self.head_dim, positions, device)
        return t

    def fixed_mean(self, device) -> torch.Tensor | None:
        """(Hk, D) the part of the mean that attention does not add back (its channels past the rotary ones,
        zeros on the rotary ones); None for a fully rotary head. Scores, and so exact_self's own-token score,
        leave it out: it shifts every score of a query alike."""
        if self.rot == self.head_dim:
            return None
        key = "fixed" + str(device)
        if key not in self._on_device:
            m = self.mu.clone()
            m[:, :self.rot] = 0
            self._on_device[key] = m.to(device)
        return self._on_device[key]

    def centre(self, positions: torch.Tensor, max_position: int | None = None) -> torch.Tensor:
        """(N, Hk, D) float32 mean of the keys at ``positions`` (N,): ``R_p mu`` plus the unrotated channels'
        fixed mean. ``max_position``: a host-side bound of the positions (the store passes one), so the vLLM
        hot path reads no device value back (CUDA graphs capture the store); None reads the largest position."""
        pos = positions.long()
        if max_position is None:
            max_position = int(pos.max()) if pos.numel() else 0
        # m = mu * [cos, cos, 1] + [-mu_b, mu_a, 0] * [sin, sin, 0]: the rotate-half turn of every pair
        # (a, b) by the position's angle, the unrotated channels' fixed mean kept
        cs = self._turn_table(max_position + 1, pos.device)[pos]  # (N, 2, D)
        mu, mu_turned = self._turn_factors(pos.device)  # (Hk, D) each
        return mu * cs[:, None, 0] + mu_turned * cs[:, None, 1]

    def _turn_table(self, positions: int, device) -> torch.Tensor:
        """(>= positions, 2, D) float32: [cos, cos, 1 ...] and [sin, sin, 0 ...] of each position's angles (the
        numbers of ``table``), shared like the table (one per frequencies, head size and device, replaced when
        the table grows)."""
        mine = "turntable:" + str(device)
        t = self._on_device.get(mine)
        if t is not None and t.shape[0] >= positions:
            return t
        base = self.table(positions, device)
        key = ("turn", self.freq.numpy().tobytes(), self.head_dim, str(device))
        t = _TABLES.get(key)
        if t is None or t.shape[0] != base.shape[0]:
            h, r = self.half, self.rot
            t = torch.zeros(base.shape[0], 2, self.head_dim, dtype=torch.float32, device=base.device)
            t[:, 0, :h] = t[:, 0, h:r] = base[:, :h]
            t[:, 0, r:] = 1
            t[:, 1, :h] = t[:, 1, h:r] = base[:, h:r]
            _TABLES[key] = t
        self._on_device[mine] = t
        return t

    def _turn_factors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = "turn" + str(device)
        if key not in self._on_device:
            h, r = self.half, self.rot
            turned = torch.zeros_like(self.mu)
            turned[:, :h] = -self.mu[:, h:r]
            turned[:, h:r] = self.mu[:, :h]
            self._on_device[key] = (self.mu.to(device), turned.to(device))
        return self._on_device[key]

    def bias_query(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """(N, Hq, D) float32 with ``bias_query . table[c] = scale * q . m_c`` for every query row.

        [A, B] is linear in q: one batched product with a per-head (D, D) matrix, made once per device (this
        runs on every attention call of every layer)."""
        n, hq, d = query.shape
        hk = self.mu.shape[0]
        w = self._bias_matrix(query.device, scale)  # (Hk, D, D), scaled
        # one (N * G, D) @ (D, D) product per KV head. (torch.matmul's broadcast of (N, Hk, G, D) @ (Hk, D, D)
        # would expand w to (N, Hk, D, D) first: a 2048-token prefill copied 100 MB per layer.)
        g = hq // hk
        q = query.float().view(n, hk, g, d).transpose(0, 1).reshape(hk, n * g, d)
        return torch.bmm(q, w).view(hk, n, g, d).transpose(0, 1).reshape(n, hq, d)

    def _bias_matrix(self, device, scale: float = 1.0) -> torch.Tensor:
        key = f"w{device}/{scale!r}"
        if key not in self._on_device:
            hk, d = self.mu.shape
            h, r = self.half, self.rot
            mu = self.mu.double()
            w = torch.zeros(hk, d, d, dtype=torch.float64)
            i = torch.arange(h)
            # A_i = q_i mu_i + q_{i+h} mu_{i+h};  B_i = q_{i+h} mu_i - q_i mu_{i+h}
            w[:, i, i] = mu[:, :h]
            w[:, i + h, i] = mu[:, h:r]
            w[:, i + h, i + h] = mu[:, :h]
            w[:, i, i + h] = -mu[:, h:r]
            self._on_device[key] = (w * scale).float().to(device)
        return self._on_device[key]


def rotate(x: torch.Tensor,  # (..., N, D)
           positions: torch.Tensor,  # (N,)
           freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate-half RoPE of ``x`` by its positions (``inverse``: undo it), in float64 angles."""
    half, rot = freq.numel(), 2 * freq.numel()
    ang = positions.double()[:, None] * freq.double()[None]
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    if inverse:
        sin = -sin
    out = x.clone()
    a, b = x[..., :half], x[..., half:rot]
    out[..., :half] = a * cos - b * sin
    out[..., half:rot] = b * cos + a * sin
    return out

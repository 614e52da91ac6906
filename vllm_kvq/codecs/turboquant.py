"""TurboQuant (MSE variant): random rotation + Lloyd-Max scalar codes + one fp16 scale.

Paper: Zandieh et al., "TurboQuant: Online Vector Quantization with Near-optimal Distortion Rate" (2025).
A vector x is rotated (y = R x / ||x||, so every coordinate follows the Beta-type marginal of a random unit
vector), each coordinate is replaced by the index of its Lloyd-Max cell for that marginal, and a single
fp16 scale restores the magnitude. The same codec serves keys and values (upstream vLLM uses a uniform code
for values, which costs it quality at 3 bits).

Fractional rates (b + 0.5 bits): the first half of the rotated coordinates get b+1 bits, the second half
b bits. After a random rotation all coordinates are exchangeable, so a fixed split is as good as any.

Scale modes (what the fp16 stores; decode is always ``scale * c`` with c the centroid vector). Measured on
1e5 Gaussian vectors at d=128 (docs/codecs.md has the full table), relative distortion at 2 / 3 / 4 bits:
- "norm": ||x||. The paper's estimator; D_mse = the Lloyd-Max value (0.1160 / 0.0340 / 0.0093).
- "corrected": ||x|| / ||c||, so the decoded vector has exactly the input's norm. Since E||c||^2 = 1 - D,
  this inflates by 1/sqrt(1 - D): +2.4 % at 2 bits (about D + D^2/4), but -0.5 % / -1.5 % at 3 / 4 bits,
  and it removes the norm shrinkage that biases attention on real, anisotropic keys.
- "lsq" (default): <y, c> ||x|| / ||c||^2, the least-squares scale of c against the rotated input.
  Never worse than "norm" for any vector (the error drops by (<u,c> - ||c||^2)^2 / ||c||^2):
  -0.7 % / -1.3 % / -1.8 % (d=64: -1.4 % at 2 bits).

Packed row: [codes, ceil(bits*D/8) bytes][scale, fp16].

Kernel hooks (bottom of this file): decode gathers centroids (from registers up to 4-bit codes) and keeps
the fp16 scale apart, so attention folds it into the score column and the probabilities; encode counts
thresholds passed per coordinate (torch.bucketize) and bit-packs eight codes at a time.
"""

from __future__ import annotations

import math

import torch

from vllm_kvq.codecs.base import Field, TritonHooks, VectorCodec, bytes_to_fp16, fp16_to_bytes
from vllm_kvq.codecs.lloyd_max import lloyd_max_codebook
from vllm_kvq.codecs.packing import pack_bits, packed_nbytes, unpack_bits
from vllm_kvq.codecs.rotation import make_rotation

SCALE_MODES = ("norm", "corrected", "lsq")


class TurboQuantCodec(VectorCodec):
    def __init__(self, head_dim: int, bits: float, *, seed: int = 0, scale_mode: str = "lsq",
                 rotation: str = "auto", name: str | None = None):
        if (isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits * 2 != int(bits * 2)
                or not 1 <= bits <= 8):
            raise ValueError(f"turboquant bits must be in 1..8 in steps of 0.5, got {bits!r}")
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode {scale_mode!r} not allowed; allowed: {', '.join(SCALE_MODES)}")
        if bits != int(bits) and head_dim % 2:
            raise ValueError(f"fractional bits need an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.bits = bits
        self.seed = seed
        self.scale_mode = scale_mode
        self.name = name or f"turboquant{bits:g}"
        self.rotation = make_rotation(head_dim, seed, rotation)
        lo = int(math.floor(bits))
        # (bits, number of coordinates) per segment, in coordinate order.
        if bits == lo:
            self.segments = [(lo, head_dim)]
        else:
            self.segments = [(lo + 1, head_dim // 2), (lo, head_dim - head_dim // 2)]
        self.codebooks = [lloyd_max_codebook(head_dim, b) for b, _ in self.segments]
        self.segment_nbytes = [packed_nbytes(n, b) for b, n in self.segments]
        self.code_nbytes = sum(self.segment_nbytes)
        self.nbytes = self.code_nbytes + 2
        self.bits_per_value = sum(b * n for b, n in self.segments) / head_dim
        self._tables: dict = {}

    def params(self):
        return (self.bits, self.seed, self.scale_mode, self.rotation.kind)

    def fields(self):
        out, off = [], 0
        for (b, n), nb in zip(self.segments, self.segment_nbytes):
            out.append(Field(f"codes{b}", off, nb, f"{n} x {b}-bit Lloyd-Max indices, bit-packed"))
            off += nb
        out.append(Field("scale", off, 2, f"fp16 scale ({self.scale_mode})"))
        return out

    def _book(self, i: int, device):
        k = (i, str(device))
        if k not in self._tables:
            cb = self.codebooks[i]
            self._tables[k] = (cb.centroids_tensor(device), cb.thresholds_tensor(device))
        return self._tables[k]

    def centroid_table(self, device="cpu") -> torch.Tensor:
        """(D, 2**max_bits) float32: the centroid of code j at coordinate i (kernels gather from it)."""
        width = 1 << max(b for b, _ in self.segments)
        table = torch.zeros(self.head_dim, width, dtype=torch.float32)
        start = 0
        for i, (b, n) in enumerate(self.segments):
            table[start:start + n, : 1 << b] = self.codebooks[i].centroids_tensor()
            start += n
        return table.to(device)

    def codec_tables(self):
        """(centroids (D, W), thresholds (D, W)) with W = 2**max_bits. Thresholds of coordinate i are padded
        with +inf past its segment's 2**b - 1 entries, so ``code = sum_j (y > thr[i, j])`` is bucketize."""
        cent = self.centroid_table()
        thr = torch.full(cent.shape, float("inf"), dtype=torch.float32)
        start = 0
        for book, (b, n) in zip(self.codebooks, self.segments):
            thr[start:start + n, : (1 << b) - 1] = book.thresholds_tensor()
            start += n
        return cent, thr

    def native_params(self) -> list[int]:
        """[b0, n0, b1, seg1, meta, w, rotate, scale_mode]: the layout constants every kernel needs."""
        (b0, n0), (b1, _) = self.segments[0], self.segments[-1]
        return [b0, n0, b1, self.segment_nbytes[0], self.code_nbytes, 1 << max(b0, b1),
                int(self.rotation.kind != "identity"), SCALE_MODES.index(self.scale_mode)]

    def triton_hooks(self):
        # The store hook packs codes eight at a time (eight b-bit codes are exactly b bytes), so every
        # segment must hold a multiple of 8 coordinates: head_dim % 16 == 0 covers every vLLM head size.
        if any(n % 8 for _, n in self.segments):
            raise NotImplementedError(f"{self.name}: code segments of {[n for _, n in self.segments]} coordinates "
                                      f"are not multiples of 8")
        b0, n0, b1, seg1, meta, w, _, smode = self.native_params()
        return TritonHooks(_tq_prep, _tq_decode, _tq_encode, (b0, n0, b1, seg1, meta, w, smode))

    def encode(self, x):
        self._check_input(x)
        x = x.float()
        norm = torch.linalg.vector_norm(x, dim=-1)
        y = self.rotation.apply(x) / norm.clamp(min=1e-30).unsqueeze(-1)
        parts, c_parts, start = [], [], 0
        for i, (b, n) in enumerate(self.segments):
            cent, thr = self._book(i, x.device)
            seg = y[:, start:start + n].contiguous()
            idx = torch.bucketize(seg, thr)
            parts.append(pack_bits(idx, b))
            c_parts.append(cent[idx])
            start += n
        c = torch.cat(c_parts, dim=1)
        if self.scale_mode == "norm":
            scale = norm
        else:
            c2 = (c * c).sum(-1).clamp(min=1e-30)
            scale = norm / c2.sqrt() if self.scale_mode == "corrected" else norm * (y * c).sum(-1) / c2
        parts.append(fp16_to_bytes(scale))
        return torch.cat(parts, dim=1)

    def unpack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, nbytes) -> (N, D) int64 Lloyd-Max indices."""
        out, off = [], 0
        for (b, n), nb in zip(self.segments, self.segment_nbytes):
            out.append(unpack_bits(codes[:, off:off + nb], b, n))
            off += nb
        return torch.cat(out, dim=1)

    def boundary_distance(self, x, codes):
        x = x.double()
        y = x @ self.rotation.matrix(dtype=torch.float64).T / x.norm(dim=1, keepdim=True).clamp(min=1e-30)
        thr = torch.full((self.head_dim, (1 << max(b for b, _ in self.segments)) - 1), float("nan"),
                         dtype=torch.float64)
        start = 0
        for book, (b, n) in zip(self.codebooks, self.segments):
            thr[start:start + n, : (1 << b) - 1] = torch.tensor(book.thresholds, dtype=torch.float64)
            start += n
        dist = (y[:, :, None] - thr[None]).abs().nan_to_num(float("inf")).amin(-1)
        return self.unpack_codes(codes), dist

    def decode_rotated(self, codes):
        self._check_codes(codes)
        idx = self.unpack_codes(codes)
        c_parts, start = [], 0
        for i, (b, n) in enumerate(self.segments):
            cent, _ = self._book(i, codes.device)
            c_parts.append(cent[idx[:, start:start + n]])
            start += n
        c = torch.cat(c_parts, dim=1)
        scale = bytes_to_fp16(codes[:, self.code_nbytes:self.code_nbytes + 2])
        return c * scale.unsqueeze(-1)


try:
    import triton
    import triton.language as tl

    from vllm_kvq.codecs import _triton as _t
except ModuleNotFoundError:  # the reference needs no Triton
    triton = None

if triton is not None:
    @triton.jit
    def _tq_prep(tab0, tab1, D, DP: tl.constexpr, P: tl.constexpr):
        """(W, DP) centroids: row c holds code c's centroid at every coordinate, loaded once per program so
        the per-element lookup is a register gather. Wider tables stay in memory (placeholder returned)."""
        W: tl.constexpr = P[5]
        if W > 16:
            table = tl.zeros((1, DP), tl.float32)
        else:
            c = tl.arange(0, W)[:, None]
            d = tl.arange(0, DP)[None, :]
            table = tl.load(tab0 + d * W + c, mask=d < D, other=0.0)
        return table

    @triton.jit
    def _tq_decode(rows, sC, nmask, D, ctx, tab0, tab1, DP: tl.constexpr, BN: tl.constexpr, P: tl.constexpr):
        B0: tl.constexpr = P[0]
        N0: tl.constexpr = P[1]
        B1: tl.constexpr = P[2]
        SEG1: tl.constexpr = P[3]
        META: tl.constexpr = P[4]
        W: tl.constexpr = P[5]
        code = _t.load_codes_grouped(rows, sC, nmask, D, DP, BN, B0, N0, B1, SEG1)
        if W <= 16:
            vals = tl.gather(ctx, code, 0)
        else:  # 5- to 8-bit codebooks are too wide for registers: gather from the (L1-resident) table
            dd = tl.arange(0, DP)[None, :]
            vals = tl.load(tab0 + dd * W + code, mask=nmask[:, None] & (dd < D), other=0.0)
        scale = _t.load_f16(rows + META * sC, sC, nmask)
        return vals, scale

    @triton.jit
    def _tq_encode(x, y, rows, nmask, sC, D, tab0, tab1, DP: tl.constexpr, BN: tl.constexpr, P: tl.constexpr):
        B0: tl.constexpr = P[0]
        N0: tl.constexpr = P[1]
        B1: tl.constexpr = P[2]
        SEG1: tl.constexpr = P[3]
        META: tl.constexpr = P[4]
        W: tl.constexpr = P[5]
        SMODE: tl.constexpr = P[6]
        d = tl.arange(0, DP)
        dm = d < D
        # Correctly rounded sqrt/div (GPUs default to approximate ones) keep codes on torch's side of a threshold.
        norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
        y = tl.math.div_rn(y, tl.maximum(norm, 1e-30)[:, None])
        code = tl.zeros((BN, DP), tl.int32)
        for j in tl.static_range(W - 1):
            t = tl.load(tab1 + d * W + j, mask=dm, other=float("inf"))
            code += (y > t[None, :]).to(tl.int32)
        c = tl.load(tab0 + d[None, :] * W + code, mask=dm[None, :], other=0.0)
        if SMODE == 0:
            scale = norm
        else:
            c2 = tl.maximum(tl.sum(c * c, axis=1), 1e-30)
            if SMODE == 1:
                scale = tl.math.div_rn(norm, tl.sqrt_rn(c2))
            else:
                scale = tl.math.div_rn(norm * tl.sum(y * c, axis=1), c2)
        _t.store_u16(rows + META * sC, sC, _t.f16_bits(scale), nmask)
        _t.pack_store(code, rows, nmask, sC, D, DP, BN, B0, N0, B1, SEG1)

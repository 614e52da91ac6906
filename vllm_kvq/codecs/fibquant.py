"""FibQuant: random rotation + a vector codebook per block of k rotated coordinates + one fp16 scale.

Paper: Lee & Kim, "FibQuant: Universal Vector Quantization for Random-Access KV-Cache Compression" (2026).
TurboQuant's interface is kept (y = R x / ||x|| with the same seeded Rotation, one fp16 scale per vector),
but instead of one Lloyd-Max index per coordinate, each block of k consecutive rotated coordinates gets the
index of its nearest codeword in one shared codebook of 2**(k*b) points, matched to the law of a k-block
of a random unit vector in R^D (``fib_codebook``). A vector code beats the scalar one at the same rate:
its cells can be rounder than cubes and its points follow the block's density, which is not a product of
the marginals. It also gives every rate with k*b an integer: 0.75 bits is k = 8 with 64 codewords.

Codebook sizes: presets keep 2**(k*b) <= 256. Then the per-query table of inner products with every
codeword (D/k x 2**(k*b) floats, 16 KB at D = 64, k = 4) fits in on-chip memory for table-lookup scores,
the exact nearest-codeword search on store costs D * 2**(k*b) multiply-adds per vector (as much as a
D x 256 matmul), and a codebook is built in seconds. 2.5 and 3 bits therefore use k = 2 (32 and 64
codewords); k = 4 would need 1024 and 4096 codewords. ``block`` may be set explicitly, up to 12 index bits.

Scale modes as in TurboQuant (decode is ``scale * c``, c the concatenated codewords); "lsq" (default)
stores <y, c> ||x|| / ||c||^2, the least-squares scale of c against the rotated unit vector.

Packed row: [indices: D/k codes of k*b bits, an exact little-endian bit stream][scale, fp16]. Index j
occupies bits [j*L, (j+1)*L), L = k*b; for L <= 8 this is exactly ``packing.pack_bits``.

Kernel hooks (bottom of this file): decode reads each coordinate's block index with one <= 3-byte window
load and gathers the codeword coordinate from the (L1-resident) codebook; encode is the exact
nearest-codeword search, one pass over the codebook with the reference's criterion
(0.5 ||w||^2 - <y, w>, first minimum wins), then packs the indices byte by byte.
"""

from __future__ import annotations

import torch

from vllm_kvq.codecs.base import Field, TritonHooks, VectorCodec, bytes_to_fp16, fp16_to_bytes
from vllm_kvq.codecs.fib_codebook import MAX_BLOCK, MAX_INDEX_BITS, check_params, fib_codebook, nearest
from vllm_kvq.codecs.packing import pack_bits, packed_nbytes, unpack_bits
from vllm_kvq.codecs.rotation import make_rotation
from vllm_kvq.codecs.turboquant import SCALE_MODES

DEFAULT_MAX_INDEX_BITS = 8
_BLOCKS = (8, 4, 2, 1)


def default_block(bits: float) -> int:
    """The largest k in 8, 4, 2, 1 with k * bits a whole number of index bits <= 8 (<= 256 codewords)."""
    for k in _BLOCKS:
        idx = bits * k
        if idx == int(idx) and 1 <= idx <= DEFAULT_MAX_INDEX_BITS:
            return k
    raise ValueError(f"fibquant: no block size in {_BLOCKS} gives bits={bits!r} a whole number of index bits "
                     f"<= {DEFAULT_MAX_INDEX_BITS}; pass block= explicitly (index bits block*bits <= {MAX_INDEX_BITS})")


def pack_indices(idx: torch.Tensor, width: int) -> torch.Tensor:
    """idx (N, m) integer in [0, 2**width) -> (N, ceil(m*width/8)) uint8, index j at bits [j*width, (j+1)*width)."""
    if width <= 8:
        return pack_bits(idx, width)
    n, m = idx.shape
    shifts = torch.arange(width, device=idx.device, dtype=torch.int64)
    bits = ((idx.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(n, m * width)
    nbytes = packed_nbytes(m, width)
    bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - m * width)).reshape(n, nbytes, 8)
    return (bits << torch.arange(8, device=idx.device, dtype=torch.int64)).sum(-1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, width: int, m: int) -> torch.Tensor:
    """packed (N, ceil(m*width/8)) uint8 -> (N, m) int64."""
    if width <= 8:
        return unpack_bits(packed, width, m)
    n = packed.shape[0]
    bits = (packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    bits = bits.reshape(n, -1)[:, :m * width].reshape(n, m, width)
    return (bits << torch.arange(width, device=packed.device, dtype=torch.int64)).sum(-1)


class FibQuantCodec(VectorCodec):
    def __init__(self, head_dim: int, bits: float, *, block: int | None = None, seed: int = 0,
                 scale_mode: str = "lsq", rotation: str = "auto", name: str | None = None):
        if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not 0 < bits <= 8:
            raise ValueError(f"fibquant bits must be a number in (0, 8], got {bits!r}")
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode {scale_mode!r} not allowed; allowed: {', '.join(SCALE_MODES)}")
        k = default_block(bits) if block is None else block
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_BLOCK:
            raise ValueError(f"fibquant block must be an integer in 1..{MAX_BLOCK}, got {k!r}")
        index_bits = bits * k
        if index_bits != int(index_bits):
            raise ValueError(f"fibquant: block * bits must be a whole number of index bits, got block={k} x "
                             f"bits={bits:g} = {index_bits:g}")
        check_params(head_dim, k, int(index_bits))
        if head_dim % k:
            raise ValueError(f"fibquant: head_dim {head_dim} is not a multiple of the block size {k}")
        self.head_dim = head_dim
        self.bits = bits
        self.block = k
        self.index_bits = int(index_bits)
        self.seed = seed
        self.scale_mode = scale_mode
        self.name = name or f"fibquant{bits:g}"
        self.rotation = make_rotation(head_dim, seed, rotation)
        self.codebook = fib_codebook(head_dim, k, self.index_bits)
        self.num_blocks = head_dim // k
        self.code_nbytes = packed_nbytes(self.num_blocks, self.index_bits)
        self.nbytes = self.code_nbytes + 2
        self.bits_per_value = self.index_bits / k
        self.design_dmse = head_dim * self.codebook.mse  # unit-vector distortion the codebook was built for
        self._words: dict = {}

    def params(self):
        return (self.bits, self.block, self.seed, self.scale_mode, self.rotation.kind)

    def fields(self):
        return [Field("codes", 0, self.code_nbytes,
                      f"{self.num_blocks} x {self.index_bits}-bit indices into {1 << self.index_bits} codewords "
                      f"of {self.block} coordinates, bit-packed"),
                Field("scale", self.code_nbytes, 2, f"fp16 scale ({self.scale_mode})")]

    def codeword_table(self, device="cpu") -> torch.Tensor:
        """(2**index_bits, block) float32: the codebook kernels gather from."""
        key = str(device)
        if key not in self._words:
            self._words[key] = self.codebook.tensor(device)
        return self._words[key]

    def codec_tables(self):
        """(codewords (2**L * k,) row-major, half squared norms (2**L,)): what the Triton hooks read. The half
        norms are computed exactly as ``fib_codebook.nearest`` computes them, so the search compares the same
        numbers."""
        words = self.codeword_table()
        return words.reshape(-1).contiguous(), 0.5 * (words * words).sum(1)

    def triton_hooks(self):
        if self.block & (self.block - 1):
            raise NotImplementedError(f"{self.name}: the Triton hooks need a power-of-two block size, got "
                                      f"{self.block}")
        return TritonHooks(_fib_prep, _fib_decode, _fib_encode,
                           (self.block, self.index_bits, 1 << self.index_bits, self.num_blocks, self.code_nbytes,
                            SCALE_MODES.index(self.scale_mode), 1 << (self.code_nbytes - 1).bit_length()))

    def boundary_distance(self, x, codes):
        """Per coordinate: the index of its block's codeword (repeated over the block) and the distance of
        the block to the boundary of that codeword's Voronoi cell, min over other codewords w_j of
        (|y - w_j|^2 - |y - w_i|^2) / (2 |w_j - w_i|), in units of the normalised rotated vector."""
        x = x.double()
        n = x.shape[0]
        y = x @ self.rotation.matrix(dtype=torch.float64).T / x.norm(dim=1, keepdim=True).clamp(min=1e-30)
        words = self.codeword_table().double()
        blocks = y.reshape(-1, self.block)
        idx = self.unpack_codes(codes).reshape(-1)
        d2 = torch.cdist(blocks, words) ** 2
        wi = words[idx]
        gap = (words.unsqueeze(0) - wi.unsqueeze(1)).norm(dim=-1)  # (n*m, 2**L)
        dist = (d2 - d2.gather(1, idx[:, None])) / (2 * gap.clamp(min=1e-300))
        dist = dist.masked_fill(gap == 0, float("inf")).amin(1).clamp(min=0)
        rep = lambda t: t.reshape(n, self.num_blocks, 1).expand(n, self.num_blocks, self.block).reshape(n, -1)  # noqa: E731
        return rep(idx), rep(dist)

    def encode(self, x):
        self._check_input(x)
        x = x.float()
        n = x.shape[0]
        norm = torch.linalg.vector_norm(x, dim=-1)
        y = self.rotation.apply(x) / norm.clamp(min=1e-30).unsqueeze(-1)
        words = self.codeword_table(x.device)
        idx = nearest(y.reshape(-1, self.block), words).reshape(n, self.num_blocks)
        c = words[idx].reshape(n, self.head_dim)
        if self.scale_mode == "norm":
            scale = norm
        else:
            c2 = (c * c).sum(-1).clamp(min=1e-30)
            scale = norm / c2.sqrt() if self.scale_mode == "corrected" else norm * (y * c).sum(-1) / c2
        return torch.cat((pack_indices(idx, self.index_bits), fp16_to_bytes(scale)), dim=1)

    def unpack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, nbytes) -> (N, D/k) int64 codeword indices."""
        return unpack_indices(codes[:, :self.code_nbytes], self.index_bits, self.num_blocks)

    def decode_rotated(self, codes):
        self._check_codes(codes)
        n = codes.shape[0]
        c = self.codeword_table(codes.device)[self.unpack_codes(codes)].reshape(n, self.head_dim)
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
    def _fib_prep(tab0, tab1, D, DP: tl.constexpr, P: tl.constexpr):
        """Nothing to stage: the codebook (<= 4096 x k floats) is gathered from memory, where it stays in L1."""
        return tl.zeros((1, DP), tl.float32)

    @triton.jit
    def _fib_decode(rows, sC, nmask, D, ctx, tab0, tab1, DP: tl.constexpr, BN: tl.constexpr, P: tl.constexpr):
        K: tl.constexpr = P[0]
        L: tl.constexpr = P[1]
        META: tl.constexpr = P[4]
        d = tl.arange(0, DP)[None, :]
        m = nmask[:, None] & (d < D)
        o = (d // K) * L  # first bit of this coordinate's block index
        first = o >> 3
        r = rows[:, None]
        # An index spans at most 3 bytes (bit offset <= 7, L <= 12); the bytes after the codes are the
        # row's own fp16 scale, so the window never leaves the row and its extra bits are masked off.
        word = tl.load(r + first * sC, mask=m, other=0).to(tl.int32)
        word |= tl.load(r + (first + 1) * sC, mask=m, other=0).to(tl.int32) << 8
        if L > 9:
            word |= tl.load(r + (first + 2) * sC, mask=m, other=0).to(tl.int32) << 16
        idx = (word >> (o & 7)) & ((1 << L) - 1)
        vals = tl.load(tab0 + idx * K + d % K, mask=m, other=0.0)
        scale = _t.load_f16(rows + META * sC, sC, nmask)
        return vals, scale

    @triton.jit
    def _fib_encode(x, y, rows, nmask, sC, D, tab0, tab1, DP: tl.constexpr, BN: tl.constexpr, P: tl.constexpr):
        K: tl.constexpr = P[0]
        L: tl.constexpr = P[1]
        NW: tl.constexpr = P[2]
        M: tl.constexpr = P[3]
        META: tl.constexpr = P[4]
        SMODE: tl.constexpr = P[5]
        MP: tl.constexpr = DP // K
        norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
        y = tl.math.div_rn(y, tl.maximum(norm, 1e-30)[:, None])
        y3 = tl.reshape(y, (BN, MP, K))
        kk = tl.arange(0, K)
        best = tl.full((BN, MP), float("inf"), tl.float32)
        bidx = tl.zeros((BN, MP), tl.int32)
        for c in range(NW):  # exact search; strict < keeps the first minimum, as torch.argmin does
            w = tl.load(tab0 + c * K + kk)
            s = tl.load(tab1 + c) - tl.sum(y3 * w[None, None, :], axis=2)
            better = s < best
            best = tl.where(better, s, best)
            bidx = tl.where(better, c, bidx)
        c3 = tl.load(tab0 + bidx[:, :, None] * K + kk[None, None, :])
        d = tl.arange(0, DP)
        cw = tl.where((d < D)[None, :], tl.reshape(c3, (BN, DP)), 0.0)
        if SMODE == 0:
            scale = norm
        else:
            c2 = tl.maximum(tl.sum(cw * cw, axis=1), 1e-30)
            if SMODE == 1:
                scale = tl.math.div_rn(norm, tl.sqrt_rn(c2))
            else:
                scale = tl.math.div_rn(norm * tl.sum(y * cw, axis=1), c2)
        _t.store_u16(rows + META * sC, sC, _t.f16_bits(scale), nmask)
        # Byte b of the bit stream holds bits [8b, 8b + 8): pieces of at most T consecutive indices.
        NB: tl.constexpr = META
        NBP: tl.constexpr = P[6]
        T: tl.constexpr = (8 + L - 1) // L + 1
        b = tl.arange(0, NBP)[None, :]
        j0 = (8 * b) // L
        acc = tl.zeros((BN, NBP), tl.int32)
        for t in tl.static_range(T):
            j = j0 + t
            code = tl.gather(bidx, tl.broadcast_to(tl.minimum(j, MP - 1), (BN, NBP)), 1)
            off = j * L - 8 * b  # where index j starts relative to this byte (negative: before it)
            piece = tl.where(off >= 0, code << tl.maximum(off, 0), code >> tl.maximum(-off, 0))
            acc |= tl.where(j < M, piece, 0) & 0xFF
        tl.store(rows[:, None] + b * sC, acc.to(tl.uint8), mask=nmask[:, None] & (b < NB))

"""Uniform asymmetric integer codes per token and group: the baseline every comparison needs.

Each group of ``group_size`` coordinates stores fp16 (scale, min) and b-bit integers
q = round((x - min) / scale); decode is ``q * scale + min``. This is vLLM's int4/int8 per-token-head
scheme (and KIVI's per-token value code). With ``rotate=True`` a randomized Hadamard transform is applied
first (QuaRot-style), which spreads outlier channels over all coordinates.

Packed row: [codes, ceil(bits*D/8) bytes][scale, min: fp16 each, per group].
"""

from __future__ import annotations

import torch

from vllm_kvq.codecs.base import Field, TritonHooks, VectorCodec, bytes_view
from vllm_kvq.codecs.packing import pack_bits, packed_nbytes, unpack_bits
from vllm_kvq.codecs.rotation import make_rotation


class UniformCodec(VectorCodec):
    def __init__(self, head_dim: int, bits: int, *, group_size: int | None = None, rotate: bool = False,
                 seed: int = 0, name: str | None = None):
        # bool and float are rejected explicitly: True == 1 and 4.0 == 4 would pass ``in`` and break packing.
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in (2, 3, 4, 8):
            raise ValueError(f"uniform bits must be one of 2, 3, 4, 8, got {bits!r}")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size <= 0):
            raise ValueError(f"group_size must be a positive int dividing head_dim {head_dim}, got {group_size!r}")
        if not isinstance(rotate, bool):
            raise ValueError(f"rotate must be true or false, got {rotate!r}")
        group_size = group_size or head_dim
        if head_dim % group_size:
            raise ValueError(f"group_size {group_size} must divide head_dim {head_dim}")
        self.head_dim, self.bits, self.group_size, self.seed = head_dim, bits, group_size, seed
        self.groups = head_dim // group_size
        self.name = name or f"uniform{bits}"
        self.rotation = make_rotation(head_dim, seed, "auto" if rotate else "identity")
        self.code_nbytes = packed_nbytes(head_dim, bits)
        self.nbytes = self.code_nbytes + 4 * self.groups
        self.bits_per_value = float(bits)

    def params(self):
        return (self.bits, self.group_size, self.seed, self.rotation.kind)

    def fields(self):
        return [Field("codes", 0, self.code_nbytes, f"{self.head_dim} x {self.bits}-bit unsigned ints, bit-packed"),
                Field("scale_min", self.code_nbytes, 4 * self.groups,
                      f"{self.groups} x (fp16 scale, fp16 min), one pair per {self.group_size} coordinates")]

    def triton_hooks(self):
        if self.head_dim % 8:  # the store hook packs eight codes at a time
            raise NotImplementedError(f"{self.name}: head_dim {self.head_dim} is not a multiple of 8")
        return TritonHooks(_uni_prep, _uni_decode, _uni_encode, (self.bits, self.code_nbytes, self.group_size))

    def encode(self, x):
        self._check_input(x)
        y = self.rotation.apply(x.float()).reshape(-1, self.groups, self.group_size)
        lo, hi = y.amin(-1), y.amax(-1)
        qmax = (1 << self.bits) - 1
        # Quantize with the fp16-rounded parameters that decode will use, so the codes match them.
        scale = ((hi - lo) / qmax).to(torch.float16)
        mn = lo.to(torch.float16)
        s32 = scale.float()
        safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
        q = torch.round((y - mn.float().unsqueeze(-1)) / safe.unsqueeze(-1)).clamp(0, qmax)
        meta = torch.stack((scale, mn), dim=-1).contiguous().view(torch.uint8).reshape(x.shape[0], 4 * self.groups)
        return torch.cat((pack_bits(q.reshape(x.shape[0], self.head_dim).to(torch.int64), self.bits), meta), dim=1)

    def boundary_distance(self, x, codes):
        if self.rotation.kind == "identity":
            return None  # min/max and one division: no summation order to differ in
        y = x.double() @ self.rotation.matrix(dtype=torch.float64).T
        q = unpack_bits(codes[:, : self.code_nbytes], self.bits, self.head_dim)
        m = codes[:, self.code_nbytes:].contiguous().view(torch.float16).double().reshape(len(x), self.groups, 2)
        s = m[..., 0].repeat_interleave(self.group_size, 1)
        t = (y - m[..., 1].repeat_interleave(self.group_size, 1)) / torch.where(s > 0, s, 1)
        return q, ((t - t.floor()) - 0.5).abs() * s  # distance to a rounding tie, in value units

    def decode_rotated(self, codes):
        self._check_codes(codes)
        n = codes.shape[0]
        q = unpack_bits(codes[:, : self.code_nbytes], self.bits, self.head_dim).float()
        meta = bytes_view(codes[:, self.code_nbytes:], torch.float16).reshape(n, self.groups, 2).float()
        y = q.reshape(n, self.groups, self.group_size) * meta[..., :1] + meta[..., 1:]
        return y.reshape(n, self.head_dim)


try:
    import triton
    import triton.language as tl

    from vllm_kvq.codecs import _triton as _t
except ModuleNotFoundError:  # the reference needs no Triton
    triton = None

if triton is not None:
    @triton.jit
    def _uni_prep(tab0, tab1, D, DP: tl.constexpr, P: tl.constexpr):
        return tl.zeros((1, DP), tl.float32)

    @triton.jit
    def _uni_decode(rows, sC, nmask, D, ctx, tab0, tab1, DP: tl.constexpr, BN: tl.constexpr, P: tl.constexpr):
        B: tl.constexpr = P[0]
        META: tl.constexpr = P[1]
        GS: tl.constexpr = P[2]
        dd = tl.arange(0, DP)[None, :]
        m2 = nmask[:, None] & (dd < D)
        code = _t.load_codes_grouped(rows, sC, nmask, D, DP, BN, B, DP, B, META)
        meta = rows[:, None] + (META + 4 * (dd // GS)) * sC
        vals = code.to(tl.float32) * _t.load_f16(meta, sC, m2) + _t.load_f16(meta + 2 * sC, sC, m2)
        return vals, tl.full(rows.shape, 1.0, tl.float32)

    @triton.jit
    def _uni_encode(x, y, rows, nmask, sC, D, tab0, tab1, DP: tl.constexpr, BN: tl.constexpr, P: tl.constexpr):
        B: tl.constexpr = P[0]
        META: tl.constexpr = P[1]
        GS: tl.constexpr = P[2]
        qmax: tl.constexpr = (1 << B) - 1
        d = tl.arange(0, DP)
        dm = d < D
        grp = d // GS
        lo = tl.zeros((BN, DP), tl.float32)
        hi = tl.zeros((BN, DP), tl.float32)
        for g in tl.static_range(DP // GS):
            sel = (grp == g) & dm
            lo_g = tl.min(tl.where(sel[None, :], y, float("inf")), axis=1)
            hi_g = tl.max(tl.where(sel[None, :], y, float("-inf")), axis=1)
            lo = tl.where(sel[None, :], lo_g[:, None], lo)
            hi = tl.where(sel[None, :], hi_g[:, None], hi)
        # Quantize with the fp16-rounded parameters decode will use, as the reference does.
        s16 = tl.math.div_rn(hi - lo, tl.full((BN, DP), qmax, tl.float32)).to(tl.float16)
        mn16 = lo.to(tl.float16)
        s32 = s16.to(tl.float32)
        safe = tl.where(s32 > 0, s32, 1.0)
        q = _t.rne(tl.math.div_rn(y - mn16.to(tl.float32), safe))
        code = tl.minimum(tl.maximum(q, 0.0), qmax).to(tl.int32)
        first = dm & (d % GS == 0)
        mrow = rows[:, None] + (META + 4 * grp[None, :]) * sC
        mmask = nmask[:, None] & first[None, :]
        _t.store_u16(mrow, sC, s16.to(tl.int16, bitcast=True).to(tl.int32), mmask)
        _t.store_u16(mrow + 2 * sC, sC, mn16.to(tl.int16, bitcast=True).to(tl.int32), mmask)
        _t.pack_store(code, rows, nmask, sC, D, DP, BN, B, DP, B, META)

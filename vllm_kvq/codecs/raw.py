"""Unquantized 16-bit storage (bf16 or fp16): for layers or heads a config keeps exact, e.g. attention
sinks' layers or the first and last layers. Costs 2*D bytes per vector; identity rotation."""

from __future__ import annotations

import torch

from vllm_kvq.codecs.base import Field, TritonHooks, VectorCodec, bytes_view
from vllm_kvq.codecs.rotation import make_rotation

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RawCodec(VectorCodec):
    def __init__(self, head_dim: int, dtype: str = "bf16", *, seed: int = 0, name: str | None = None):
        if dtype not in _DTYPES:
            raise ValueError(f"raw dtype {dtype!r} not allowed; allowed: {', '.join(_DTYPES)}")
        self.head_dim, self.dtype = head_dim, dtype
        self.torch_dtype = _DTYPES[dtype]
        self.name = name or dtype
        self.rotation = make_rotation(head_dim, 0, "identity")
        self.nbytes = 2 * head_dim
        self.bits_per_value = 16.0

    def params(self):
        return (self.dtype,)

    def fields(self):
        return [Field("values", 0, self.nbytes, f"{self.head_dim} x {self.dtype}")]

    def triton_hooks(self):
        return TritonHooks(_raw_prep, _raw_decode, _raw_encode, (int(self.dtype == "bf16"),))

    def encode(self, x):
        self._check_input(x)
        return x.to(self.torch_dtype).contiguous().view(torch.uint8).reshape(x.shape[0], self.nbytes)

    def decode_rotated(self, codes):
        self._check_codes(codes)
        return bytes_view(codes, self.torch_dtype).reshape(codes.shape[0], self.head_dim).float()


try:
    import triton
    import triton.language as tl

    from vllm_kvq.codecs import _triton as _t
except ModuleNotFoundError:  # the reference needs no Triton
    triton = None

if triton is not None:
    @triton.jit
    def _raw_prep(tab0, tab1, D, DP: tl.constexpr, P: tl.constexpr):
        return tl.zeros((1, DP), tl.float32)

    @triton.jit
    def _raw_decode(rows, sC, nmask, D, ctx, tab0, tab1, DP: tl.constexpr, BN: tl.constexpr, P: tl.constexpr):
        BF16: tl.constexpr = P[0]
        dd = tl.arange(0, DP)[None, :]
        bits = _t.load_u16(rows[:, None] + 2 * dd * sC, sC, nmask[:, None] & (dd < D)).to(tl.int16)
        if BF16:
            vals = bits.to(tl.bfloat16, bitcast=True).to(tl.float32)
        else:
            vals = bits.to(tl.float16, bitcast=True).to(tl.float32)
        return vals, tl.full(rows.shape, 1.0, tl.float32)

    @triton.jit
    def _raw_encode(x, y, rows, nmask, sC, D, tab0, tab1, DP: tl.constexpr, BN: tl.constexpr, P: tl.constexpr):
        BF16: tl.constexpr = P[0]
        d = tl.arange(0, DP)
        if BF16:
            bits = _t.bf16_bits(x)
        else:
            bits = _t.f16_bits(x)
        _t.store_u16(rows[:, None] + 2 * d[None, :] * sC, sC, bits, nmask[:, None] & (d[None, :] < D))

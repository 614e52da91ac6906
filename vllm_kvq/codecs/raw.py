"""Unquantized 16-bit storage (bf16 or fp16): for layers or heads a config keeps exact, e.g. attention
sinks' layers or the first and last layers. Costs 2*D bytes per vector; identity rotation."""

from __future__ import annotations

import torch

from vllm_kvq.codecs.base import Field, VectorCodec, bytes_view
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

    def encode(self, x):
        self._check_input(x)
        return x.to(self.torch_dtype).contiguous().view(torch.uint8).reshape(x.shape[0], self.nbytes)

    def decode_rotated(self, codes):
        self._check_codes(codes)
        return bytes_view(codes, self.torch_dtype).reshape(codes.shape[0], self.head_dim).float()

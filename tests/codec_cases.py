"""The one codec matrix every codec and kernel test is parametrized from (kvpress's default_presses idea).

A case is a codec (registry name plus parameters, optionally bound to per-head state), the implementations
that must run it, whether a fast store must reproduce the reference's bytes exactly (rotating codecs may flip
a code sitting on a threshold tie: matmul vs fast-transform summation order), and its packed size at head
sizes 64 and 128. Adding a codec is one file in ``vllm_kvq/codecs/`` plus one entry here; a registered preset
without an entry fails ``test_every_preset_has_a_case``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_kvq import codecs
from vllm_kvq.kv_format import KVFormat

ALL_IMPLS = ("reference", "triton", "cpu")
# The CUDA extension (vllm_kvq._C) runs TurboQuant and FibQuant codecs, bound state and sinks included, at head
# sizes 64 and 128 (kernels.cuda.HEAD_SIZES); tests/test_cuda_kernels.py checks its why_not against this.
CUDA = ("cuda",)


@dataclass(frozen=True)
class CodecCase:
    id: str
    name: str  # registry name (preset or family)
    params: dict = field(default_factory=dict)
    nbytes: dict = field(default_factory=dict)  # head_dim -> packed bytes per vector
    exact: bool = False  # fast stores give the reference's bytes exactly (no rotation ties)
    state: tuple[str, ...] = ()  # per-head state bound to the codec: "shift", "scale"
    impls: tuple[str, ...] = ALL_IMPLS
    head_dims: tuple[int, ...] = (64, 80, 128)  # head sizes the codec takes (group sizes must divide them)

    def build(self, d: int, head: int = 0) -> codecs.VectorCodec:
        c = codecs.get(self.name, head_dim=d, **self.params)
        if not self.state:
            return c
        g = torch.Generator().manual_seed(1000 + 31 * head + d)
        shift = torch.randn(d, generator=g) * 2 if "shift" in self.state else None
        scale = torch.rand(d, generator=g) * 1.5 + 0.25 if "scale" in self.state else None
        return c.bind(shift=shift, scale=scale)

    def fmt(self, d: int, hk: int) -> KVFormat:
        """Every KV head with this codec for K and V; bound state differs per head."""
        cs = [self.build(d, h) for h in range(hk)]
        return KVFormat(d, cs, cs, name=self.id)

    def rope_fmt(self, d: int, hk: int, *, rot: int | None = None, sinks: int = 0, block_size: int = 16,
                 theta: float = 1e5) -> KVFormat:
        """Every KV head with this case's codec (without its own state) calibrated as ``calibrate --key-centre
        rope`` binds it: a pre-RoPE key mean (large: the score bias is several logits and turns between
        16-position chunks) centred by position over the first ``rot`` channels (partial rotary), key channel
        scales and a value mean."""
        from types import SimpleNamespace

        from vllm_kvq.calibration import rope_frequencies

        c = codecs.get(self.name, head_dim=d, **self.params)
        freq, _ = rope_frequencies(SimpleNamespace(rope_theta=theta, partial_rotary_factor=(rot or d) / d), d)
        g = torch.Generator().manual_seed(2000 + d + hk)
        return KVFormat(d, [c] * hk, [c] * hk, name=f"{self.id}+rope{rot or d}" + (f"+sink{sinks}" if sinks else ""),
                        sink_tokens=sinks, block_size=block_size if sinks else None,
                        k_shift=torch.randn(hk, d, generator=g) * 3, v_shift=torch.randn(hk, d, generator=g),
                        k_scale=torch.rand(hk, d, generator=g) + 0.5, k_rope_freq=freq)


def _tq(bits: float, d: int) -> int:
    lo = int(bits)
    if bits == lo:
        return -(-lo * d // 8) + 2
    return -(-(lo + 1) * (d // 2) // 8) + -(-lo * (d // 2) // 8) + 2


def _fib(block: int, index_bits: int, d: int) -> int:
    return -(-(d // block) * index_bits // 8) + 2


def _sizes(fn) -> dict:
    return {d: fn(d) for d in (64, 128)}


CASES: list[CodecCase] = [
    *[CodecCase(f"turboquant{b:g}", f"turboquant{b:g}", nbytes=_sizes(lambda d, b=b: _tq(b, d)),
                impls=ALL_IMPLS + CUDA) for b in (2, 2.5, 3, 3.5, 4)],
    # FibQuant presets: (block, index bits) per rate, see codecs/fibquant.py
    *[CodecCase(f"fibquant{b:g}", f"fibquant{b:g}", nbytes=_sizes(lambda d, k=k, L=L: _fib(k, L, d)),
                impls=ALL_IMPLS + CUDA)
      for b, k, L in ((0.75, 8, 6), (1.5, 4, 6), (1.75, 4, 7), (2, 4, 8), (2.5, 2, 5), (3, 2, 6))],
    CodecCase("uniform4", "uniform4", nbytes=_sizes(lambda d: d // 2 + 4), exact=True),
    CodecCase("uniform8", "uniform8", nbytes=_sizes(lambda d: d + 4), exact=True),
    CodecCase("bf16", "bf16", nbytes=_sizes(lambda d: 2 * d), exact=True),
    CodecCase("fp16", "fp16", nbytes=_sizes(lambda d: 2 * d), exact=True),
    # family parameters the presets do not reach
    CodecCase("uniform-g32-rot-2b", "uniform", dict(bits=2, group_size=32, rotate=True),
              nbytes=_sizes(lambda d: d // 4 + 4 * (d // 32)), head_dims=(64, 128)),
    CodecCase("uniform3", "uniform", dict(bits=3), nbytes=_sizes(lambda d: 3 * d // 8 + 4), exact=True),
    CodecCase("tq3-norm", "turboquant", dict(bits=3, scale_mode="norm"), nbytes=_sizes(lambda d: _tq(3, d)),
              impls=ALL_IMPLS + CUDA),
    CodecCase("tq4-corrected", "turboquant", dict(bits=4, scale_mode="corrected"), nbytes=_sizes(lambda d: _tq(4, d)),
              impls=ALL_IMPLS + CUDA),
    CodecCase("tq3-haar", "turboquant", dict(bits=3, rotation="haar"), nbytes=_sizes(lambda d: _tq(3, d)),
              impls=ALL_IMPLS + CUDA),
    CodecCase("tq2-identity", "turboquant", dict(bits=2, rotation="identity"), nbytes=_sizes(lambda d: _tq(2, d)),
              impls=ALL_IMPLS + CUDA),
    # 6/5-bit segments: a codebook too wide for registers
    CodecCase("tq5.5", "turboquant", dict(bits=5.5), nbytes=_sizes(lambda d: _tq(5.5, d)), impls=ALL_IMPLS + CUDA),
    # 9-bit block indices: the wide packing path (indices > 8 bits) in every implementation
    CodecCase("fib2.25-k4", "fibquant", dict(bits=2.25, block=4), nbytes=_sizes(lambda d: _fib(4, 9, d)),
              impls=ALL_IMPLS + CUDA),
    # 10-bit indices (3-byte read window): the Triton store loops over 1024 codewords, minutes under the
    # interpreter, so Triton runs it in test_fibquant.py's slow test only
    CodecCase("fib2.5-k4", "fibquant", dict(bits=2.5, block=4), nbytes=_sizes(lambda d: _fib(4, 10, d)),
              impls=("reference", "cpu") + CUDA),
    CodecCase("fib2-norm", "fibquant", dict(bits=2, scale_mode="norm"), nbytes=_sizes(lambda d: _fib(4, 8, d)),
              impls=ALL_IMPLS + CUDA),
    # bound per-head state (calibrated centring and key channel scales): no cache bytes
    CodecCase("turboquant3+shift+scale", "turboquant3", state=("shift", "scale"), nbytes=_sizes(lambda d: _tq(3, d)),
              impls=ALL_IMPLS + CUDA),
    CodecCase("turboquant2.5+shift", "turboquant2.5", state=("shift",), nbytes=_sizes(lambda d: _tq(2.5, d)),
              impls=ALL_IMPLS + CUDA),
    CodecCase("uniform4+shift+scale", "uniform4", state=("shift", "scale"), nbytes=_sizes(lambda d: d // 2 + 4),
              exact=True),
    CodecCase("fibquant2+shift+scale", "fibquant2", state=("shift", "scale"), nbytes=_sizes(lambda d: _fib(4, 8, d)),
              impls=ALL_IMPLS + CUDA),
    CodecCase("bf16+shift", "bf16", state=("shift",), nbytes=_sizes(lambda d: 2 * d), exact=True),
]

BY_ID = {c.id: c for c in CASES}


def ids(impl: str | None = None, *, stateful: bool | None = None, head_dim: int | None = None) -> list[str]:
    """Case ids, optionally only those ``impl`` must run, with / without bound state, taking ``head_dim``."""
    return [c.id for c in CASES if (impl is None or impl in c.impls)
            and (stateful is None or bool(c.state) == stateful) and (head_dim is None or head_dim in c.head_dims)]


def case(cid: str) -> CodecCase:
    return BY_ID[cid]

"""What a Triton kernel needs to know about one codec: compile-time layout constants and small device tables.

Every codec is described by the same handful of numbers, so one kernel body serves them all and a mixed
format launches once per head group with that group's constants:

  KIND      TQ (Lloyd-Max indices + one fp16 scale), UNI (integers + fp16 scale/min per group), BF16, FP16
  B0, N0    bits and number of coordinates of the first code segment (TurboQuant's fractional rates have two)
  B1        bits of the second segment (coordinates N0..D); equal to B0 when there is one segment
  SEG1      byte offset of the second segment (N0 * B0 / 8)
  META      byte offset of the metadata (fp16 scale, or per-group scale/min pairs)
  GS        uniform group size (coordinates per scale/min pair)
  W         centroid-table width, 2**max_bits (TurboQuant)
  ROT       whether the codec rotates (identity rotations skip the matmul)
  SMODE     TurboQuant scale mode: 0 norm, 1 corrected, 2 lsq

Code j of a segment with b bits starts at bit ``j * b`` of that segment (see ``codecs.packing``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvq.codecs.base import VectorCodec
from vllm_kvq.codecs.raw import RawCodec
from vllm_kvq.codecs.turboquant import SCALE_MODES, TurboQuantCodec
from vllm_kvq.codecs.uniform import UniformCodec

KIND_TQ, KIND_UNI, KIND_BF16, KIND_FP16 = 0, 1, 2, 3


@dataclass(frozen=True)
class CodecSpec:
    kind: int
    b0: int
    n0: int
    b1: int
    seg1: int
    meta: int
    gs: int
    w: int
    rot: bool
    smode: int

    def constexprs(self, prefix: str) -> dict:
        return {f"{prefix}_{k.upper()}": getattr(self, k) for k in
                ("kind", "b0", "n0", "b1", "seg1", "meta", "gs", "w", "rot", "smode")}


def supports(codec: VectorCodec) -> str | None:
    """None if the Triton kernels handle ``codec``, else why not."""
    if isinstance(codec, RawCodec):
        return None
    if isinstance(codec, (TurboQuantCodec, UniformCodec)):
        # The store kernel packs codes eight at a time (eight b-bit codes are exactly b bytes), so every
        # segment must hold a multiple of 8 coordinates: head_dim % 16 == 0 covers every vLLM head size.
        seg = codec.segments if isinstance(codec, TurboQuantCodec) else [(codec.bits, codec.head_dim)]
        if any(n % 8 for _, n in seg):
            return f"{codec.name}: code segments of {[n for _, n in seg]} coordinates are not multiples of 8"
        return None
    return f"no Triton kernel for codec type {type(codec).__name__}"


def spec_of(codec: VectorCodec) -> CodecSpec:
    why = supports(codec)
    if why:
        raise ValueError(why)
    d = codec.head_dim
    if isinstance(codec, TurboQuantCodec):
        (b0, n0), (b1, _) = codec.segments[0], codec.segments[-1]
        return CodecSpec(KIND_TQ, b0, n0, b1, codec.segment_nbytes[0], codec.code_nbytes, d,
                         1 << max(b0, b1), codec.rotation.kind != "identity", SCALE_MODES.index(codec.scale_mode))
    if isinstance(codec, UniformCodec):
        return CodecSpec(KIND_UNI, codec.bits, d, codec.bits, codec.code_nbytes, codec.code_nbytes,
                         codec.group_size, 1, codec.rotation.kind != "identity", 0)
    kind = KIND_BF16 if codec.torch_dtype == torch.bfloat16 else KIND_FP16
    return CodecSpec(kind, 16, d, 16, 2 * d, 2 * d, d, 1, False, 0)


_TABLES: dict = {}


def tables(codec: VectorCodec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R^T (D, D), centroids (D, W), thresholds (D, W)) float32 on ``device``, cached.

    ``x @ R^T`` rotates a row. Thresholds of coordinate i are padded with +inf past its segment's
    2**b - 1 entries, so ``code = sum_j (y > thr[i, j])`` is torch.bucketize for every segment.
    Codecs without a rotation or a codebook get 1-element placeholders (never read).
    """
    k = (codec.key, str(device))
    if k not in _TABLES:
        d = codec.head_dim
        one = torch.zeros(1, dtype=torch.float32, device=device)
        rt = codec.rotation.matrix(device).T.contiguous() if codec.rotation.kind != "identity" else one
        if isinstance(codec, TurboQuantCodec):
            cent = codec.centroid_table(device).contiguous()
            w = cent.shape[1]
            thr = torch.full((d, w), float("inf"), dtype=torch.float32)
            start = 0
            for book, (b, n) in zip(codec.codebooks, codec.segments):
                thr[start:start + n, : (1 << b) - 1] = book.thresholds_tensor()
                start += n
            thr = thr.to(device)
        else:
            cent = thr = one
        _TABLES[k] = (rt, cent, thr)
    return _TABLES[k]


_HEADS: dict = {}


def heads_tensor(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(gh,) int32 KV-head indices of a head group on ``device``, cached: building it from a list is a
    host-to-device copy, which a CUDA-graph capture would reject."""
    k = (heads, str(device))
    if k not in _HEADS:
        _HEADS[k] = torch.tensor(heads, dtype=torch.int32, device=device)
    return _HEADS[k]

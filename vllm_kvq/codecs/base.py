"""The vector-codec interface every codec implements: one codec is one unit (one file).

A codec maps rows x (N, D) to fixed-size packed rows (N, nbytes) uint8. Attention never needs x itself:
it works in the codec's *rotated domain*, where ``decode(c) == unrotate(decode_rotated(c))``. Scores are
``rotate(q) . decode_rotated(k)`` (rotations are orthogonal, so inner products are unchanged) and value
sums are accumulated there and rotated back once per output row.

A codec carries everything the implementations need, so kernels hold no codec-name branches:

* ``encode`` / ``decode_rotated`` / ``fields``: the reference, which defines the bytes, and the layout.
* **State** bound with ``bind(shift=, scale=)``: per-(layer, KV head) vectors (calibrated centring and
  channel scales) that cost no cache bytes. Bytes are ``encode((x - shift) / scale)``; attention multiplies
  the query by the key codec's ``scale`` (``query_transform``), never adds a key shift back (it moves all of
  a query's scores equally) and maps each output row through the value codec's ``o * scale + shift``
  (``output_transform``; attention weights sum to one).
  ``quantize`` / ``dequantize`` are the round trip with the state applied.
* **Kernel hooks**: ``tables(device)`` (the rotation matrix and two codec tables, e.g. centroids and
  thresholds, cached per device), ``triton_hooks()`` (the ``@triton.jit`` prep/decode/encode functions and
  their constexpr parameter tuple, defined in the codec's own file) and ``why_not(impl)``.
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from vllm_kvq.codecs.rotation import Rotation


class TritonHooks(NamedTuple):
    """What the generic Triton kernels call for one codec (see ``codecs/_triton.py`` for the signatures).

    prep(tab0, tab1, D, DP, P) -> ctx                  once per program (e.g. a codebook in registers)
    decode(rows, sC, nmask, D, ctx, tab0, tab1, DP, BN, P) -> (vals (BN, DP), scale (BN,))
        rotated-domain rows, ``decoded = vals * scale[:, None]`` (a per-row scale folds into scores)
    encode(x, y, rows, nmask, sC, D, tab0, tab1, DP, BN, P)
        x (BN, DP) the input after the state transform, y = x rotated; writes the packed bytes
    """

    prep: Any
    decode: Any
    encode: Any
    params: tuple  # P: the codec's compile-time constants


@dataclass(frozen=True)
class Field:
    """One contiguous piece of a packed row: name, byte offset, byte size, what it holds."""

    name: str
    offset: int
    nbytes: int
    what: str


class VectorCodec(abc.ABC):
    name: str  # registry name, e.g. "turboquant3"
    head_dim: int
    nbytes: int  # packed bytes per vector, metadata included
    bits_per_value: float  # code bits per coordinate, metadata excluded
    rotation: Rotation
    shift: torch.Tensor | None = None  # (D,) float32, subtracted before encoding
    scale: torch.Tensor | None = None  # (D,) float32 > 0, divides the shifted input before encoding

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) float -> (N, nbytes) uint8."""

    @abc.abstractmethod
    def decode_rotated(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, nbytes) uint8 -> (N, D) float32 in the rotated domain."""

    @abc.abstractmethod
    def fields(self) -> list[Field]:
        """The byte layout of one packed row, in order."""

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, nbytes) uint8 -> (N, D) float32, in the encoded (state-transformed) domain."""
        return self.rotation.inverse(self.decode_rotated(codes))

    # ---- state: per-(layer, KV head) vectors bound to the codec -------------------------------------

    def bind(self, *, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> "VectorCodec":
        """A copy of this codec bound to per-head state (each (D,)); the shared tables stay shared."""
        out = copy.copy(self)
        for label, t in (("shift", shift), ("scale", scale)):
            if t is not None:
                t = t.detach().to(torch.float32).reshape(-1).contiguous()
                if t.numel() != self.head_dim or not bool(t.isfinite().all()):
                    raise ValueError(f"{self.name}: {label} must be {self.head_dim} finite values, got "
                                     f"{tuple(t.shape)}")
                if label == "scale" and not bool((t > 0).all()):
                    raise ValueError(f"{self.name}: scale must be positive")
            setattr(out, label, t)
        return out

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(n for n in ("shift", "scale") if getattr(self, n) is not None)

    def store_transform(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> what ``encode`` sees: ``(x - shift) / scale`` (float32 when state is bound)."""
        if self.shift is not None:
            x = x.float() - self.shift.to(x.device)
        if self.scale is not None:
            x = x.float() / self.scale.to(x.device)
        return x

    def query_transform(self, q: torch.Tensor) -> torch.Tensor:
        """q (N, D) float -> the query that scores these codes: ``q * scale`` (q . (k - shift) up to a
        per-query constant, which softmax ignores)."""
        return q * self.scale.to(q.device) if self.scale is not None else q

    def output_transform(self, o: torch.Tensor) -> torch.Tensor:
        """o (N, D) float, an attention-weighted sum of decoded values -> ``o * scale + shift`` (weights sum
        to one, so the per-value affine map moves out of the sum)."""
        if self.scale is not None:
            o = o * self.scale.to(o.device)
        return o + self.shift.to(o.device) if self.shift is not None else o

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> packed rows, state applied: the bytes a cache stores."""
        return self.encode(self.store_transform(x))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Inverse of ``quantize`` up to the codec's error -> (N, D) float32 in the input's domain."""
        x = self.decode(codes)
        if self.scale is not None:
            x = x * self.scale.to(x.device)
        if self.shift is not None:
            x = x + self.shift.to(x.device)
        return x

    # ---- for kernel tests: where may a fast store legitimately differ? ---------------------------------

    def boundary_distance(self, x: torch.Tensor,  # (N, D) float64, what ``encode`` sees
                          codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(code indices (N, D) of ``codes``, distance (N, D) of each coordinate of x to the nearest decision
        boundary of its quantizer, in the quantizer's input units), or None when encoding involves no
        rounding decision a different summation order could flip (then kernels must match bytes exactly).
        Kernel tests accept a differing code only where this distance is ~0 (a tie)."""
        return None

    # ---- kernel hooks --------------------------------------------------------------------------------

    def codec_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two float32 CPU tables the kernels read (codebooks, thresholds); 1-element placeholders if none."""
        one = torch.zeros(1, dtype=torch.float32)
        return one, one

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R^T (D, D) or a placeholder for identity rotations, tab0, tab1) on ``device``, cached per codec
        parameters (not per bound copy)."""
        k = (self.key_params, str(device))
        if k not in _TABLES:
            rot = self.rotation.kind != "identity"
            rt = self.rotation.matrix(device).T.contiguous() if rot else torch.zeros(1, device=device)
            t0, t1 = self.codec_tables()
            _TABLES[k] = (rt, t0.to(device).contiguous(), t1.to(device).contiguous())
        return _TABLES[k]

    def triton_hooks(self) -> TritonHooks:
        raise NotImplementedError(f"{self.name}: no Triton hooks")

    def why_not(self, impl: str) -> str | None:
        """None when implementation ``impl`` ("reference", "triton", ...) runs this codec, else why not.
        Native implementations answer for themselves (they know what they compiled)."""
        if impl == "reference":
            return None
        if impl == "triton":
            try:
                self.triton_hooks()
            except NotImplementedError as e:
                return str(e)
            except ModuleNotFoundError:
                return "Triton is not installed"
            return None
        return None

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation.apply(x.float())

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return self.rotation.inverse(y.float())

    @property
    def key_params(self) -> tuple:
        """Codecs with equal ``key_params`` share tables and kernels (bound state aside)."""
        return (type(self).__name__, self.name, self.head_dim, self.params())

    @property
    def key(self) -> tuple:
        """Heads whose codecs have equal keys run in one kernel launch: same parameters, same kinds of
        bound state (the state's values are per head)."""
        return self.key_params + (self.state_names,)

    def params(self) -> tuple:
        return ()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.head_dim:
            raise ValueError(f"{self.name}: expected x of shape (N, {self.head_dim}), got {tuple(x.shape)}")

    def _check_codes(self, codes: torch.Tensor) -> None:
        if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != self.nbytes:
            raise ValueError(
                f"{self.name}: expected codes uint8 (N, {self.nbytes}), got {codes.dtype} {tuple(codes.shape)}")

    def describe(self) -> str:
        lines = [f"{self.name} (head_dim={self.head_dim}, {self.nbytes} bytes/vector, rotation={self.rotation.kind})"]
        for f in self.fields():
            lines.append(f"  [{f.offset:4d}:{f.offset + f.nbytes:4d}] {f.name:<10} {f.what}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{self.name} d={self.head_dim} {self.nbytes}B>"


_TABLES: dict = {}


def fp16_to_bytes(x: torch.Tensor) -> torch.Tensor:
    """x (N,) float -> (N, 2) uint8, little-endian fp16."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def bytes_to_fp16(b: torch.Tensor) -> torch.Tensor:
    """b (N, 2) uint8 -> (N,) float32."""
    return bytes_view(b, torch.float16).reshape(-1).float()


def bytes_view(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """b (N, k * itemsize) uint8 -> (N, k) ``dtype``, reinterpreting the bytes.

    A fresh copy, not ``b.contiguous()``: a one-row slice of a packed row is already "contiguous" but may
    start at an odd byte (a V code after a 27-byte K code), and ``view`` needs an aligned storage offset.
    """
    return b.clone(memory_format=torch.contiguous_format).view(dtype)

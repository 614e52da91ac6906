"""Codec prototypes for quality_sim.py: features the package does not have yet, built on its registered codecs.

Each prototype is bound to one (layer, side) of a format: it applies the format's calibration transform
(key/value shift, key channel scale), codes the result, and undoes the transform, like
``fake_quant.roundtrip``. Bytes are counted honestly (codes, scales, indices); per-(layer, head) state
(channel orderings) is calibration data and costs no cache bytes.

  tqo<b>:<n_hi>  outlier split by calibrated energy: per KV head, the n_hi channels with the largest mean
                 square on the calibration text get TurboQuant at b+1 bits, the other D - n_hi TurboQuant at
                 b bits, each with its own rotation and fp16 scale. The package's fractional TurboQuant
                 splits a fixed half *after* its rotation instead (coordinates there are exchangeable).
  ds<b>:<k>      dense-and-sparse (KVQuant): the k largest |coordinates| of each vector kept at fp16 with a
                 one-byte index, the rest (those k zeroed) TurboQuant at b bits.
"""

from __future__ import annotations

import torch

from vllm_kvq import codecs

PROTO_HEADS = ("tqo", "ds")


class _Transform:
    """The format's calibration for one side: y = (x - shift) / scale and back."""

    def __init__(self, fmt, side: int):
        self.shift = fmt.k_shift if side == 0 else fmt.v_shift  # (Hk, D) or None
        self.scale = fmt.k_scale if side == 0 else None

    def fwd(self, x):  # (Hk, N, D)
        if self.shift is not None:
            x = x - self.shift[:, None]
        return x if self.scale is None else x / self.scale[:, None]

    def inv(self, y):
        if self.scale is not None:
            y = y * self.scale[:, None]
        return y if self.shift is None else y + self.shift[:, None]


def _roundtrip(codec, x):  # (M, D) -> (M, D) through the registered codec's bytes
    return codec.decode(codec.encode(x.contiguous()))


class EnergySplit:
    def __init__(self, head_dim: int, bits: int, n_hi: int, fmt, side: int, calib_x: torch.Tensor):
        if not 0 < n_hi < head_dim:
            raise ValueError(f"tqo: n_hi must be in 1..{head_dim - 1}, got {n_hi}")
        self.t = _Transform(fmt, side)
        energy = self.t.fwd(calib_x.float()).pow(2).mean(1)  # (Hk, D)
        self.order = energy.argsort(dim=-1, descending=True)  # per head: channels by energy
        self.n_hi = n_hi
        self.hi = codecs.get("turboquant", head_dim=n_hi, bits=bits + 1)
        self.lo = codecs.get("turboquant", head_dim=head_dim - n_hi, bits=bits)
        self.nbytes = self.hi.nbytes + self.lo.nbytes

    def __call__(self, x):  # (Hk, N, D)
        y = self.t.fwd(x)
        out = torch.empty_like(y)
        for h in range(y.shape[0]):
            hi, lo = self.order[h, :self.n_hi], self.order[h, self.n_hi:]
            out[h][:, hi] = _roundtrip(self.hi, y[h][:, hi])
            out[h][:, lo] = _roundtrip(self.lo, y[h][:, lo])
        return self.t.inv(out)


class DenseSparse:
    def __init__(self, head_dim: int, bits: float, k: int, fmt, side: int, calib_x=None):
        if not 0 < k < head_dim:
            raise ValueError(f"ds: k must be in 1..{head_dim - 1}, got {k}")
        self.t = _Transform(fmt, side)
        self.k = k
        self.codec = codecs.get("turboquant", head_dim=head_dim, bits=bits)
        self.nbytes = self.codec.nbytes + 3 * k  # fp16 value + uint8 index per outlier

    def __call__(self, x):
        y = self.t.fwd(x)
        hk, n, d = y.shape
        flat = y.reshape(-1, d)
        idx = flat.abs().topk(self.k, dim=-1).indices
        kept = flat.gather(1, idx).to(torch.float16).float()
        dense = flat.scatter(1, idx, 0.0)
        out = _roundtrip(self.codec, dense).scatter(1, idx, kept)
        return self.t.inv(out.reshape(hk, n, d))


def make_proto(spec: str, head_dim: int, fmt, side: int, calib_x: torch.Tensor):
    """``tqo3:16`` / ``ds3:2`` -> a prototype bound to ``fmt``'s calibration for ``side`` (0 keys, 1 values)."""
    head, *opts = spec.split(":")
    if len(opts) != 1 or not opts[0].isdigit():
        raise ValueError(f"prototype {spec!r}: expected tqo<bits>:<n_hi> or ds<bits>:<k>")
    if head.startswith("tqo"):
        return EnergySplit(head_dim, int(head[3:]), int(opts[0]), fmt, side, calib_x)
    if head.startswith("ds"):
        bits = float(head[2:]) if "." in head else int(head[2:])
        return DenseSparse(head_dim, bits, int(opts[0]), fmt, side)
    raise ValueError(f"unknown prototype {spec!r}; known: {', '.join(PROTO_HEADS)}")

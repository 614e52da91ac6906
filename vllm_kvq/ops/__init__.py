"""Engine-agnostic paged ops over packed KV caches.

    ops.store(key, value, cache, slot_mapping, fmt, impl=None)
    out = ops.paged_attention(query, cache, block_table, seq_lens, query_start_loc, fmt, scale=..., impl=None)

``impl`` picks "reference", "triton", "cuda" or "cpu"; None picks the fastest available for the tensors'
device (logged once), or the one the debug knob ``VLLM_KVQ_IMPL`` names (e.g. to compare a kernel with the
reference inside a running engine). Shapes and dtypes are checked here, in the launcher, so kernels need not.

Calibrated formats (``fmt.calibrated``: shifted/scaled K and V, see ``vllm_kvq.calibration``) run only on
implementations whose op says so with a true ``supports_calibration`` attribute (the reference does). With
``impl=None`` a calibrated format falls back to the reference (logged once); naming another impl is an error.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from vllm_kvq.kv_format import KVFormat
from vllm_kvq.ops import reference

logger = logging.getLogger(__name__)

IMPLS = ("reference", "triton", "cuda", "cpu")
_FORCED_IMPL = os.environ.get("VLLM_KVQ_IMPL") or None  # debug knob, read once
_announced: set[tuple[str, str]] = set()


@functools.cache
def _impl_table(op: str) -> dict:
    """op -> {impl name: function}; built once per process (the ops sit on vLLM's per-layer hot path)."""
    table = {"reference": getattr(reference, op)}
    try:
        from vllm_kvq.kernels import triton as _triton  # noqa: F401
        table["triton"] = getattr(_triton, op)
    except (ImportError, AttributeError):
        pass
    try:
        from vllm_kvq.kernels import cuda as _cuda
        if _cuda.available():
            table["cuda"] = getattr(_cuda, op)
    except (ImportError, AttributeError):
        pass
    try:
        from vllm_kvq.kernels import cpu as _cpu
        if _cpu.available():
            table["cpu"] = getattr(_cpu, op)
    except (ImportError, AttributeError):
        pass
    return table


def available(op: str, device: torch.device) -> list[str]:
    """Implementations of ``op`` usable on ``device``, fastest first."""
    table = _impl_table(op)
    order = ["cuda", "triton", "reference"] if device.type == "cuda" else ["cpu", "reference"]
    return [i for i in order if i in table]


def _supports(fn, fmt: KVFormat) -> bool:
    return not fmt.calibrated or bool(getattr(fn, "supports_calibration", False))


def _pick(op: str, impl: str | None, device: torch.device, fmt: KVFormat):
    table = _impl_table(op)
    if impl is None and _FORCED_IMPL is not None:
        impl = _FORCED_IMPL
    if impl is None:
        impl = available(op, device)[0]
        if not _supports(table[impl], fmt):
            fast, impl = impl, "reference"
            if (op, fast, "calibrated") not in _announced:
                _announced.add((op, fast, "calibrated"))
                logger.info("vllm_kvq: %s: the %s implementation does not support calibrated formats; "
                            "running the reference", op, fast)
        if (op, impl) not in _announced:
            _announced.add((op, impl))
            logger.info("vllm_kvq: %s runs the %s implementation on %s", op, impl, device.type)
    elif impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; allowed: {', '.join(IMPLS)}")
    elif impl not in table:
        raise RuntimeError(f"impl {impl!r} is not available here; available: {', '.join(table)}")
    elif not _supports(table[impl], fmt):
        raise ValueError(f"impl {impl!r} does not support calibrated formats ({fmt.name!r}); use impl=None or "
                         f"'reference'")
    return table[impl]


def _check_kv(name, t, n, fmt):
    if t.dim() != 3 or t.shape[0] != n or t.shape[1] != fmt.num_kv_heads or t.shape[2] != fmt.head_size:
        raise ValueError(f"{name}: expected ({n}, {fmt.num_kv_heads}, {fmt.head_size}), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")


def store(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
          fmt: KVFormat, *, impl: str | None = None) -> None:
    """Quantize key/value (N, Hk, D) into the cache slots of ``slot_mapping`` (N,); -1 slots are skipped."""
    fmt.check_cache(cache)
    n = slot_mapping.shape[0]
    _check_kv("key", key, n, fmt)
    _check_kv("value", value, n, fmt)
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping: expected 1-D int32/int64, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    _pick("store", impl, cache.device, fmt)(key, value, cache, slot_mapping, fmt)


def paged_attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, fmt: KVFormat, *, scale: float,
                    impl: str | None = None) -> torch.Tensor:
    """Causal paged attention over the packed cache for a batch mixing prefills and decodes -> (N, Hq, D)."""
    fmt.check_cache(cache)
    if query.dim() != 3 or query.shape[2] != fmt.head_size or query.shape[1] % fmt.num_kv_heads:
        raise ValueError(f"query: expected (N, Hq, {fmt.head_size}) with Hq a multiple of {fmt.num_kv_heads}, "
                         f"got {tuple(query.shape)}")
    s = seq_lens.shape[0]
    if query_start_loc.shape != (s + 1,) or block_table.dim() != 2 or block_table.shape[0] < s:
        raise ValueError(f"expected query_start_loc ({s + 1},) and block_table ({s}, max_blocks); got "
                         f"{tuple(query_start_loc.shape)} and {tuple(block_table.shape)}")
    return _pick("paged_attention", impl, query.device, fmt)(query, cache, block_table[:s], seq_lens, query_start_loc,
                                                        fmt, scale=scale)


__all__ = ["store", "paged_attention", "available", "IMPLS", "reference"]

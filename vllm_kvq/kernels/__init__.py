"""Fast implementations of the paged ops: triton/ (GPU, and CPU under TRITON_INTERPRET=1) and the Python
side of the native extensions in csrc/. Each one is checked against ``vllm_kvq.ops.reference``.

This module holds the launch helpers every implementation shares; it imports neither Triton nor an
extension."""

from __future__ import annotations

import math

import torch

_HEADS: dict = {}


def heads_tensor(heads: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(gh,) int32 KV-head indices of a head group on ``device``, cached: building it from a list is a
    host-to-device copy, which a CUDA-graph capture would reject."""
    k = (heads, str(device))
    if k not in _HEADS:
        _HEADS[k] = torch.tensor(heads, dtype=torch.int32, device=device)
    return _HEADS[k]


_SM_COUNT: dict = {}


def num_splits(device: torch.device, programs: int, max_ctx: int, bn: int) -> int:
    """Split-K factor for a decode step: splits that fill the GPU about twice over, each at least 4 tiles
    of ``bn`` tokens of the longest context ``max_ctx``; from host-side sizes only (no sync). A power of two,
    so a serving run compiles at most seven split variants (1..64)."""
    if device.type != "cuda":
        return 1
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return split_count(_SM_COUNT[device.index], programs, max_ctx, bn)


def split_count(sm_count: int, programs: int, max_ctx: int, bn: int) -> int:
    """``num_splits`` for a device with ``sm_count`` multiprocessors."""
    want = math.ceil(2 * sm_count / max(programs, 1))
    n = max(1, min(want, max_ctx // (4 * bn), 64))
    return 1 << (n.bit_length() - 1)

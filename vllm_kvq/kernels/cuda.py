"""Python side of the CUDA extension (csrc/cuda, built as ``vllm_kvq._C`` by setup.py when CUDA torch and
nvcc are present): ``store`` and ``paged_attention`` with the reference signatures.

The extension covers the hot paths for TurboQuant formats (every head group TurboQuant for K and V, head
size 64 or 128, up to 8 query heads per KV head): quantize-on-write and decode steps. Anything else in a
call (prefill chunks, other codecs or shapes) goes to the Triton kernels, so ``impl="cuda"`` is always
complete where it is offered.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from vllm_kvq.codecs.turboquant import TurboQuantCodec
from vllm_kvq.kernels.triton.codec_spec import heads_tensor, spec_of, tables
from vllm_kvq.kv_format import KVFormat

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the built extension loads and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    spec = importlib.util.find_spec("vllm_kvq._C")
    if spec is None or spec.origin is None:
        return False
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as e:
        logger.warning("vllm_kvq: the CUDA extension %s does not load (%s); using Triton", spec.origin, e)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    # Both ops only mutate their arguments: the fake implementations have nothing to compute.
    for name in ("vllm_kvq::tq_store", "vllm_kvq::tq_decode"):
        try:
            torch.library.register_fake(name)(lambda *args, **kwargs: None)
        except RuntimeError:  # already registered (a second load in the same process)
            pass


def _spec_args(codec, device):

    s = spec_of(codec)
    rt, cent, thr = tables(codec, device)
    return [s.b0, s.n0, s.b1, s.seg1, s.meta, s.w, int(s.rot), s.smode], rt, cent, thr


def supports(fmt: KVFormat, group: int | None = None) -> bool:
    """Whether every head group of ``fmt`` is a TurboQuant K/V pair the extension compiles for."""
    if fmt.head_size not in (64, 128) or (group is not None and not 1 <= group <= 8):
        return False
    return all(isinstance(g.key, TurboQuantCodec) and isinstance(g.value, TurboQuantCodec) for g in fmt.groups)


def _triton():
    from vllm_kvq.kernels import triton as kt

    return kt


def store(key: torch.Tensor,  # (N, Hk, D)
          value: torch.Tensor,  # (N, Hk, D)
          cache: torch.Tensor,  # (B, Hk, T, C) uint8, any strides
          slot_mapping: torch.Tensor,  # (N,) int; -1 = padding
          fmt: KVFormat) -> None:
    if not supports(fmt) or key.dtype != value.dtype:
        return _triton().store(key, value, cache, slot_mapping, fmt)
    if key.shape[0] == 0:
        return
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    for g in fmt.groups:
        heads = heads_tensor(g.heads, cache.device)
        ks, krt, kc, kth = _spec_args(g.key, cache.device)
        vs, vrt, vc, vth = _spec_args(g.value, cache.device)
        torch.ops.vllm_kvq.tq_store(key, value, cache, slot_mapping, heads, g.key.nbytes, g.key.nbytes + g.value.nbytes,
                                    ks, krt, kc, kth, vs, vrt, vc, vth)


def paged_attention(query: torch.Tensor,  # (N, Hq, D)
                    cache: torch.Tensor,  # (B, Hk, T, C) uint8
                    block_table: torch.Tensor,  # (S, max_blocks) int
                    seq_lens: torch.Tensor,  # (S,)
                    query_start_loc: torch.Tensor,  # (S + 1,)
                    fmt: KVFormat, *, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Decode steps (N == S) of supported formats run the CUDA kernel; everything else runs Triton."""
    n, hq, d = query.shape
    s = seq_lens.shape[0]
    group = hq // fmt.num_kv_heads
    if n != s or not supports(fmt, group):
        return _triton().paged_attention(query, cache, block_table, seq_lens, query_start_loc, fmt, scale=scale,
                                         num_splits=num_splits)
    out = torch.zeros_like(query) if query.stride(-1) == 1 else torch.zeros(query.shape, dtype=query.dtype,
                                                                           device=query.device)
    if n == 0:
        return out
    query = query if query.stride(-1) == 1 else query.contiguous()
    from vllm_kvq.kernels.triton.attention import _num_splits

    t = cache.shape[2]
    max_ctx = block_table.shape[1] * t
    splits = num_splits if num_splits is not None else _num_splits(query.device, s * fmt.num_kv_heads, max_ctx, 64)
    split_tokens = -(-max_ctx // splits)
    if splits > 1:
        partial = torch.empty(splits, n, hq, d, dtype=torch.float32, device=query.device)
        ml = torch.empty(splits, n, hq, 2, dtype=torch.float32, device=query.device)
    else:
        partial = ml = torch.empty(0, dtype=torch.float32, device=query.device)
    bt = block_table if block_table.dtype == torch.int32 and block_table.stride(1) == 1 else \
        block_table.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    qsl = query_start_loc.to(torch.int32).contiguous()
    for g in fmt.groups:
        heads = heads_tensor(g.heads, cache.device)
        ks, krt, kc, kth = _spec_args(g.key, cache.device)
        vs, vrt, vc, vth = _spec_args(g.value, cache.device)
        torch.ops.vllm_kvq.tq_decode(query, out, cache, bt, seq_lens, qsl, heads, g.key.nbytes, scale, splits,
                                     split_tokens, partial, ml, ks, krt, kc, kth, vs, vrt, vc, vth)
    return out

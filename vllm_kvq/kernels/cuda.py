"""Python side of the CUDA extension (csrc/cuda, built as ``vllm_kvq._C`` by setup.py when CUDA torch and
nvcc are present): ``store`` and ``paged_attention`` with the reference signatures.

The extension covers the hot paths for TurboQuant and FibQuant formats (every head group TurboQuant or
FibQuant for K and V, head size 64 or 128, up to 8 query heads per KV head), with per-head state
(calibrated shifts and channel scales) and sink records: quantize-on-write and decode steps. FibQuant keys
are scored from a per-query table of the rotated query's block inner products with every codeword, held in
shared memory; a codebook whose table does not fit (``FIB_TABLE_MAX_BYTES`` per query head) is declined.
``why_not`` says so for anything else (prefill chunks, other codecs, the score bias of position-aware key
centring), and ops dispatch moves on to the next
implementation: this module never falls back by itself and imports no Triton.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

from vllm_kvq.codecs.fibquant import FibQuantCodec
from vllm_kvq.codecs.turboquant import SCALE_MODES, TurboQuantCodec
from vllm_kvq.kernels import heads_tensor
from vllm_kvq.kernels import num_splits as _num_splits
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


# csrc/cuda/tq_params.h: kKindTurboQuant, kKindFibQuant and kFibTableMaxBytes (one query head's score table).
KIND_TURBOQUANT, KIND_FIBQUANT = 0, 1
FIB_TABLE_MAX_BYTES = 160 * 1024
HEAD_SIZES = (64, 128)


def codec_spec(codec) -> list[int]:
    """[b0, n0, b1, seg1, meta, w, rotate, scale_mode, kind, block]: what csrc/cuda/torch_bindings.cpp
    ``codec_of`` reads. FibQuant is one segment of D/k codes of L index bits into a table of 2**L codewords."""
    if type(codec) is TurboQuantCodec:
        return codec.native_params() + [KIND_TURBOQUANT, 1]
    if type(codec) is FibQuantCodec:
        lb, m = codec.index_bits, codec.num_blocks
        return [lb, m, lb, codec.code_nbytes, codec.code_nbytes, 1 << lb, int(codec.rotation.kind != "identity"),
                SCALE_MODES.index(codec.scale_mode), KIND_FIBQUANT, codec.block]
    raise ValueError(f"no CUDA kernel for codec type {type(codec).__name__} ({codec.name})")


def fib_table_bytes(codec) -> int:
    """Shared memory of one query head's FibQuant score table: (D / k) x 2**L floats."""
    return codec.num_blocks * (1 << codec.index_bits) * 4


def _side_args(g, side: str, device) -> list:
    codec = g.key if side == "k" else g.value
    rt, t0, t1 = codec.tables(device)
    return [codec_spec(codec), rt, t0, t1]


def _sink(fmt: KVFormat) -> list[int]:
    return [fmt.sink_tokens, fmt.sink_offset, fmt.sink_bytes]


def why_not(fmt: KVFormat, op: str = "paged_attention", decode: bool = True, group: int = 1) -> str | None:
    """None when the extension runs ``op`` for ``fmt`` (``group`` query heads per KV head), else why not."""
    if op == "paged_attention" and not decode:
        return "the CUDA kernels run decode steps only (prefill chunks are not implemented)"
    if op == "paged_attention" and fmt.key_rope is not None:
        # The store needs nothing (ops.store centres the keys before any implementation sees them).
        return ("position-aware key centring: the CUDA decode adds no per-chunk score bias (key_bias); "
                "the Triton kernel runs it")
    if op == "paged_attention" and not 1 <= group <= 8:
        return f"GQA groups of 1..8 query heads are compiled, got {group}"
    if fmt.head_size not in HEAD_SIZES:
        return f"head size {fmt.head_size} is not compiled ({', '.join(map(str, HEAD_SIZES))})"
    for g in fmt.groups:
        for c in (g.key, g.value):
            # Exact types: a subclass may change the bytes or the math the kernels hard-code.
            if type(c) not in (TurboQuantCodec, FibQuantCodec):
                return f"codec {c.name} has no CUDA kernel (TurboQuant and FibQuant only)"
        if op == "paged_attention" and type(g.key) is FibQuantCodec and fib_table_bytes(g.key) > FIB_TABLE_MAX_BYTES:
            k = g.key
            return (f"{k.name}: the FibQuant score table of {k.num_blocks} x {1 << k.index_bits} floats "
                    f"({fib_table_bytes(k) // 1024} KiB per query head) exceeds the {FIB_TABLE_MAX_BYTES // 1024} KiB "
                    f"of shared memory a CUDA decode block gives it")
    return None


def store(key: torch.Tensor,  # (N, Hk, D)
          value: torch.Tensor,  # (N, Hk, D)
          cache: torch.Tensor,  # (B, Hk, T, C) uint8, any strides
          slot_mapping: torch.Tensor,  # (N,) int; -1 = padding
          fmt: KVFormat) -> None:
    why = why_not(fmt, "store")
    if why:
        raise ValueError(f"the CUDA store does not take format {fmt.name!r}: {why}")
    if key.shape[0] == 0:
        return
    if key.dtype != value.dtype:  # position-centred keys arrive in float32 beside 16-bit values: widen, exactly
        key, value = key.float(), value.float()
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    dev = cache.device
    for g in fmt.groups:
        heads = heads_tensor(g.heads, dev)
        torch.ops.vllm_kvq.tq_store(key, value, cache, slot_mapping, heads, g.key.nbytes, g.key.nbytes + g.value.nbytes,
                                    *_side_args(g, "k", dev), *_side_args(g, "v", dev), g.state("k", "shift", dev),
                                    g.state("k", "scale", dev), g.state("v", "shift", dev), g.state("v", "scale", dev),
                                    _sink(fmt))


def paged_attention(query: torch.Tensor,  # (N, Hq, D)
                    cache: torch.Tensor,  # (B, Hk, T, C) uint8
                    block_table: torch.Tensor,  # (S, max_blocks) int
                    seq_lens: torch.Tensor,  # (S,)
                    query_start_loc: torch.Tensor,  # (S + 1,)
                    fmt: KVFormat, *, scale: float, max_seq_len: int | None = None,
                    num_splits: int | None = None) -> torch.Tensor:
    """Decode steps (N == S) of supported formats (see ``why_not``); ``num_splits`` fixes split-K (tests)."""
    n, hq, d = query.shape
    s = seq_lens.shape[0]
    group = hq // fmt.num_kv_heads
    why = why_not(fmt, "paged_attention", n == s, group)
    if why:
        raise ValueError(f"the CUDA decode does not take this call for format {fmt.name!r}: {why}")
    out = torch.zeros_like(query) if query.stride(-1) == 1 else torch.zeros(query.shape, dtype=query.dtype,
                                                                           device=query.device)
    if n == 0:
        return out
    query = query if query.stride(-1) == 1 else query.contiguous()
    t = cache.shape[2]
    max_ctx = block_table.shape[1] * t
    if max_seq_len is not None:
        max_ctx = max(1, min(max_ctx, int(max_seq_len)))
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
    dev = cache.device
    for g in fmt.groups:
        heads = heads_tensor(g.heads, dev)
        torch.ops.vllm_kvq.tq_decode(query, out, cache, bt, seq_lens, qsl, heads, g.key.nbytes, scale, splits,
                                     split_tokens, partial, ml, *_side_args(g, "k", dev), *_side_args(g, "v", dev),
                                     g.state("k", "scale", dev), g.state("v", "shift", dev), g.state("v", "scale", dev),
                                     _sink(fmt))
    return out

"""Engine-agnostic paged ops over packed KV caches.

    ops.store(key, value, cache, slot_mapping, fmt, impl=None, positions=None)
    out = ops.paged_attention(query, cache, block_table, seq_lens, query_start_loc, fmt, scale=..., impl=None)

Formats with position-aware key centring (``fmt.key_rope``, ``vllm_kvq.key_centre``) need each stored token's
position (``positions``): ``store`` subtracts the key mean turned to it before the implementation quantizes,
and ``paged_attention`` hands the implementation ``key_bias=(bias_query (N, Hq, D), table (P, D): one row per position)``, whose
products ``bias_query[row] . table[p]`` it adds to the score of every key at position p.

Formats with ``exact_self`` (YAML ``exact_self: true``) let every query row attend to its own position with the
exact key and value the model produced (``self_kv``: the step's keys and values) instead of the
cache's quantized copy: the implementation attends the other positions (``exclude_self=True``) and returns each
row's log-sum-exp (``lse``), and ``_merge_self`` adds the exact term. A row's own K/V are in every step's inputs,
so a prefix-cache hit and a chunked prefill see exactly what a cold single-chunk run sees.

One implementation table: each entry says on which devices it runs and, through ``why_not``, why it cannot
take a format (or a call's shape). ``impl=None`` takes the first entry for the tensors' device that
accepts the call (the choice, and why faster ones declined, are logged once), or the one the debug knob
``VLLM_KVQ_IMPL`` names (e.g. to compare a kernel with the reference inside a running engine); naming an
impl that declines is an error that says why. Shapes and dtypes are checked here, in the launcher.

    ops.plan(fmt, device)    # -> {impl: None or why not}, in the order ``impl=None`` tries them
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from vllm_kvq.kv_format import KVFormat
from vllm_kvq.ops import reference

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Impl:
    name: str
    store: Callable
    paged_attention: Callable
    # (fmt, op "store" / "paged_attention", decode: every sequence has one new token, group: query heads per
    # KV head) -> None or why not
    why_not: Callable[[KVFormat, str, bool, int], str | None]
    # paged_attention takes ``key_bias`` (position-aware key centring)
    key_rope: bool = False
    # paged_attention takes ``exclude_self`` and ``lse`` (formats with ``exact_self``)
    exact_self: bool = False

    def declines(self, fmt: KVFormat, op: str, decode: bool, group: int) -> str | None:
        if fmt.key_rope is not None and op == "paged_attention" and not self.key_rope:
            return "position-aware key centring (calibration with rope_freq) is not in this implementation yet"
        if fmt.exact_self and op == "paged_attention" and not self.exact_self:
            return "exact_self (each row's own key and value at full precision) is not in this implementation yet"
        return self.why_not(fmt, op, decode, group)


# Fastest first, per device type. Triton runs on CPU only when asked for (the interpreter is for tests).
ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
_FORCED_IMPL = os.environ.get("VLLM_KVQ_IMPL") or None  # debug knob, read once
_announced: set = set()
_used: set[tuple[str, str]] = set()  # (op, impl) that ran in this process


def used() -> list[str]:
    """"op:impl" for every implementation an op dispatched to in this process (engine tests read it)."""
    return sorted(f"{op}:{impl}" for op, impl in _used)


@functools.cache
def _table() -> dict[str, Impl]:
    """Every implementation importable in this process; built once (the ops sit on vLLM's hot path).

    Only a missing module (Triton not installed, extension not built) drops an entry; any other import
    error is a bug and propagates."""
    table = {"reference": Impl("reference", reference.store, reference.paged_attention, lambda *a: None,
                               key_rope=True, exact_self=True)}
    try:
        from vllm_kvq.kernels import triton as _triton
    except ModuleNotFoundError:
        pass
    else:
        table["triton"] = Impl("triton", _triton.store, _triton.paged_attention, _triton.why_not, key_rope=True,
                               exact_self=True)
    from vllm_kvq.kernels import cuda as _cuda
    if _cuda.available():
        table["cuda"] = Impl("cuda", _cuda.store, _cuda.paged_attention, _cuda.why_not)
    from vllm_kvq.kernels import cpu as _cpu
    if _cpu.available():
        table["cpu"] = Impl("cpu", _cpu.store, _cpu.paged_attention, _cpu.why_not, key_rope=True,
                            exact_self=True)
    return table


IMPLS = ("reference", "triton", "cuda", "cpu")


def plan(fmt: KVFormat, device: torch.device | str, op: str = "paged_attention", decode: bool = True,
         group: int = 1) -> dict[str, str | None]:
    """{impl: None if it takes ``fmt`` for this op, else why not} for ``device``, in dispatch order;
    implementations not available here say so."""
    device = torch.device(device)
    table = _table()
    out = {}
    for name in ORDER.get(device.type, ("reference",)):
        out[name] = table[name].declines(fmt, op, decode, group) if name in table else "not available in this process"
    return out


def _pick(op: str, impl: str | None, device: torch.device, fmt: KVFormat, decode: bool,
          group: int = 1) -> Callable:
    if impl is None and _FORCED_IMPL is None:
        # vLLM's per-layer hot path: the choice depends only on these arguments (and the dispatch order), so
        # it is made once per format.
        picked = _PICKED.get(fmt)
        if picked is None:
            picked = _PICKED[fmt] = {}
        key = (op, device.type, decode, group, ORDER.get(device.type))
        choice = picked.get(key)
        if choice is None:
            choice = picked[key] = _choose(op, device, fmt, decode, group)
        _used.add(choice[1])
        return choice[0]
    table = _table()
    if impl is None:
        impl = _FORCED_IMPL
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; allowed: {', '.join(IMPLS)}")
    if impl not in table:
        raise RuntimeError(f"impl {impl!r} is not available here; available: {', '.join(table)}")
    why = table[impl].declines(fmt, op, decode, group)
    if why is not None:
        raise ValueError(f"impl {impl!r} cannot run {op} for format {fmt.name!r}: {why}")
    _used.add((op, impl))
    return getattr(table[impl], op)


# fmt -> {(op, device type, decode, group): (the implementation's op, (op, impl))}: ``_pick``'s choices without a
# forced impl.
_PICKED: "weakref.WeakKeyDictionary[KVFormat, dict]" = weakref.WeakKeyDictionary()


def _choose(op: str, device: torch.device, fmt: KVFormat, decode: bool, group: int) -> tuple[Callable, tuple[str, str]]:
    """(the first implementation in ``ORDER`` that takes the call, (op, its name)); logs the choice (and why
    faster ones declined) once per (op, implementation, format)."""
    reasons = plan(fmt, device, op, decode, group)
    name = next(n for n, why in reasons.items() if why is None)
    key = (op, name, fmt.name)
    if key not in _announced:
        _announced.add(key)
        skipped = "; ".join(f"{n}: {why}" for n, why in reasons.items() if n != name and why is not None
                            and list(reasons).index(n) < list(reasons).index(name))
        logger.info("vllm_kvq: %s of %s runs the %s implementation on %s%s", op, fmt.name, name, device.type,
                    f" ({skipped})" if skipped else "")
    return getattr(_table()[name], op), (op, name)


def fused_plan(fmt: KVFormat, device: torch.device | str, group: int = 1):
    """The CPU extension's parsed ``FormatPlan`` of ``fmt`` when a layer's store and attention may run as one
    native call (``kernels.cpu.forward``): on a CPU, where the dispatch (``VLLM_KVQ_IMPL`` included) picks the CPU
    kernels for the store and for decode and prefill attention (formats with position-aware key centring pass
    the keys' centres and the queries' bias to it, formats with ``exact_self`` the step's key and value); else
    None (the caller goes through ``store`` and ``paged_attention``). Logs and records the choice as those
    would."""
    device = torch.device(device)
    table = _table()
    if device.type != "cpu" or "cpu" not in table:
        return None
    from vllm_kvq.kernels import cpu as _cpu

    cpu = table["cpu"]
    if _cpu.DENSE_PREFILL_FROM is not None:  # the opt-in dense prefill path lives in Python
        return None
    picks = [_pick("store", None, device, fmt, False, group) is cpu.store,
             _pick("paged_attention", None, device, fmt, True, group) is cpu.paged_attention,
             _pick("paged_attention", None, device, fmt, False, group) is cpu.paged_attention]
    if not all(picks):
        return None
    _used.add(("forward", "cpu"))
    return _cpu.format_plan(fmt)


def _check_kv(name, t, n, fmt):
    if t.dim() != 3 or t.shape[0] != n or t.shape[1] != fmt.num_kv_heads or t.shape[2] != fmt.head_size:
        raise ValueError(f"{name}: expected ({n}, {fmt.num_kv_heads}, {fmt.head_size}), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")


def store(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
          fmt: KVFormat, *, impl: str | None = None, positions: torch.Tensor | None = None,
          max_position: int | None = None) -> None:
    """Quantize key/value (N, Hk, D) into the cache slots of ``slot_mapping`` (N,); -1 slots are skipped.
    ``positions`` (N,): each token's position in its sequence (needed when ``fmt.key_rope``); ``max_position``:
    a host-side bound of them (vLLM's max_model_len - 1) that sizes the shared position table without reading
    the device (CUDA graphs capture the store); without it a CPU store reads the largest position and a GPU
    store takes the cache's capacity."""
    fmt.check_cache(cache)
    n = slot_mapping.shape[0]
    _check_kv("key", key, n, fmt)
    _check_kv("value", value, n, fmt)
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping: expected 1-D int32/int64, got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if fmt.key_rope is not None:
        if positions is None or positions.shape != (n,):
            raise ValueError(f"format {fmt.name!r} centres keys by position (calibrated with rope_freq): store needs "
                             f"positions of shape ({n},), got {None if positions is None else tuple(positions.shape)}")
        if max_position is None and positions.device.type != "cpu":
            max_position = cache.shape[0] * cache.shape[2] - 1  # every position has a slot in this cache
        key = key.float() - fmt.key_rope.centre(positions, max_position)
    _pick("store", impl, cache.device, fmt, False)(key, value, cache, slot_mapping, fmt)


def paged_attention(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, fmt: KVFormat, *, scale: float, max_seq_len: int | None = None,
                    impl: str | None = None,
                    self_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal paged attention over the packed cache for a batch mixing prefills and decodes -> (N, Hq, D).

    ``max_seq_len``: an upper bound of ``seq_lens`` known on the host (vLLM's metadata has it); the GPU
    kernels size split-K from it instead of from the block table's width. ``self_kv`` = (key (N, Hk, D),
    value (N, Hk, D)): this step's keys and values, needed by formats with ``exact_self``."""
    fmt.check_cache(cache)
    if query.dim() != 3 or query.shape[2] != fmt.head_size or query.shape[1] % fmt.num_kv_heads:
        raise ValueError(f"query: expected (N, Hq, {fmt.head_size}) with Hq a multiple of {fmt.num_kv_heads}, "
                         f"got {tuple(query.shape)}")
    s = seq_lens.shape[0]
    if query_start_loc.shape != (s + 1,) or block_table.dim() != 2 or block_table.shape[0] < s:
        raise ValueError(f"expected query_start_loc ({s + 1},) and block_table ({s}, max_blocks); got "
                         f"{tuple(query_start_loc.shape)} and {tuple(block_table.shape)}")
    # N == S: one new token per sequence in any batch vLLM builds, i.e. a decode step (known from shapes).
    fn = _pick("paged_attention", impl, query.device, fmt, query.shape[0] == s, query.shape[1] // fmt.num_kv_heads)
    extra = {}
    if fmt.key_rope is not None:
        # The table covers every position the block table can address (no host read of seq_lens).
        positions = block_table.shape[1] * cache.shape[2]
        extra["key_bias"] = (fmt.key_rope.bias_query(query, scale), fmt.key_rope.table(positions, query.device))
    if not fmt.exact_self:
        return fn(query, cache, block_table[:s], seq_lens, query_start_loc, fmt, scale=scale,
                  max_seq_len=max_seq_len, **extra)
    if self_kv is None:
        raise ValueError(f"format {fmt.name!r} attends each row's own token exactly (exact_self): paged_attention "
                         f"needs self_kv=(key, value) of this step")
    key, value = self_kv
    n = query.shape[0]
    _check_kv("self_kv key", key, n, fmt)
    _check_kv("self_kv value", value, n, fmt)
    lse = torch.empty(n, query.shape[1], dtype=torch.float32, device=query.device)
    out = fn(query, cache, block_table[:s], seq_lens, query_start_loc, fmt, scale=scale, max_seq_len=max_seq_len,
             exclude_self=True, lse=lse, **extra)
    return _merge_self(out, lse, query, key, value, fmt, scale)


def _merge_self(out: torch.Tensor,  # (N, Hq, D): attention over every position but the row's own
                lse: torch.Tensor,  # (N, Hq) its log-sum-exp, in the implementation's score convention
                query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fmt: KVFormat,
                scale: float) -> torch.Tensor:
    """Adds each row's own (exact) key and value to attention computed without it: a two-part softmax merge.

    The implementations' scores are ``scale * q . (k - centre)`` plus the key bias, which adds the centre's
    rotary part back (position-aware centring), i.e. ``scale * q . (k - fixed)`` with ``fixed`` the fixed key
    mean (a fixed-mean calibration) or its channels past the rotary ones (position-aware): the self score is
    formed the same way (key smoothing cancels in the product), so both parts share one convention."""
    n, hq, d = query.shape
    hk = fmt.num_kv_heads
    g = hq // hk
    k = key.float()
    fixed = fmt.key_rope.fixed_mean(k.device) if fmt.key_rope is not None else fmt.k_shift
    if fixed is not None:
        k = k - fixed.to(k.device)
    # Few, fused ops (this runs per layer and step): s_self (N, Hk, G, 1); the own term's share of the softmax,
    # exp(s_self) / (exp(lse) + exp(s_self)) = sigmoid(s_self - lse), is 1 for a row with no other key
    # (lse = -inf, its partial output 0).
    s_self = torch.matmul(query.float().view(n, hk, g, d), k.unsqueeze(-1)).mul_(scale)
    w = torch.sigmoid(s_self.sub_(lse.view(n, hk, g, 1)))
    merged = torch.lerp(out.float().view(n, hk, g, d), value.float().unsqueeze(2), w)
    return merged.view(n, hq, d).to(out.dtype)


__all__ = ["store", "paged_attention", "fused_plan", "plan", "used", "IMPLS", "ORDER", "reference"]

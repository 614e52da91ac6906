"""Python side of the CPU extension (csrc/cpu, built as ``vllm_kvq._C_cpu`` by setup.py on x86-64):
``store`` and ``paged_attention`` with the reference signatures, for every codec the package registers
(TurboQuant at integer and fractional rates, FibQuant, uniform, raw bf16/fp16), mixed per-head formats (one
call per head group), codecs bound to per-head state (key shift and scale, value shift and scale) and
per-block sink records, position-aware key centring (``key_bias``: a score bias per query row and key
position, csrc/cpu/key_bias.h), and what formats with ``exact_self`` need (``exclude_self``: each
row attends the positions before its own; ``lse``: each row's log-sum-exp, merged over split contexts).

FibQuant: codes decode into float tiles like every codec's (8 block indices per L-byte chunk, each block's
codeword copied whole; the row scale applied to a tile's scores and weights). A table-lookup decode remains
behind ``FIB_LUT_FROM`` (off by default): a decode work item over at least that many context tokens scores keys
by table lookups (per query row, the rotated query block's inner product with every codeword: D/k x 2^L floats,
built once per item) and sums values as a histogram of weights per (block position, codeword), folded into
codewords once at the end; codebooks of more than 1024 codewords (11 or 12 index bits), prefill chunks and
short contexts take the tiles. Measured 2026-12-03 (AVX2, SmolLM2 shapes, `bench_cpu.py fib`): the tables 3-5x
slower than the tiles once the tile decode copied whole codewords.

The extension picks its ISA at run time: the hand-written AVX-512 build when the CPU has F/BW/VL/DQ/VBMI, else
the AVX2 + FMA + F16C build (hand-written 8-wide tile loops, the rest the portable C++ vectorized by the
compiler), else the portable C++ for the baseline ISA; ``isa=`` forces
one (tests run all three), and the debug knob ``VLLM_KVQ_CPU_ISA`` (avx512, avx2 or portable) sets the default,
e.g. to run a CPU without AVX-512's code path inside an engine. Threads come from ``at::parallel_for``, i.e. the
OpenMP threads torch (and vLLM-CPU's thread binding) set up.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import weakref

import torch

from vllm_kvq.codecs.base import VectorCodec
from vllm_kvq.codecs.fibquant import FibQuantCodec
from vllm_kvq.codecs.raw import RawCodec
from vllm_kvq.codecs.turboquant import SCALE_MODES, TurboQuantCodec
from vllm_kvq.codecs.uniform import UniformCodec
from vllm_kvq.kv_format import KVFormat

logger = logging.getLogger(__name__)

ISAS = {"best": 0, "portable": 1, "avx512": 2, "avx2": 3}
# Prefill chunks of at least this many query tokens may attend through torch's scaled_dot_product_attention
# (its CPU flash kernel, float32) over the context decoded once to the rotated domain, instead of the fused
# kernel. Off (None) by default: the fused kernel's prefill (csrc/cpu/prefill_avx512.h) is as fast, and gives
# a row the same bits whichever chunk it lands in, where SDPA's key blocks follow the call's length (a
# prefix-cache hit's suffix and the cold run differed by 4e-3 nats on the tiny test models; 1e-3 allowed).
DENSE_PREFILL_FROM: int | None = None
_ROTATIONS = {"identity": 0, "hadamard": 1, "haar": 2}
MAX_HEAD_SIZE = 1024
# Context tokens per decode work item from which FibQuant codes are read through lookup tables (see above);
# None (the default): never (tests set 0 to run the table path on short contexts).
FIB_LUT_FROM: int | None = None
# Decode items over TurboQuant codes of <= 4 bits decode each token in registers for every query row of its KV
# head (csrc/cpu/decode_fused.h; AVX-512 and AVX2 builds), giving the general tile path's bits. False sends them
# through the general path (paged_attention; forward always fuses): a debug knob, so tests can compare the two.
FUSED_DECODE = True


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Loads the extension once; returns None on success, else why it is not usable."""
    spec = importlib.util.find_spec("vllm_kvq._C_cpu")
    if spec is None or spec.origin is None:
        return "the CPU extension vllm_kvq._C_cpu is not built (pip install -e . builds it on x86-64)"
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as e:
        return f"the CPU extension {spec.origin} does not load ({e})"
    for name in ("vllm_kvq_cpu::store", "vllm_kvq_cpu::paged_attention", "vllm_kvq_cpu::decode_context",
                 "vllm_kvq_cpu::rotate", "vllm_kvq_cpu::forward"):
        try:  # both ops only mutate their arguments: nothing to compute for fake tensors
            torch.library.register_fake(name)(lambda *args, **kwargs: None)
        except RuntimeError:  # already registered by an earlier load in this process
            pass
    logger.info("vllm_kvq: CPU kernels loaded from %s (ISA %s)", spec.origin, best_isa())
    return None


def available() -> bool:
    """True when the built extension loads (the ops then run on any CPU tensors)."""
    why = _load()
    if why is not None:
        _log_once(why)
    return why is None


@functools.lru_cache(maxsize=None)
def _log_once(msg: str) -> None:
    logger.info("vllm_kvq: %s", msg)


def best_isa() -> str:
    """The ISA the kernels run with by default on this CPU: "avx512", "avx2" or "portable"."""
    return torch.ops.vllm_kvq_cpu.best_isa()


def has_isa(isa: str) -> bool:
    """Whether this CPU can run the kernels' ``isa`` build (a name of ``ISAS``)."""
    return bool(torch.ops.vllm_kvq_cpu.has_isa(_isa(isa)))


def fused_decode(fmt: KVFormat, isa: str = "best") -> list[bool]:
    """Per head group of ``fmt``: whether its decode items decode codes in registers for every query row
    (``FUSED_DECODE``) in the build ``isa`` runs them with, rather than through float tiles."""
    why = why_not(fmt)
    if why is not None:
        _refuse("paged_attention", fmt, why)
    code = _isa(isa)
    return [bool(torch.ops.vllm_kvq_cpu.fused_decode(ks, kt, vs, vt, code)) for _, _, _, ks, kt, vs, vt in
            _group_args(fmt)]


def fused_decode_tiles() -> int:
    """Context tiles decode items have taken through the register-fused decode in this process (every build
    and thread): a debug count for tests, since the fused path gives the general path's bits."""
    return int(torch.ops.vllm_kvq_cpu.fused_decode_tiles())


def _codec_why_not(c: VectorCodec) -> str | None:
    # Exact types: a subclass may change the bytes or the math the kernels hard-code.
    if type(c) not in (TurboQuantCodec, UniformCodec, RawCodec, FibQuantCodec):
        return f"no CPU kernel for codec type {type(c).__name__} ({c.name})"
    if c.rotation.kind not in _ROTATIONS:
        return f"{c.name}: rotation {c.rotation.kind!r} has no CPU kernel"
    return None


# Per format (its codecs and head size decide; the ops ask on every call of vLLM's per-layer hot path).
_WHY_NOT: "weakref.WeakKeyDictionary[KVFormat, tuple[str | None]]" = weakref.WeakKeyDictionary()


def why_not(fmt: KVFormat, op: str = "paged_attention", decode: bool = True, group: int = 1) -> str | None:
    """None when these kernels run ``fmt``, else why not (the extension is missing, a codec is unknown, a
    format feature the kernels do not implement)."""
    why = _load()
    if why is not None:
        return why
    known = _WHY_NOT.get(fmt)
    if known is None:
        known = _WHY_NOT[fmt] = (_format_why_not(fmt),)
    return known[0]


def _format_why_not(fmt: KVFormat) -> str | None:
    if fmt.head_size > MAX_HEAD_SIZE:
        return f"head size {fmt.head_size} > {MAX_HEAD_SIZE}"
    for g in fmt.groups:
        for c in (g.key, g.value):
            why = _codec_why_not(c)
            if why is not None:
                return why
    return None


_EMPTY = torch.zeros(0, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _codec_args_by_key(key: tuple, codec: VectorCodec) -> tuple[list[int], list[torch.Tensor]]:
    return _codec_args(codec)


def codec_args(codec: VectorCodec) -> tuple[list[int], list[torch.Tensor]]:
    """(spec ints, tables) as csrc/cpu/torch_bindings.cpp ``codec_of`` reads them; cached per codec."""
    return _codec_args_by_key(codec.key, codec)


def _codec_args(codec: VectorCodec) -> tuple[list[int], list[torch.Tensor]]:
    d = codec.head_dim
    rot = codec.rotation
    signs = rot.signs.float().contiguous() if rot.kind == "hadamard" else _EMPTY
    mat = rot.matrix(dtype=torch.float32).contiguous() if rot.kind == "haar" else _EMPTY
    if isinstance(codec, TurboQuantCodec):
        (b0, n0), (b1, _) = codec.segments[0], codec.segments[-1]
        books = codec.codebooks
        tabs = [books[0].centroids_tensor(), books[-1].centroids_tensor(), books[0].thresholds_tensor(),
                books[-1].thresholds_tensor()]
        spec = [0, d, codec.nbytes, b0, n0, b1, codec.segment_nbytes[0], codec.code_nbytes, d,
                SCALE_MODES.index(codec.scale_mode), _ROTATIONS[rot.kind]]
    elif isinstance(codec, FibQuantCodec):
        words, half_sq = codec.codec_tables()  # the codebook (W * K,) and the reference's 0.5 ||w||^2 (W,)
        tabs = [words, _EMPTY, half_sq, _EMPTY]
        spec = [4, d, codec.nbytes, codec.index_bits, codec.block, codec.index_bits, codec.code_nbytes,
                codec.code_nbytes, d, SCALE_MODES.index(codec.scale_mode), _ROTATIONS[rot.kind]]
    elif isinstance(codec, UniformCodec):
        tabs = [_EMPTY] * 4
        spec = [1, d, codec.nbytes, codec.bits, d, codec.bits, codec.code_nbytes, codec.code_nbytes,
                codec.group_size, 0, _ROTATIONS[rot.kind]]
    elif isinstance(codec, RawCodec):
        tabs = [_EMPTY] * 4
        kind = 2 if codec.torch_dtype == torch.bfloat16 else 3
        spec = [kind, d, codec.nbytes, 16, d, 16, 2 * d, 2 * d, d, 0, _ROTATIONS["identity"]]
    else:
        raise ValueError(f"no CPU kernel for codec type {type(codec).__name__}")
    return spec, [t.contiguous() for t in tabs] + [signs, mat]


# Per format: one argument tuple per head group (built once; the ops sit on vLLM's per-layer hot path).
_GROUP_ARGS: "weakref.WeakKeyDictionary[KVFormat, list[tuple]]" = weakref.WeakKeyDictionary()


def _group_args(fmt: KVFormat) -> list[tuple]:
    args = _GROUP_ARGS.get(fmt)
    if args is None:
        args = []
        for g in fmt.groups:
            heads = torch.tensor(g.heads, dtype=torch.int32)
            ks, kt = codec_args(g.key)
            vs, vt = codec_args(g.value)
            args.append((heads, g.key.nbytes, g.key.nbytes + g.value.nbytes, ks, kt, vs, vt))
        _GROUP_ARGS[fmt] = args
    return args


_FMT_ARGS: "weakref.WeakKeyDictionary[KVFormat, tuple]" = weakref.WeakKeyDictionary()


def _fmt_args(fmt: KVFormat) -> tuple[torch.Tensor | None, list[int]]:
    """(v_scale (Hk, D) of the value codecs, ones for unbound heads, or None; [sink tokens, offset, bytes])."""
    args = _FMT_ARGS.get(fmt)
    if args is None:
        scales = [c.scale for c in fmt.values]
        v_scale = None if all(t is None for t in scales) else torch.stack(
            [torch.ones(fmt.head_size) if t is None else t for t in scales]).float().contiguous()
        args = (v_scale, [fmt.sink_tokens, fmt.sink_offset, fmt.sink_bytes])
        _FMT_ARGS[fmt] = args
    return args


_PLANS: "weakref.WeakKeyDictionary[KVFormat, torch.ScriptObject]" = weakref.WeakKeyDictionary()


def format_plan(fmt: KVFormat) -> torch.ScriptObject:
    """The extension's ``FormatPlan`` of ``fmt``: its head groups' codecs parsed once, the per-head shifts and
    scales, the sink area (made once per format; ``forward`` takes it instead of ~20 arguments per call)."""
    plan = _PLANS.get(fmt)
    if plan is None:
        why = why_not(fmt)
        if why is not None:
            _refuse("forward", fmt, why)
        v_scale, sinks = _fmt_args(fmt)
        plan = torch.classes.vllm_kvq_cpu.FormatPlan(fmt.k_shift, fmt.k_scale, fmt.v_shift, v_scale, sinks)
        for heads, vo, pad, ks, kt, vs, vt in _group_args(fmt):
            plan.add_group(heads, vo, pad, ks, kt, vs, vt)
        # the own-token score leaves out the key mean that scores leave out (ops._merge_self)
        fixed = fmt.key_rope.fixed_mean("cpu") if fmt.key_rope is not None else fmt.k_shift
        plan.set_features(fmt.key_rope is not None, bool(fmt.exact_self),
                          None if fixed is None or not fmt.exact_self else fixed.float().contiguous())
        _PLANS[fmt] = plan
    return plan


def forward(query: torch.Tensor,  # (N, Hq, D), last dim contiguous
            out: torch.Tensor,  # (N, Hq, D) of the query's dtype: rows of sequences are written
            key: torch.Tensor | None,  # (N, Hk, D) this step's keys, or None (nothing to store)
            value: torch.Tensor | None,
            cache: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
            query_start_loc: torch.Tensor,  # int32, as vLLM-CPU's metadata holds them
            plan: torch.ScriptObject, *, scale: float, isa: str = "best",
            centre: torch.Tensor | None = None,
            key_bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``store`` then ``paged_attention`` in one native call, with the format's ``format_plan``: vLLM-CPU's
    per-layer hot path (``KVQAttentionImpl.forward``), where ~20 arguments converted per op call and the
    Python checks around them cost more than a short decode's kernels. The caller has the shapes right (vLLM's
    layer does); the extension still refuses what it would misread (dtypes, strides, slots past the cache,
    sequences past their block table).

    Formats with position-aware key centring take ``centre`` (N, Hk, D) float32, the stored keys' centres
    (``fmt.key_rope.centre(positions)``; None when key is None), and ``key_bias`` as ``paged_attention`` does;
    formats with ``exact_self`` take the step's key and value and merge each row's own token in (as
    ``ops.paged_attention`` with ``self_kv``)."""
    bias_q, table = (None, None) if key_bias is None else key_bias
    torch.ops.vllm_kvq_cpu.forward(query, out, key, value, cache, slot_mapping, block_table, seq_lens,
                                   query_start_loc, plan, float(scale), -1 if FIB_LUT_FROM is None else FIB_LUT_FROM,
                                   _isa(isa), centre, bias_q, table)


def _isa(isa: str) -> int:
    if isa == "best":
        isa = _default_isa()
    if isa not in ISAS:
        raise ValueError(f"unknown isa {isa!r}; allowed: {', '.join(ISAS)}")
    return ISAS[isa]


@functools.lru_cache(maxsize=None)
def _default_isa() -> str:
    """"best", or what the debug knob VLLM_KVQ_CPU_ISA names (read once; the kernel refuses an ISA this CPU
    lacks)."""
    isa = os.environ.get("VLLM_KVQ_CPU_ISA") or "best"
    if isa not in ISAS:
        raise ValueError(f"VLLM_KVQ_CPU_ISA={isa!r} is not an ISA of the CPU kernels; allowed: {', '.join(ISAS)}")
    if isa != "best":
        logger.info("vllm_kvq: CPU kernels forced to ISA %s (VLLM_KVQ_CPU_ISA)", isa)
    return isa


def _refuse(op: str, fmt: KVFormat, why: str):
    # ops dispatch asks why_not first and moves on; a direct call with a declined format is a caller bug.
    raise ValueError(f"the CPU {op} does not take format {fmt.name!r}: {why}")


def store(key: torch.Tensor,  # (N, Hk, D)
          value: torch.Tensor,  # (N, Hk, D)
          cache: torch.Tensor,  # (B, Hk, T, C) uint8, any strides
          slot_mapping: torch.Tensor,  # (N,) int; -1 = padding
          fmt: KVFormat, *, isa: str = "best") -> None:
    why = why_not(fmt, "store")
    if why is not None:
        _refuse("store", fmt, why)
    if key.shape[0] == 0:
        return
    code = _isa(isa)
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    if key.dtype != value.dtype:
        value = value.to(key.dtype)
    slot_mapping = slot_mapping.to(torch.int64).contiguous()
    v_scale, sinks = _fmt_args(fmt)
    for heads, vo, pad, ks, kt, vs, vt in _group_args(fmt):
        torch.ops.vllm_kvq_cpu.store(key, value, cache, slot_mapping, heads, vo, pad, ks, kt, vs, vt,
                                     fmt.k_shift, fmt.k_scale, fmt.v_shift, v_scale, sinks, code)


def paged_attention(query: torch.Tensor,  # (N, Hq, D)
                    cache: torch.Tensor,  # (B, Hk, T, C) uint8
                    block_table: torch.Tensor,  # (S, max_blocks) int
                    seq_lens: torch.Tensor,  # (S,)
                    query_start_loc: torch.Tensor,  # (S + 1,)
                    fmt: KVFormat, *, scale: float, max_seq_len: int | None = None,
                    num_splits: int | None = None, isa: str = "best",
                    key_bias: tuple[torch.Tensor, torch.Tensor] | None = None, exclude_self: bool = False,
                    lse: torch.Tensor | None = None) -> torch.Tensor:
    """Decode, prefill and chunked prefill in one call -> (N, Hq, D) in the query's dtype. ``num_splits``
    fixes how many context splits a decode sequence gets (None: enough to keep every thread busy);
    ``max_seq_len`` is accepted for the ops signature (the CPU kernels read ``seq_lens``). ``key_bias``
    (bias_query (N, Hq, D), table (C, D)), required by ``fmt.key_rope``: the score of the key at position p
    gains ``bias_query[row] . table[p]`` (``vllm_kvq.ops``).

    ``exclude_self``: a row at position p attends positions j < p only (a row with none outputs 0); ``lse``
    (N, Hq) float32: filled with each row's log-sum-exp of the scores it attended (split contexts merged),
    -inf for rows with no key; both as the reference defines them (formats with ``exact_self``)."""
    why = why_not(fmt)
    if why is not None:
        _refuse("paged_attention", fmt, why)
    code = _isa(isa)
    query = query if query.stride(-1) == 1 else query.contiguous()
    bias_q, table = _key_bias_args(key_bias, query, fmt)
    out = torch.zeros(query.shape, dtype=query.dtype)
    if lse is not None:
        if lse.shape != query.shape[:2] or lse.dtype != torch.float32 or lse.device.type != "cpu" or \
                lse.stride(-1) != 1:
            raise ValueError(f"lse: expected CPU float32 {tuple(query.shape[:2])} with contiguous heads, got "
                             f"{lse.device.type} {lse.dtype} {tuple(lse.shape)} strides {lse.stride()}")
        lse.fill_(-math.inf)  # rows no sequence owns (padding) keep it
    if query.shape[0] == 0 or seq_lens.numel() == 0:
        return out
    bt = block_table if block_table.dtype == torch.int32 and block_table.stride(1) == 1 else \
        block_table.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    qsl = query_start_loc.to(torch.int32).contiguous()
    # The dense path computes neither the exclusion nor lse: those calls keep every row in the fused kernel.
    threshold = DENSE_PREFILL_FROM if not exclude_self and lse is None else None
    dense = []
    if threshold is not None:
        q_lens = qsl[1:] - qsl[:-1]
        if int(q_lens.max()) >= threshold:
            dense = [int(i) for i in torch.nonzero(q_lens >= threshold).flatten()]
    skip_from = threshold if dense else 0
    v_scale, sinks = _fmt_args(fmt)
    lut_from = -1 if FIB_LUT_FROM is None else FIB_LUT_FROM
    for g, (heads, vo, _, ks, kt, vs, vt) in zip(fmt.groups, _group_args(fmt)):
        torch.ops.vllm_kvq_cpu.paged_attention(query, out, cache, bt, seq_lens, qsl, heads, vo, float(scale), ks, kt,
                                               vs, vt, fmt.k_scale, fmt.v_shift, v_scale, sinks, lut_from,
                                               num_splits or 0, skip_from, code, bias_q, table, exclude_self, lse,
                                               not FUSED_DECODE)
        for s in dense:
            _dense_prefill(query, out, cache, bt, int(seq_lens[s]), int(qsl[s]), int(qsl[s + 1]), s, g,
                           (heads, vo, ks, kt, vs, vt), fmt, scale, code, bias_q, table)
    return out


def _key_bias_args(key_bias, query: torch.Tensor, fmt: KVFormat) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(bias_q (N, Hq, D) float32 with a contiguous last dim, table (P, D) contiguous float32), or Nones."""
    if key_bias is None:
        if fmt.key_rope is not None:  # the cache holds position-centred keys: scores without the bias are wrong
            raise ValueError(f"format {fmt.name!r} centres keys by position: paged_attention needs key_bias")
        return None, None
    bias_q, table = key_bias
    if bias_q.shape != query.shape or table.dim() != 2 or table.shape[1] != query.shape[2]:
        raise ValueError(f"key_bias: expected bias_query {tuple(query.shape)} and table (P, {query.shape[2]}), got "
                         f"{tuple(bias_q.shape)} and {tuple(table.shape)}")
    bias_q = bias_q.float()
    return (bias_q if bias_q.stride(-1) == 1 else bias_q.contiguous()), table.float().contiguous()


@functools.lru_cache(maxsize=None)
def _rotation_matrix(key: tuple, codec: VectorCodec) -> torch.Tensor | None:
    return None if codec.rotation.kind == "identity" else codec.rotation.matrix(dtype=torch.float32).contiguous()


def _rotate(x: torch.Tensor, codec: VectorCodec, *, inverse: bool) -> torch.Tensor:
    """(M, D) float32 rows rotated by a codec's rotation (R x, or R^T x when ``inverse``): one GEMM, which for
    thousands of prefill rows beats a per-row fast transform."""
    r = _rotation_matrix(codec.key, codec)
    if r is None:
        return x
    return x @ r if inverse else x @ r.T


def _dense_prefill(query, out, cache, bt, length: int, q0: int, q1: int, seq: int, g, args, fmt: KVFormat,
                   scale: float, code: int, bias_q: torch.Tensor | None, table: torch.Tensor | None) -> None:
    """One long prefill chunk of one head group: decode the context once (rotated domain), attend it with
    torch's SDPA, rotate the output back. Same math as the fused kernel, different summation order."""
    heads, vo, ks, kt, vs, vt = args
    gh, d = len(g.heads), fmt.head_size
    group = query.shape[1] // fmt.num_kv_heads
    k_rot = torch.empty(gh, length, d)
    v_rot = torch.empty(gh, length, d)
    v_scale, sinks = _fmt_args(fmt)
    torch.ops.vllm_kvq_cpu.decode_context(cache, bt, seq, length, heads, vo, ks, kt, vs, vt, sinks, k_rot, v_rot,
                                          code)
    ql = q1 - q0
    qidx = (heads.long()[:, None] * group + torch.arange(group)).reshape(-1)  # this group's query heads
    q = query[q0:q1].index_select(1, qidx).float()  # (ql, gh * G, D)
    hidx = heads.long().repeat_interleave(group)
    if fmt.k_scale is not None:
        q = q * fmt.k_scale[hidx]
    q_rot = _rotate(q.reshape(-1, d), g.key, inverse=False).reshape(ql, gh * group, d)
    # float32 operands: the fused kernel computes in float32 too, so a prefix-cache hit (its suffix runs the
    # fused kernel) reproduces the cold run, and logits match the reference. bf16 here measured 2x faster but
    # moved prompt logprobs by up to 0.13 nats on the tiny test models.
    dt = torch.float32
    if bias_q is not None:
        # Key centring's bias as extra score terms: [q, bias_q / scale] . [k, table[p]] (SDPA scales both).
        rows = table[:length]  # (length, D)
        q_rot = torch.cat([q_rot, bias_q[q0:q1].index_select(1, qidx) / scale], -1)
        k_rot = torch.cat([k_rot, rows.expand(gh, -1, -1)], -1)
    q4 = q_rot.transpose(0, 1).unsqueeze(0).to(dt)
    k4, v4 = k_rot.unsqueeze(0).to(dt), v_rot.unsqueeze(0).to(dt)
    if ql == length:
        o = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
    else:  # a chunk continuing a prefill: query i sits at position length - ql + i
        mask = torch.arange(length)[None, :] <= torch.arange(length - ql, length)[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=True)
    o = _rotate(o[0].transpose(0, 1).reshape(-1, d).float(), g.value, inverse=True).reshape(ql, gh * group, d)
    if v_scale is not None:  # the value codecs' output transform, o * scale + shift
        o = o * v_scale[hidx]
    if fmt.v_shift is not None:
        o = o + fmt.v_shift[hidx]
    out[q0:q1].index_copy_(1, qidx, o.to(out.dtype))


store.supports_calibration = True
paged_attention.supports_calibration = True

"""KV formats: the K and V codec of every KV head of one layer, and the slot layout in the paged cache.

The cache of one layer is a uint8 tensor viewed as (B blocks, Hk heads, T tokens per block, C slot bytes).
One slot holds everything about one (token, KV head), metadata inline:

    [ K codes | K metadata | V codes | V metadata | zero padding to slot_bytes ]

``slot_bytes`` is the largest K+V size over the layer's heads (heads may use different codecs), rounded up
to an even number so fp16 metadata stays 2-byte aligned, or a larger ``pad_to`` when vLLM needs one page
size for several layers.

**Sinks** (``sink_tokens=S``): every block also keeps its first S tokens at bf16, in the codecs' rotated
domain, in a per-block area spread over ``sink_bytes`` extra bytes at the end of each of its T slots:

    [ K codes | K meta | V codes | V meta | pad to even ][ sink area: sink_bytes ][ pad to slot_bytes ]

(the sink area is any number of bytes, so a slot with sinks may be odd: every implementation reads fp16
metadata at any byte offset)

Record j (the token at block offset j < S) is ``bf16(R_K k') ++ bf16(R_V v')`` (4·D bytes, k' and v' after the
codecs' state transforms); its byte b lies at area offset o = j·4D + b, i.e. in slot o // sink_bytes at byte
``sink_offset + o % sink_bytes``. Attention reads a position p from the record when p % T < S: the first S
tokens of every sequence (the attention sinks, in its first block) are then exact up to bf16, and since every
block keeps its own records, a block's bytes depend only on its tokens, so a prefix-cache hit and a chunked
prefill see what a cold single-chunk run sees. Cost: ceil(S·4·D / T) bytes per slot (T = 16: D / 4 per sink
token, T = 128: D / 32, T = 256: D / 64; the plugin serves configs with sinks in 256-token blocks unless
``--block-size`` says otherwise).

Per-head state (calibrated shifts and channel scales, see ``vllm_kvq.calibration``) is bound to each head's
codecs (``VectorCodec.bind``) and costs no cache bytes; ``KVFormat(k_shift=, v_shift=, k_scale=)`` is a
shorthand that binds (Hk, D) tensors head by head. Heads whose codecs share parameters and kinds of state
form one ``HeadGroup``: one kernel launch, with the state stacked to (heads, D).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from vllm_kvq import codecs as _codecs
from vllm_kvq import config as _config
from vllm_kvq.key_centre import KeyRope
from vllm_kvq.codecs.base import VectorCodec


class HeadGroup:
    """KV heads of a layer that share one (K codec, V codec) structure; the ops batch over them.

    ``key`` / ``value`` are the first head's codecs (layout, tables, hooks); ``keys`` / ``values`` hold every
    head's (bound) codec, whose state ``state(side, name, device)`` stacks to (len(heads), D).
    """

    def __init__(self, heads: tuple[int, ...], keys: tuple[VectorCodec, ...], values: tuple[VectorCodec, ...]):
        self.heads, self.keys, self.values = heads, keys, values
        self.key, self.value = keys[0], values[0]
        self._state: dict = {}

    def state(self, side: str, name: str, device) -> torch.Tensor | None:
        """(len(heads), D) float32 stacked state ``name`` of the "k" or "v" codecs, or None if unbound."""
        k = (side, name, str(device))
        if k not in self._state:
            cs = self.keys if side == "k" else self.values
            ts = [getattr(c, name) for c in cs]
            self._state[k] = None if ts[0] is None else torch.stack(ts).to(device).contiguous()
        return self._state[k]

    def __repr__(self) -> str:
        return f"HeadGroup(heads={self.heads}, key={self.key.name}, value={self.value.name})"


class KVFormat:
    def __init__(self, head_size: int, keys: list[VectorCodec], values: list[VectorCodec], *, name: str = "custom",
                 pad_to: int | None = None, sink_tokens: int = 0, block_size: int | None = None,
                 k_shift: torch.Tensor | None = None,  # (Hk, D)
                 v_shift: torch.Tensor | None = None,  # (Hk, D)
                 k_scale: torch.Tensor | None = None,  # (Hk, D), > 0
                 k_rope_freq: torch.Tensor | None = None,  # (R/2,): k_shift is the pre-RoPE key mean
                 exact_self: bool = False):
        """``k_rope_freq``: position-aware key centring (``vllm_kvq.key_centre``): ``k_shift`` is then the mean
        of the keys before RoPE, turned to each key's position by ``ops.store`` and added back as a score
        bias by attention, instead of a fixed shift bound to the key codecs."""
        if len(keys) != len(values) or not keys:
            raise ValueError(f"need one key and one value codec per KV head, got {len(keys)} and {len(values)}")
        for c in (*keys, *values):
            if c.head_dim != head_size:
                raise ValueError(f"codec {c.name} has head_dim {c.head_dim}, format has head_size {head_size}")
        hk = len(keys)
        for label, t in (("k_shift", k_shift), ("v_shift", v_shift), ("k_scale", k_scale)):
            if t is not None and tuple(t.shape) != (hk, head_size):
                raise ValueError(f"{label}: expected ({hk}, {head_size}), got {tuple(t.shape)}")
        if k_scale is not None and not bool((k_scale > 0).all()):
            raise ValueError("k_scale must be positive")
        self.key_rope: KeyRope | None = None
        if k_rope_freq is not None:
            if k_shift is None:
                raise ValueError("k_rope_freq needs k_shift (the pre-RoPE key mean)")
            self.key_rope = KeyRope(k_shift, k_rope_freq)
            k_shift = None  # applied per position by the ops, not bound to the codecs
        if k_shift is not None or k_scale is not None:
            keys = [c.bind(shift=None if k_shift is None else k_shift[h], scale=None if k_scale is None else k_scale[h])
                    for h, c in enumerate(keys)]
        if v_shift is not None:
            values = [c.bind(shift=v_shift[h]) for h, c in enumerate(values)]
        self.name = name
        # attention reads each row's own position from the step's exact K/V, not the cache (vllm_kvq.ops)
        self.exact_self = bool(exact_self)
        self.head_size = head_size
        self.num_kv_heads = hk
        self.keys, self.values = list(keys), list(values)
        need = max(k.nbytes + v.nbytes for k, v in zip(keys, values))
        need += need % 2
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        self.sink_tokens = sink_tokens
        self.block_size = block_size
        self.sink_offset = need
        self.sink_bytes = 0
        if sink_tokens:
            if not isinstance(block_size, int) or block_size < sink_tokens:
                raise ValueError(f"sink_tokens={sink_tokens} needs the cache's block size (>= sink_tokens) to "
                                 f"size the per-block sink area, got block_size={block_size!r}")
            self.sink_bytes = -(-sink_tokens * self.sink_record_bytes // block_size)
            # not rounded to even: every implementation reads fp16 metadata at any byte offset, and at 256-token
            # blocks one bf16 record of head size 64 costs 1 B per slot (69 B slots: 3.71x bf16, not 3.66x)
            need += self.sink_bytes
        if pad_to is not None and pad_to < need:
            raise ValueError(f"pad_to={pad_to} is smaller than the {need} bytes this format needs")
        self.slot_bytes = pad_to or need
        groups: dict[tuple, list[int]] = {}
        for h, (k, v) in enumerate(zip(keys, values)):
            groups.setdefault((k.key, v.key), []).append(h)
        self.groups = [HeadGroup(tuple(hs), tuple(keys[h] for h in hs), tuple(values[h] for h in hs))
                       for hs in groups.values()]

    @property
    def sink_record_bytes(self) -> int:
        """Bytes of one sink token's record: bf16 rotated K and V."""
        return 4 * self.head_size

    def with_block_size(self, block_size: int, pad_to: int | None = None) -> "KVFormat":
        """The same format for another block size (the sink area depends on it)."""
        f = KVFormat(self.head_size, self.keys, self.values, name=self.name, pad_to=pad_to,
                     sink_tokens=self.sink_tokens, block_size=block_size, exact_self=self.exact_self)
        f.key_rope = self.key_rope
        return f

    def _stacked(self, cs: list[VectorCodec], name: str, identity: float) -> torch.Tensor | None:
        ts = [getattr(c, name) for c in cs]
        if all(t is None for t in ts):
            return None
        return torch.stack([torch.full((self.head_size,), identity) if t is None else t for t in ts])

    @functools.cached_property
    def k_shift(self) -> torch.Tensor | None:
        """(Hk, D) key shifts bound to the key codecs (zeros for unbound heads), or None."""
        return self._stacked(self.keys, "shift", 0.0)

    @functools.cached_property
    def k_scale(self) -> torch.Tensor | None:
        return self._stacked(self.keys, "scale", 1.0)

    @functools.cached_property
    def v_shift(self) -> torch.Tensor | None:
        return self._stacked(self.values, "shift", 0.0)

    @property
    def calibrated(self) -> bool:
        """True when some head's codecs carry state (shifted or scaled K/V) or keys are centred by position."""
        return self.key_rope is not None or any(c.state_names for c in (*self.keys, *self.values))

    @property
    def uniform(self) -> bool:
        """True when every head uses the same pair of codecs."""
        return len(self.groups) == 1

    def value_offset(self, head: int) -> int:
        return self.keys[head].nbytes

    def bytes_per_token(self) -> int:
        """Cache bytes per token of this layer, all KV heads, K and V, padding included."""
        return self.slot_bytes * self.num_kv_heads

    def compression(self, baseline_bytes: int = 2) -> float:
        """Against a 16-bit cache of the same heads."""
        return 2 * self.head_size * baseline_bytes / self.slot_bytes

    def allocate(self, num_blocks: int, block_size: int, device="cpu") -> torch.Tensor:
        return torch.zeros(num_blocks, self.num_kv_heads, block_size, self.slot_bytes, dtype=torch.uint8, device=device)

    def check_cache(self, cache: torch.Tensor) -> None:
        if cache.dtype != torch.uint8 or cache.dim() != 4:
            raise ValueError(f"expected a uint8 cache (blocks, heads, tokens, slot), got {cache.dtype} {tuple(cache.shape)}")
        if self.sink_tokens and cache.shape[2] != self.block_size:
            raise ValueError(f"format {self.name!r} sizes its sink area for blocks of {self.block_size} tokens, "
                             f"the cache has {cache.shape[2]}")
        if cache.shape[1] != self.num_kv_heads or cache.shape[3] != self.slot_bytes:
            raise ValueError(f"cache shape {tuple(cache.shape)} does not match format {self.name!r}: expected "
                             f"(blocks, {self.num_kv_heads}, tokens, {self.slot_bytes})")

    def describe(self) -> str:
        lines = [f"KV format {self.name!r}: head_size={self.head_size}, kv_heads={self.num_kv_heads}, "
                 f"slot={self.slot_bytes} B (K+V per token per head), {self.compression():.2f}x vs bf16"]
        for g in self.groups:
            k, v = g.key, g.value
            # which codecs and rotations, so two layouts with equal byte maps but different math differ in text
            lines.append(f"  heads {list(g.heads)}: K {k.name} (rotation {k.rotation.kind}), "
                         f"V {v.name} (rotation {v.rotation.kind})")
            for base, c, label in ((0, k, "K"), (k.nbytes, v, "V")):
                for f in c.fields():
                    lines.append(f"    [{base + f.offset:4d}:{base + f.offset + f.nbytes:4d}] {label}.{f.name:<10} {f.what}")
            end = self.sink_offset if self.sink_tokens else self.slot_bytes
            if k.nbytes + v.nbytes < end:
                lines.append(f"    [{k.nbytes + v.nbytes:4d}:{end:4d}] padding")
            if k.state_names or v.state_names or self.key_rope is not None:
                kc = "(k - R_p mean)" if self.key_rope is not None else "(k - shift)" if k.shift is not None else "k"
                lines.append(f"    state per head (no cache bytes): K stored as "
                             f"{kc}{' / scale' if k.scale is not None else ''}"
                             f", V as {'v - shift' if v.shift is not None else 'v'}")
        if self.sink_tokens:
            so, sb = self.sink_offset, self.sink_bytes
            lines.append(f"  [{so:4d}:{so + sb:4d}] sink area: the block's first {self.sink_tokens} token(s) as bf16 "
                         f"rotated K+V ({self.sink_record_bytes} B each), spread over the {self.block_size} slots")
            if so + sb < self.slot_bytes:
                lines.append(f"  [{so + sb:4d}:{self.slot_bytes:4d}] padding")
        return "\n".join(lines)

    __str__ = describe

    def __repr__(self) -> str:
        return f"KVFormat({self.name!r}, head_size={self.head_size}, kv_heads={self.num_kv_heads}, slot={self.slot_bytes})"


def formats_from_config(cfg: "_config.KVQConfig", *, num_layers: int, num_kv_heads: int, head_size: int,
                        uniform_slot: bool = False, block_size: int | None = None,
                        model: str | None = None) -> list[KVFormat]:
    """One format per layer. ``uniform_slot`` pads every layer to the largest slot (one vLLM page size);
    ``block_size`` sizes the sink area of configs with ``sink_tokens``; ``model`` (the served model's
    directory) resolves ``calibration: model``."""
    table = _config.resolve(cfg, num_layers, num_kv_heads)
    stats = _config.calibration(cfg, num_layers, num_kv_heads, head_size, model)
    fmts = []
    for layer, row in enumerate(table):
        keys = [k.build(head_size, cfg.seed) for k, _ in row]
        values = [v.build(head_size, cfg.seed) for _, v in row]
        fmts.append(KVFormat(head_size, keys, values, name=f"{cfg.name}[layer {layer}]",
                             sink_tokens=cfg.sink_tokens, block_size=block_size, exact_self=cfg.exact_self,
                             **_layer_calibration(cfg, stats, layer)))
    if uniform_slot:
        pad = max(f.slot_bytes for f in fmts)
        fmts = [f.with_block_size(block_size, pad_to=pad) for f in fmts]
    return fmts


def _layer_calibration(cfg: "_config.KVQConfig", stats, layer: int) -> dict:
    return calibration_kwargs(stats, layer, cfg.smooth_keys)


def calibration_kwargs(stats, layer: int, smooth_keys: bool = True) -> dict:
    """KVFormat keyword arguments binding layer ``layer`` of calibration ``stats`` (None: none)."""
    if stats is None:
        return {}
    return {"k_shift": stats.mu_k[layer], "v_shift": stats.mu_v[layer],
            "k_scale": stats.k_smooth[layer] if smooth_keys else None, "k_rope_freq": stats.rope_freq}


def kv_format(spec: "str | Path | _config.KVQConfig", head_size: int, num_kv_heads: int, *, layer: int = 0,
              num_layers: int | None = None, pad_to: int | None = None, block_size: int | None = None) -> KVFormat:
    """The format of one layer: ``spec`` is a preset or codec name, a YAML path, or a loaded config."""
    if isinstance(spec, str) and spec in _codecs.names() and spec not in _config.preset_names():
        codec = _codecs.get(spec, head_dim=head_size)
        return KVFormat(head_size, [codec] * num_kv_heads, [codec] * num_kv_heads, name=spec, pad_to=pad_to)
    cfg = spec if isinstance(spec, _config.KVQConfig) else _config.load(spec)
    if num_layers is None and any(ov.layers is not None for ov in cfg.overrides):
        raise ValueError(f"config {cfg.name!r} has per-layer rules: pass num_layers so negative indices resolve")
    n = num_layers if num_layers is not None else layer + 1
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} out of range for {n} layers")
    if num_layers is None and cfg.calibration is not None:
        raise ValueError(f"config {cfg.name!r} is calibrated for a model: pass num_layers so its shapes are checked")
    row = _config.resolve(cfg, n, num_kv_heads)[layer]
    stats = _config.calibration(cfg, n, num_kv_heads, head_size)
    keys = [k.build(head_size, cfg.seed) for k, _ in row]
    values = [v.build(head_size, cfg.seed) for _, v in row]
    name = cfg.name if num_layers is None else f"{cfg.name}[layer {layer}]"
    return KVFormat(head_size, keys, values, name=name, pad_to=pad_to, sink_tokens=cfg.sink_tokens,
                    block_size=block_size, exact_self=cfg.exact_self, **_layer_calibration(cfg, stats, layer))

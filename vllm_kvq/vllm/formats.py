"""Which KV format each attention layer of a served model gets, on this rank. No vLLM imports.

A YAML config is resolved against the WHOLE model: every layer of every pipeline stage (so ``layers: -1``
means the model's last layer on every stage) and every KV head of every tensor-parallel rank (so ``heads: 5``
is global head 5, and calibration statistics of shape (layers, kv_heads, D) check against the checkpoint).
Then each rank takes its own heads, the way vLLM shards them.

Each layer's slot is its own: the largest K+V size over that layer's heads, every head of every TP rank
(vLLM asserts identical specs on every TP rank), rounded to even, plus the sink area at the cache's block
size (not rounded: the kernels read fp16 metadata at any byte offset). vLLM gets it per layer (``KVQAttentionImpl.kv_cache_spec``) and, since every layer of ours is full
attention with one block size, keeps all of them in one KV-cache group whose block holds one page per
layer of that layer's own size (``UniformTypeKVCacheSpecs``): a mixed config costs its true average bytes,
with no padding and no rounding of pages to divide each other. ``slot_bytes(cfg, ...)`` is the config's
largest slot (largest key codec plus largest value codec), what ``customize_spec`` gives a spec it cannot
place in a layer (vLLM's block alignment for skip layers asks the backend for a page without naming one);
a cache that wide still serves any layer, padded.

Layers past the model's last (EAGLE/EAGLE3/MTP draft layers, numbered after the target's) get the config's
default key and value codecs, at their slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvq import config as _config
from vllm_kvq.kv_format import KVFormat, formats_from_config


@dataclass(frozen=True)
class ModelShape:
    num_layers: int  # the whole model's (every PP stage); draft layers are numbered after these
    num_kv_heads: int  # the whole model's (every TP rank)
    head_size: int
    tp_rank: int = 0
    tp_size: int = 1
    model: str | None = None  # the served model's directory: resolves ``calibration: model``

    def __post_init__(self):
        if self.num_layers < 1 or self.num_kv_heads < 1 or self.tp_size < 1:
            raise ValueError(f"invalid model shape {self}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}")
        if self.num_kv_heads >= self.tp_size and self.num_kv_heads % self.tp_size:
            raise ValueError(f"{self.num_kv_heads} KV heads cannot be split over {self.tp_size} TP ranks")
        if self.num_kv_heads < self.tp_size and self.tp_size % self.num_kv_heads:
            raise ValueError(f"{self.num_kv_heads} KV heads cannot be replicated over {self.tp_size} TP ranks")

    def rank_heads(self) -> tuple[int, ...]:
        """The global KV heads this TP rank holds, in vLLM's order (QKVParallelLinear's sharding)."""
        if self.num_kv_heads >= self.tp_size:
            local = self.num_kv_heads // self.tp_size
            return tuple(range(self.tp_rank * local, (self.tp_rank + 1) * local))
        # Fewer KV heads than ranks: each head is replicated on tp_size / num_kv_heads consecutive ranks.
        return (self.tp_rank * self.num_kv_heads // self.tp_size,)


SINK_BLOCK_SIZE = 256  # tokens per block for configs with sink records, unless --block-size says otherwise


def preferred_block_size(cfg: _config.KVQConfig) -> int | None:
    """The block size a config is best served in, or None for the platform's default. Sink records cost
    ceil(S * 4 * D / T) bytes per slot: 2 at vLLM-CPU's 128-token blocks for head size 64 (70 B slots for
    4-bit K and V: 3.66x bf16), 1 at 256 (69 B: 3.71x), 16 at CUDA's default 16."""
    return SINK_BLOCK_SIZE if cfg.sink_tokens else None


def slot_bytes(cfg: _config.KVQConfig, head_size: int, block_size: int | None = None) -> int:
    """Bytes per (token, KV head), K and V, for every layer and head of any model served with ``cfg`` in
    blocks of ``block_size`` tokens (which sizes the sink area of configs with ``sink_tokens``)."""
    keys = [cfg.key] + [ov.key for ov in cfg.overrides if ov.key is not None]
    values = [cfg.value] + [ov.value for ov in cfg.overrides if ov.value is not None]
    need = (max(k.build(head_size, cfg.seed).nbytes for k in keys)
            + max(v.build(head_size, cfg.seed).nbytes for v in values))
    need += need % 2  # even, so fp16 metadata stays 2-byte aligned (as KVFormat does)
    if cfg.sink_tokens:
        if not block_size:
            raise ValueError(f"config {cfg.name!r} keeps {cfg.sink_tokens} sink token(s) per block: the slot "
                             f"size depends on the block size, which is not known here")
        need += -(-cfg.sink_tokens * 4 * head_size // block_size)  # the sink area: any byte count
    return need


class ServedFormats:
    """The formats of one config on one rank: ``for_layer(i)`` for any global layer index ``i >= 0``, each at
    its layer's own slot (``layer_slot(i)``), or padded to a wider cache's slot."""

    def __init__(self, cfg: _config.KVQConfig, shape: ModelShape, block_size: int | None = None):
        self.shape = shape
        self.block_size = block_size
        self.slot_bytes = slot_bytes(cfg, shape.head_size, block_size)
        heads = list(shape.rank_heads())
        full = formats_from_config(cfg, num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads,
                                   head_size=shape.head_size, block_size=block_size, model=shape.model)
        # A layer's slot is its widest head over the whole model: the same on every TP rank.
        self.layers = [_take_heads(f, heads, f.slot_bytes) for f in full]
        k, v = cfg.key.build(shape.head_size, cfg.seed), cfg.value.build(shape.head_size, cfg.seed)
        self.default = KVFormat(shape.head_size, [k] * len(heads), [v] * len(heads),
                                name=f"{cfg.name}[default]", sink_tokens=cfg.sink_tokens, block_size=block_size,
                                exact_self=cfg.exact_self)
        self._padded: dict[tuple[int, int], KVFormat] = {}

    def layer_slot(self, index: int) -> int:
        """Bytes per (token, KV head) of layer ``index``'s own slot."""
        return self._own(index).slot_bytes

    def average_slot(self) -> float:
        return sum(f.slot_bytes for f in self.layers) / len(self.layers)

    def for_layer(self, index: int, cache_slot: int | None = None) -> KVFormat:
        """Layer ``index``'s format; ``cache_slot``: the slot width of the cache vLLM handed the layer, when
        it is wider than the layer's own (a page sized without naming the layer: the config's largest)."""
        fmt = self._own(index)
        if cache_slot is None or cache_slot == fmt.slot_bytes:
            return fmt
        if cache_slot < fmt.slot_bytes:
            raise ValueError(f"vllm_kvq: layer {index} ({fmt.name}) needs {fmt.slot_bytes} bytes per token per KV "
                             f"head, but vLLM's cache for it has {cache_slot}")
        key = (index if index < len(self.layers) else -1, cache_slot)
        if key not in self._padded:
            self._padded[key] = fmt.with_block_size(fmt.block_size, pad_to=cache_slot)
        return self._padded[key]

    def _own(self, index: int) -> KVFormat:
        if index < 0:
            raise ValueError(f"layer index must be >= 0, got {index}")
        return self.layers[index] if index < len(self.layers) else self.default


def _take_heads(fmt: KVFormat, heads: list[int], pad_to: int) -> KVFormat:
    # Per-head state (calibration) is bound to each head's codecs, so it travels with them; the position-aware
    # key mean is the format's, so this rank's heads of it are passed on.
    rope = {} if fmt.key_rope is None else {"k_shift": fmt.key_rope.mu[heads], "k_rope_freq": fmt.key_rope.freq.float()}
    return KVFormat(fmt.head_size, [fmt.keys[h] for h in heads], [fmt.values[h] for h in heads],
                    name=fmt.name, pad_to=pad_to, sink_tokens=fmt.sink_tokens, block_size=fmt.block_size,
                    exact_self=fmt.exact_self, **rope)


"""The vLLM attention backend for vllm_kvq dtypes: quantize on write, attend the packed cache.

One backend class per (dtype, config): ``backend_for`` makes ``KVQBackend_turboquant3``, or for ``kvq``
``KVQBackend_kvq_<digest of the YAML>``, and binds the config to the class. Everything a class computes
comes from that config and from the call's own arguments: each impl resolves its formats against the vLLM
config current when vLLM builds the layer (so a standalone draft model resolves against itself), and gives
its layer's spec that layer's own slot (``KVQAttentionImpl.kv_cache_spec``, reached through
``patches.per_layer_kv_cache_spec``), so a mixed per-layer config costs its true bytes in vLLM's block
count (see ``formats``). ``customize_spec``, which vLLM calls without naming a layer, gives the config's
largest slot (``formats.slot_bytes``). No process-wide "last model seen".

Prefill reads the cache it has just written (the step's K/V are stored before attention), so a prefix-cache
hit, a chunked prefill and a cold run see the same quantized K/V, and prompt-logprob perplexity measures the
codec. On GPUs vLLM calls ``do_kv_cache_update`` first (``forward_includes_kv_cache_update = False``, what
its CUDA-graph slot-mapping padding expects); on CPUs ``forward`` stores first itself
(``KVQAttentionImpl.store_in_forward``): vLLM's separate ``unified_kv_cache_update`` op costs a second custom-op dispatch
and context lookup per layer, ~2-3 ms of a ~45 ms SmolLM2 decode step on the 2-vCPU development machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from vllm_kvq import config as _config
from vllm_kvq import ops
from vllm_kvq.kernels import cpu as cpu_kernels
from vllm_kvq.kv_format import KVFormat
from vllm_kvq.vllm.dtypes import CONFIG_DTYPE, SUPPORTED_HEAD_SIZES, config_for_dtype, is_kvq_dtype
from vllm_kvq.vllm.formats import ModelShape, ServedFormats, preferred_block_size, slot_bytes

# A child of vLLM's "vllm" logger, so our lines appear in its log with its format and level.
logger = logging.getLogger("vllm.kvq")

_CLASS_PREFIX = "KVQBackend_"
# FlashAttention's kernel block granularity: skip layers served by it and our layers then agree on block
# sizes when vLLM aligns pages (platforms/interface.py, _align_heterogeneous_kv_block_size).
KERNEL_BLOCK_MULTIPLE = 16
# Debug knob (read once, like ops' VLLM_KVQ_IMPL): "1" gives every layer the config's largest slot, as before
# per-layer pages, to compare block counts and outputs with the per-layer path in one run.
PADDED_SLOTS = os.environ.get("VLLM_KVQ_PADDED_SLOTS", "0") not in ("", "0")


def _store_in_forward() -> bool:
    """True where ``forward`` stores the step's K/V itself (vLLM-CPU), False where vLLM's own
    ``unified_kv_cache_update`` calls ``do_kv_cache_update`` first (CUDA and every other platform)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _digest(cfg: _config.KVQConfig) -> str:
    return hashlib.sha1(repr(cfg).encode()).hexdigest()[:12]


def class_name(dtype: str, cfg: _config.KVQConfig | None = None) -> str:
    base = _CLASS_PREFIX + re.sub(r"\W", "_", dtype)
    return f"{base}_{_digest(cfg)}" if dtype == CONFIG_DTYPE else base


def model_shape(vllm_config, head_size: int) -> ModelShape:
    """The whole model's shape and this process's TP rank, from a vLLM config."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    tp = pc.tensor_parallel_size
    rank = 0
    if tp > 1:
        from vllm.distributed import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise RuntimeError("vllm_kvq: tensor parallelism is configured but not initialized; cannot tell "
                               "which KV heads this rank holds")
        rank = parallel_state.get_tensor_model_parallel_rank()
    return ModelShape(num_layers=mc.get_total_num_hidden_layers(), num_kv_heads=mc.get_total_num_kv_heads(),
                      head_size=head_size, tp_rank=rank, tp_size=tp, model=mc.model)


def standalone_draft(vllm_config) -> bool:
    """Whether this config builds a standalone speculative-decoding draft model (``draft_model`` method):
    vLLM then makes the draft's model config current. EAGLE/MTP heads are built under the target's model
    config (their layers are numbered after the target's), so they are not standalone drafts."""
    sc = getattr(vllm_config, "speculative_config", None)
    draft, target = getattr(sc, "draft_model_config", None), getattr(sc, "target_model_config", None)
    mc = vllm_config.model_config
    if draft is None or (target is not None and mc.model == target.model):  # MTP heads live in the target
        return False
    return mc is draft or mc.model == draft.model


@dataclass
class KVQMetadata(AttentionMetadata):
    seq_lens: torch.Tensor  # (S,) context length including this step's tokens
    query_start_loc: torch.Tensor  # (S + 1,)
    block_table: torch.Tensor  # (S, max_blocks)
    slot_mapping: torch.Tensor  # (N,)
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int


class KVQMetadataBuilder(AttentionMetadataBuilder[KVQMetadata]):
    # A decode step (one token per sequence) launches shape-only grids: the split count comes from the
    # block table's width, which vLLM fixes per captured batch size; seq_lens are read on the device; the
    # codec tables and head lists are cached device tensors made by the eager warm-up runs vLLM does before
    # capture; nothing here reads a device value on the host. Mixed prefill batches pick their tile shape
    # from host shapes too, but are left to vLLM's piecewise (eager attention) path.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVQMetadata:
        # Views of vLLM's persistent buffers only: no copies, no host reads of device tensors.
        cam = common_attn_metadata
        s = cam.num_reqs
        return KVQMetadata(seq_lens=cam.seq_lens[:s], query_start_loc=cam.query_start_loc[:s + 1],
                           block_table=cam.block_table_tensor[:s], slot_mapping=cam.slot_mapping,
                           num_actual_tokens=cam.num_actual_tokens, max_query_len=cam.max_query_len,
                           max_seq_len=cam.max_seq_len)


def token_positions(md: KVQMetadata) -> torch.Tensor:
    """(num_actual_tokens,) position of every token of the step in its sequence, computed on the device once
    per step (memoized on the metadata, which every layer of the step shares)."""
    pos = getattr(md, "_kvq_positions", None)
    if pos is None:
        qsl = md.query_start_loc.long()
        tok = torch.arange(md.num_actual_tokens, device=qsl.device)
        seq = torch.searchsorted(qsl[1:], tok, right=True).clamp(max=qsl.numel() - 2)
        pos = md.seq_lens.long()[seq] - (qsl[seq + 1] - tok)
        md._kvq_positions = pos
    return pos


def replay_safe_max_seq_len(query: torch.Tensor, attn_metadata: KVQMetadata) -> int | None:
    """The host bound on context lengths that split-K may be sized from. A CUDA graph keeps the host values
    it was captured with and replays on later, longer contexts: the Triton kernels split each sequence's
    own context and stay exact with a stale bound, but the CUDA extension sizes splits on the host, so while
    capturing the bound is dropped (None: the block table's width, fixed per captured batch size)."""
    if query.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    return attn_metadata.max_seq_len


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_index(layer_name: str) -> int:
    found = _LAYER_INDEX.findall(f".{layer_name}.")
    if len(found) != 1:
        raise ValueError(f"vllm_kvq: cannot tell the layer index of attention layer {layer_name!r}")
    return int(found[0])


class KVQAttentionImpl(AttentionImpl[KVQMetadata]):
    # Bound per backend class by ``backend_for``.
    kvq_config: ClassVar[_config.KVQConfig | None] = None
    # Formats per model shape, for this class's config only (every layer of a model asks for the same).
    _served: ClassVar[dict[ModelShape, ServedFormats]] = {}
    # forward stores the step's K/V before attending (the backend's forward_includes_kv_cache_update)
    store_in_forward: ClassVar[bool] = False

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **kwargs) -> None:
        if logits_soft_cap:
            # Every layer of such a model (Gemma 2) soft-caps, so skipping layers cannot help.
            raise ValueError(f"vllm_kvq: --kv-cache-dtype {kv_cache_dtype} does not support models with logit "
                             "soft-capping (Gemma 2); serve this model with another --kv-cache-dtype")
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sliding_window is not None:
            unsupported.append("sliding window")
        if kwargs.get("sinks") is not None:
            unsupported.append("attention sinks")
        if kv_sharing_target_layer_name is not None:
            unsupported.append("cross-layer KV sharing")
        if unsupported:
            raise ValueError(f"vllm_kvq: --kv-cache-dtype {kv_cache_dtype} does not support {', '.join(unsupported)}; "
                             "keep these layers in the default cache with --kv-cache-dtype-skip-layers "
                             "(layer indices, or sliding_window)")
        if self.kvq_config is None:
            raise RuntimeError("vllm_kvq: KVQAttentionImpl used without a config; get it from backend_for()")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        from vllm.config import get_current_vllm_config_or_none

        vc = get_current_vllm_config_or_none()
        if vc is None or vc.model_config is None:
            raise RuntimeError("vllm_kvq: the vLLM config is not current while building an attention layer")
        # Resolve now, while the vLLM config is current, so a bad YAML fails at start-up. Sink areas depend on
        # the block size: the cache's own (kv_cache.shape[2]) decides at first use (``_format``).
        self._shape = model_shape(vc, head_size)
        self._max_model_len = int(vc.model_config.max_model_len)  # bounds the positions key centring turns to
        self._draft = standalone_draft(vc)
        self._formats = self.served(self._shape, getattr(vc.cache_config, "block_size", None) or 16, self._draft)
        self._refuse_reference_on_gpu(vc)
        got = self._formats.layers[0].num_kv_heads
        if got != self.num_kv_heads:
            raise ValueError(f"vllm_kvq: this rank holds {self.num_kv_heads} KV heads but the model's "
                             f"{self._formats.shape.num_kv_heads} KV heads over {self._formats.shape.tp_size} "
                             f"TP ranks give {got}")
        self._fmt: KVFormat | None = None
        self._fmt_key: tuple[int | None, int | None] = (None, None)
        # The CPU extension's parsed format (ops.fused_plan) when forward may store and attend in one native call.
        self._plan = None

    @classmethod
    def served(cls, shape: ModelShape, block_size: int | None = None, draft: bool = False) -> ServedFormats:
        key = (shape, block_size if cls.kvq_config.sink_tokens else None, draft)
        if key not in cls._served:
            cfg = cls.kvq_config
            if draft:
                cfg, notes = _config.for_draft(cfg, shape.num_layers, shape.num_kv_heads, shape.model)
                for note in notes:
                    logger.warning("vllm_kvq: standalone draft model: %s", note)
            f = cls._served[key] = ServedFormats(cfg, shape, key[1])
            slots = sorted({x.slot_bytes for x in f.layers})
            logger.info("vllm_kvq: %s -> %d layers, slot %s B per token per KV head (K+V; %.1f on average, %.2fx "
                        "vs bf16)%s", cls.kvq_config.name, len(f.layers), "/".join(map(str, slots)),
                        f.average_slot(), 2 * shape.head_size * 2 / f.average_slot(),
                        " [VLLM_KVQ_PADDED_SLOTS: every layer padded to %d B]" % f.slot_bytes if PADDED_SLOTS else "")
        return cls._served[key]

    def _refuse_reference_on_gpu(self, vc) -> None:
        """On a GPU every format must run in a kernel: the PyTorch reference's host syncs, per-sequence loops
        and gathers would stall serving and use memory vLLM's profile never saw."""
        device = getattr(getattr(vc, "device_config", None), "device_type", None)
        if device != "cuda":
            return
        for fmt in {id(f): f for f in (*self._formats.layers, self._formats.default)}.values():
            for op, decode in (("store", False), ("paged_attention", True), ("paged_attention", False)):
                plan = ops.plan(fmt, "cuda", op, decode, self.num_heads // self.num_kv_heads)
                first = next(name for name, why in plan.items() if why is None)
                if first == "reference":
                    reasons = "; ".join(f"{n}: {why}" for n, why in plan.items() if why is not None)
                    raise ValueError(f"vllm_kvq: no GPU kernel runs {op} for {fmt.name!r} ({reasons}); "
                                     f"choose codecs with Triton support (e.g. a turboquant* preset)")

    def _formats_at(self, block_size: int | None) -> ServedFormats:
        if block_size is None or not self.kvq_config.sink_tokens:
            return self._formats
        return self.served(self._shape, block_size, self._draft)

    def kv_cache_spec(self, layer_name: str, spec):
        """The spec of layer ``layer_name`` with that layer's own slot (``formats``): vLLM then sizes each
        layer's page by what the layer stores. Specs that are not ours, or already sized, pass unchanged."""
        if PADDED_SLOTS or spec.state_content_bytes is not None or not KVQAttentionBackend.is_ours(spec):
            return spec
        slot = self._formats_at(spec.block_size).layer_slot(_layer_index(layer_name))
        return replace(spec, state_content_bytes=slot)

    def _format(self, layer, kv_cache: torch.Tensor | None = None) -> KVFormat:
        """The layer's format for the cache vLLM handed it: the cache's block size sizes the sink area, and a
        cache slot wider than the layer's own (a page vLLM sized without naming the layer) is padding."""
        block_size, cache_slot = (None, None) if kv_cache is None else (kv_cache.shape[2], kv_cache.shape[3])
        if self._fmt is None or self._fmt_key != (block_size, cache_slot):
            formats = self._formats_at(block_size)
            self._fmt = formats.for_layer(_layer_index(layer.layer_name), cache_slot)
            self._fmt_key = (block_size, cache_slot)
            self._plan = None
            if self.store_in_forward and kv_cache is not None:
                self._plan = ops.fused_plan(self._fmt, kv_cache.device, self.num_heads // self.num_kv_heads)
        return self._fmt

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]
        if n == 0 or kv_cache.numel() == 0:
            return
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        self._store(layer, k, v, kv_cache, slot_mapping, None)

    def _store(self, layer, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
               md: KVQMetadata | None) -> None:
        """k, v (N, Hk, D) into the N slots; ``md``: the step's metadata when the caller has it (forward)."""
        fmt = self._format(layer, kv_cache)
        positions = None
        if fmt.key_rope is not None:  # position-aware key centring needs each token's position
            if md is None:
                from vllm.model_executor.layers.attention.attention import get_attention_context

                md = get_attention_context(layer.layer_name)[0]
            n = k.shape[0]
            positions = token_positions(md)[:n] if md is not None else torch.arange(n, device=k.device)
        ops.store(k, v, kv_cache, slot_mapping, fmt, positions=positions,
                  max_position=None if positions is None else self._max_model_len - 1)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: KVQMetadata, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm_kvq: fused output quantization is not supported")
        num_tokens = query.shape[0]
        if output is None:
            output = torch.empty(num_tokens, self.num_heads * self.head_size, dtype=query.dtype, device=query.device)
        if attn_metadata is None:  # the profiling run: no cache yet
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        if self.store_in_forward and n and kv_cache.numel() and output.dtype == query.dtype:
            self._format(layer, kv_cache)  # sets self._plan when the format changes
            if self._plan is not None:
                # vLLM-CPU's hot path: store and attend in one native call, straight into vLLM's output buffer.
                h, hk, d = self.num_heads, self.num_kv_heads, self.head_size
                kv = key is not None and value is not None
                md, fmt = attn_metadata, self._fmt
                if fmt.exact_self and not kv:
                    raise ValueError(f"vllm_kvq: {fmt.name} attends each token's own key and value exactly "
                                     f"(exact_self), but vLLM passed no key/value to this layer's forward")
                q = query[:n].view(n, h, d)
                centre = key_bias = None
                if fmt.key_rope is not None:  # as ops.store / ops.paged_attention do around the kernels
                    if kv:
                        centre = fmt.key_rope.centre(token_positions(md)[:n], self._max_model_len - 1)
                    key_bias = (fmt.key_rope.bias_query(q, self.scale),
                                fmt.key_rope.table(md.block_table.shape[1] * kv_cache.shape[2], q.device))
                cpu_kernels.forward(q, output[:n].view(n, h, d),
                                    key[:n].view(n, hk, d) if kv else None, value[:n].view(n, hk, d) if kv else None,
                                    kv_cache, md.slot_mapping[:n], md.block_table, md.seq_lens, md.query_start_loc,
                                    self._plan, scale=self.scale, centre=centre, key_bias=key_bias)
                if n < num_tokens:
                    output[n:] = 0
                return output
        step_kv = None if key is None or value is None else (key[:n].view(n, self.num_kv_heads, self.head_size),
                                                              value[:n].view(n, self.num_kv_heads, self.head_size))
        if self.store_in_forward and step_kv is not None and n and kv_cache.numel():
            self._store(layer, *step_kv, kv_cache, attn_metadata.slot_mapping[:n], attn_metadata)
        q = query[:n].view(n, self.num_heads, self.head_size)
        fmt = self._format(layer, kv_cache)
        self_kv = None
        if fmt.exact_self:  # each row's own token from this step's exact K/V
            if step_kv is None:
                raise ValueError(f"vllm_kvq: {fmt.name} attends each token's own key and value exactly (exact_self), "
                                 f"but vLLM passed no key/value to this layer's forward")
            self_kv = step_kv
        out = ops.paged_attention(q, kv_cache, attn_metadata.block_table, attn_metadata.seq_lens,
                                  attn_metadata.query_start_loc, fmt, scale=self.scale,
                                  max_seq_len=replay_safe_max_seq_len(query, attn_metadata), self_kv=self_kv)
        flat = output.view(num_tokens, -1)
        flat[:n] = out.reshape(n, -1).to(output.dtype)
        if n < num_tokens:
            flat[n:] = 0
        return output


class KVQAttentionBackend(AttentionBackend):
    """Base of the per-(dtype, config) backends that ``backend_for`` makes."""

    kvq_dtype: ClassVar[str] = ""
    kvq_config: ClassVar[_config.KVQConfig | None] = None
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    _impl: ClassVar[type[KVQAttentionImpl]] = KVQAttentionImpl

    @staticmethod
    def get_name() -> str:
        # Must be an AttentionBackendEnum member; CUSTOM is the one reserved for plugins.
        return "CUSTOM"

    @classmethod
    def get_impl_cls(cls):
        return cls._impl

    @staticmethod
    def get_builder_cls():
        return KVQMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(KERNEL_BLOCK_MULTIPLE)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        # configs with sink records: 256-token blocks (formats.preferred_block_size); the CPU platform does not
        # ask backends, patches.prefer_block_size sets it there
        pref = preferred_block_size(cls.kvq_config) if cls.kvq_config is not None else None
        return pref if pref is not None else super().get_preferred_block_size(default_block_size)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return is_kvq_dtype(kv_cache_dtype)

    @classmethod
    def is_ours(cls, spec) -> bool:
        """A spec of one of our layers: uint8 storage that vLLM maps to no quant mode of its own. vLLM also
        hands us the specs of bf16 skip layers (page alignment asks the first backend for every page)."""
        from vllm.v1.kv_cache_interface import KVQuantMode

        mode = getattr(spec, "kv_quant_mode", KVQuantMode.NONE)
        return spec.dtype == torch.uint8 and mode == KVQuantMode.NONE

    @classmethod
    def customize_spec(cls, spec):
        if spec.state_content_bytes is not None or cls.kvq_config is None or not cls.is_ours(spec):
            return spec
        return replace(spec, state_content_bytes=slot_bytes(cls.kvq_config, spec.head_size, spec.block_size))


def backend_for(dtype: str, cfg: _config.KVQConfig) -> type[KVQAttentionBackend]:
    """The backend class serving ``dtype`` with ``cfg``; made once and kept in this module, so vLLM's
    ``resolve_obj_by_qualname`` finds it by name."""
    name = class_name(dtype, cfg)
    cls = globals().get(name)
    if cls is None:
        in_forward = _store_in_forward()
        impl = type(name + "Impl", (KVQAttentionImpl,), {"kvq_config": cfg, "_served": {}, "__module__": __name__,
                                                         "__qualname__": name + "Impl",
                                                         "store_in_forward": in_forward})
        cls = type(name, (KVQAttentionBackend,), {"kvq_dtype": dtype, "kvq_config": cfg, "_impl": impl,
                                                  "supported_kv_cache_dtypes": [dtype],
                                                  "forward_includes_kv_cache_update": in_forward,
                                                  "__module__": __name__, "__qualname__": name})
        globals()[name] = cls
        globals()[name + "Impl"] = impl
    return cls


def backend_path(dtype: str, cfg: _config.KVQConfig) -> str:
    return f"{__name__}.{backend_for(dtype, cfg).__name__}"


def __getattr__(name: str):
    """Rebuild a backend class by name in a process that has not selected it yet (unpickling, a worker
    resolving a path): named dtypes from their preset, ``kvq`` from the current vLLM config's YAML, whose
    digest must match the name."""
    if not name.startswith(_CLASS_PREFIX) or name.endswith("Impl"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from vllm_kvq.vllm import dtypes

    for d in dtypes.NAMED_DTYPES:
        if class_name(d) == name:
            return backend_for(d, config_for_dtype(d))
    if name.startswith(_CLASS_PREFIX + CONFIG_DTYPE + "_"):
        from vllm.config import get_current_vllm_config_or_none

        vc = get_current_vllm_config_or_none()
        if vc is not None:
            cfg = config_for_dtype(CONFIG_DTYPE, dict(vc.additional_config or {}))
            if class_name(CONFIG_DTYPE, cfg) == name:
                return backend_for(CONFIG_DTYPE, cfg)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

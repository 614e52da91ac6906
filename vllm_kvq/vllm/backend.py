"""The vLLM attention backend for vllm_kvq dtypes: quantize on write, attend the packed cache.

One backend class per dtype (``KVQBackend_turboquant3``, ...; made on first use by the module
``__getattr__``), so ``customize_spec`` knows the slot size from the class alone. Every layer of a model
gets one slot size (vLLM wants one page size per KV-cache group): layers whose codecs need fewer bytes
are padded to the largest.

Prefill reads the cache it has just written (``forward_includes_kv_cache_update = False``: vLLM calls
``do_kv_cache_update`` first), so a prefix-cache hit, a chunked prefill and a cold run see the same
quantized K/V, and prompt-logprob perplexity measures the codec.
"""

from __future__ import annotations

import logging
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
from vllm_kvq.kv_format import KVFormat, formats_from_config
from vllm_kvq.vllm.dtypes import ADDITIONAL_CONFIG_KEY, CONFIG_DTYPE, KVQ_DTYPES, config_for_dtype

# A child of vLLM's "vllm" logger, so our lines appear in its log with its format and level.
logger = logging.getLogger("vllm.kvq")

_CLASS_PREFIX = "KVQBackend_"


def _class_name(dtype: str) -> str:
    return _CLASS_PREFIX + dtype.replace(".", "_")


def backend_path(dtype: str) -> str:
    return f"{__name__}.{_class_name(dtype)}"


@dataclass(frozen=True)
class _ModelShape:
    num_layers: int
    additional_config: dict


def _current_shape() -> _ModelShape | None:
    from vllm.config import get_current_vllm_config_or_none

    vc = get_current_vllm_config_or_none()
    if vc is None or vc.model_config is None:
        return None
    n = vc.model_config.get_num_layers(vc.parallel_config)
    return _ModelShape(n, dict(vc.additional_config or {}))


# Per-layer formats, padded to one slot size, keyed by everything they depend on. An engine resolves them
# at model construction (vLLM config current); vLLM may ask ``customize_spec`` later outside that context,
# which then reuses the shape seen last in this process.
_FORMATS: dict[tuple, list[KVFormat]] = {}
_LAST_SHAPE: _ModelShape | None = None


def layer_formats(dtype: str, head_size: int, num_kv_heads: int) -> list[KVFormat]:
    global _LAST_SHAPE
    shape = _current_shape() or _LAST_SHAPE
    if shape is None:
        raise RuntimeError("vllm_kvq: the vLLM config is not available to resolve the KV format")
    _LAST_SHAPE = shape
    cfg_ref = shape.additional_config.get(ADDITIONAL_CONFIG_KEY) if dtype == CONFIG_DTYPE else None
    key = (dtype, head_size, num_kv_heads, shape.num_layers, repr(cfg_ref))
    if key not in _FORMATS:
        cfg = config_for_dtype(dtype, shape.additional_config)
        fmts = formats_from_config(cfg, num_layers=shape.num_layers, num_kv_heads=num_kv_heads,
                                   head_size=head_size, uniform_slot=True)
        _FORMATS[key] = fmts
        logger.info("vllm_kvq: %s -> %d layers, slot %d B per token per KV head (K+V), %.2fx vs bf16",
                    dtype, len(fmts), fmts[0].slot_bytes, fmts[0].compression())
    return _FORMATS[key]


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
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KVQMetadata:
        cam = common_attn_metadata
        s = cam.num_reqs
        return KVQMetadata(seq_lens=cam.seq_lens[:s], query_start_loc=cam.query_start_loc[:s + 1],
                           block_table=cam.block_table_tensor[:s], slot_mapping=cam.slot_mapping,
                           num_actual_tokens=cam.num_actual_tokens, max_query_len=cam.max_query_len,
                           max_seq_len=cam.max_seq_len)


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _layer_index(layer_name: str) -> int:
    found = _LAYER_INDEX.findall(f".{layer_name}.")
    if len(found) != 1:
        raise ValueError(f"vllm_kvq: cannot tell the layer index of attention layer {layer_name!r}")
    return int(found[0])


class KVQAttentionImpl(AttentionImpl[KVQMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **kwargs) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sliding_window is not None:
            unsupported.append("sliding window")
        if logits_soft_cap:
            unsupported.append("logit soft-capping")
        if kwargs.get("sinks") is not None:
            unsupported.append("attention sinks")
        if kv_sharing_target_layer_name is not None:
            unsupported.append("cross-layer KV sharing")
        if unsupported:
            raise ValueError(f"vllm_kvq: --kv-cache-dtype {kv_cache_dtype} does not support {', '.join(unsupported)}; "
                             "keep these layers in the default cache with --kv-cache-dtype-skip-layers")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        # Resolve now, while the vLLM config is current, so a bad YAML fails at start-up.
        self._formats = layer_formats(kv_cache_dtype, head_size, self.num_kv_heads)
        self._fmt: KVFormat | None = None

    def _format(self, layer) -> KVFormat:
        if self._fmt is None:
            idx = _layer_index(layer.layer_name)
            if not 0 <= idx < len(self._formats):
                raise ValueError(f"vllm_kvq: layer {layer.layer_name!r} has index {idx}, model has {len(self._formats)}")
            self._fmt = self._formats[idx]
        return self._fmt

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]
        if n == 0 or kv_cache.numel() == 0:
            return
        k = key[:n].view(n, self.num_kv_heads, self.head_size)
        v = value[:n].view(n, self.num_kv_heads, self.head_size)
        ops.store(k, v, kv_cache, slot_mapping, self._format(layer))

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
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = ops.paged_attention(q, kv_cache, attn_metadata.block_table, attn_metadata.seq_lens,
                                  attn_metadata.query_start_loc, self._format(layer), scale=self.scale)
        flat = output.view(num_tokens, -1)
        flat[:n] = out.reshape(n, -1).to(output.dtype)
        if n < num_tokens:
            flat[n:] = 0
        return output


class KVQAttentionBackend(AttentionBackend):
    """Base of the per-dtype backends; ``kvq_dtype`` names the dtype."""

    kvq_dtype: ClassVar[str] = ""
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(KVQ_DTYPES)

    @staticmethod
    def get_name() -> str:
        # Must be an AttentionBackendEnum member; CUSTOM is the one reserved for plugins.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return KVQAttentionImpl

    @staticmethod
    def get_builder_cls():
        return KVQMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(1)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        from vllm_kvq.vllm.selection import SUPPORTED_HEAD_SIZES

        return list(SUPPORTED_HEAD_SIZES)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype in KVQ_DTYPES

    @classmethod
    def customize_spec(cls, spec):
        if spec.state_content_bytes is not None or not cls.kvq_dtype:
            return spec
        fmts = layer_formats(cls.kvq_dtype, spec.head_size, spec.num_kv_heads)
        return replace(spec, state_content_bytes=fmts[0].slot_bytes)


def _make_backend(dtype: str) -> type[KVQAttentionBackend]:
    name = _class_name(dtype)
    cls = type(name, (KVQAttentionBackend,), {"kvq_dtype": dtype, "__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    return cls


for _d in KVQ_DTYPES:
    _make_backend(_d)

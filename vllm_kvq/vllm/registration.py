"""What the ``vllm.general_plugins`` entry point does in every vLLM process (API server, engine core,
workers). vLLM may call it more than once per process, so it is idempotent."""

from __future__ import annotations

import logging
import sys

from vllm_kvq.vllm import patches
from vllm_kvq.vllm.dtypes import KVQ_DTYPES

logger = logging.getLogger("vllm_kvq")

_done = False


def vllm_version() -> tuple[int, ...]:
    import vllm

    parts = []
    for p in vllm.__version__.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _layer_spec(layer, spec):
    """The spec with the layer's own slot when our backend serves the layer. A process that never routed a
    layer to us has not imported the backend, so nothing is imported for other dtypes."""
    backend = sys.modules.get("vllm_kvq.vllm.backend")
    if backend is None or not isinstance(getattr(layer, "impl", None), backend.KVQAttentionImpl):
        return spec
    return layer.impl.kv_cache_spec(layer.layer_name, spec)


def _preferred_block_size(vllm_config) -> int | None:
    """The block size our dtype's config prefers (``formats.preferred_block_size``), None for other dtypes or
    a config that does not load (backend selection reports that, with its message)."""
    from vllm_kvq import config as _config
    from vllm_kvq.vllm.dtypes import config_for_dtype, is_kvq_dtype
    from vllm_kvq.vllm.formats import preferred_block_size

    dtype = getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", None)
    if not is_kvq_dtype(dtype):
        return None
    try:
        cfg = config_for_dtype(dtype, dict(getattr(vllm_config, "additional_config", None) or {}))
    except _config.ConfigError:
        return None
    return preferred_block_size(cfg)


def register() -> None:
    global _done
    if _done:
        return
    import vllm.config.cache as cache_mod

    if hasattr(cache_mod, "register_kv_cache_dtype"):
        patches.register_dtypes_v033(KVQ_DTYPES)
    else:
        patches.extend_cache_dtype_literal(KVQ_DTYPES)
    from vllm_kvq.vllm.dtypes import CONFIG_DTYPE
    from vllm_kvq.vllm.selection import choose_backend

    patches.route_attention_backend(choose_backend)
    patches.bypass_selector_cache((CONFIG_DTYPE,), choose_backend)
    patches.per_layer_kv_cache_spec(_layer_spec)
    patches.prefer_block_size(_preferred_block_size)
    _done = True
    logger.debug("vllm_kvq registered dtypes %s on vLLM %s", ", ".join(KVQ_DTYPES), vllm_version())

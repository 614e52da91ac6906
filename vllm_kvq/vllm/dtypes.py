"""The KV-cache dtype names this plugin adds to ``--kv-cache-dtype`` and what each one means.

Kept free of vLLM imports so tools (`vllm-kvq eval sweep`, tests) can use it without vLLM.

Naming: vLLM string-matches dtype names (``fp8*``, ``nvfp4*``, ``turboquant_*`` prefixes, ``*per_token_head``
suffixes), so ours avoid those; ``turboquant3`` (no underscore) does not collide with upstream's
``turboquant_3bit_nc``.
"""

from __future__ import annotations

from pathlib import Path

from vllm_kvq import config as _config

# dtype name -> preset in configs/ ("kvq" takes its config from --additional-config '{"kvq_config": PATH}')
NAMED_DTYPES = ("turboquant2", "turboquant2.5", "turboquant3", "turboquant3.5", "turboquant4", "uniform4", "uniform8")
CONFIG_DTYPE = "kvq"
KVQ_DTYPES = NAMED_DTYPES + (CONFIG_DTYPE,)
ADDITIONAL_CONFIG_KEY = "kvq_config"


def is_kvq_dtype(name: object) -> bool:
    return isinstance(name, str) and name in KVQ_DTYPES


def config_for_dtype(dtype: str, additional_config: dict | None = None) -> _config.KVQConfig:
    """The YAML config a dtype stands for; raises ConfigError with an actionable message."""
    if dtype in NAMED_DTYPES:
        return _config.load(dtype)
    if dtype != CONFIG_DTYPE:
        raise _config.ConfigError(f"unknown vllm_kvq dtype {dtype!r}; allowed: {', '.join(KVQ_DTYPES)}")
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

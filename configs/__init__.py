"""The YAML presets, installed as package data `vllm_kvq.presets` (see pyproject.toml)."""

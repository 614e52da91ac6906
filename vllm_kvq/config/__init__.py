"""YAML configs: load, validate, resolve to a per-(layer, KV head) table.

    cfg = config.load("turboquant3")           # a preset name, or a path to a YAML file
    table = config.resolve(cfg, num_layers=30, num_kv_heads=3)
    table[layer][head] -> (key CodecSpec, value CodecSpec)
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vllm_kvq.calibration import CalibrationStats
from vllm_kvq.config.schema import (MODEL_CALIBRATION, MODEL_CALIBRATION_FILE, CodecSpec, KVQConfig, Override,
                                   load_calibration, parse_codec, select)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key path, the value and what is allowed."""


def preset_dir() -> Path:
    """configs/ of the source tree, installed as the package data ``vllm_kvq.presets``."""
    # A source checkout imported from its own directory (a git worktree, PYTHONPATH=.) uses its own configs/:
    # the package data alias points at whichever tree was installed, which may be another checkout.
    src = Path(__file__).resolve().parents[2]
    if (src / "pyproject.toml").is_file() and (src / "configs").is_dir():
        return src / "configs"
    try:
        return Path(str(importlib.resources.files("vllm_kvq.presets")))
    except ModuleNotFoundError:  # a source tree used without installing
        return Path(__file__).resolve().parents[2] / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid kvq config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<top>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            model = Override if parent and parent[0] == "overrides" else KVQConfig
            msg = f"unknown key; allowed keys: {', '.join(model.model_fields)}"
        lines.append(f"  {path}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def from_dict(data: Any, source: str = "<dict>") -> KVQConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid kvq config {source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return KVQConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load(name_or_path: str | Path) -> KVQConfig:
    """A preset by name (``turboquant3``) or a YAML file by path."""
    p = Path(name_or_path)
    if not p.is_file():
        # Not a file: a preset name. Names like "turboquant2.5" have a "suffix", so presets are looked up by
        # name rather than by the absence of one.
        preset = preset_dir() / f"{name_or_path}.yaml"
        if preset.is_file() and p.name == str(name_or_path):
            p = preset
        elif p.suffix not in (".yaml", ".yml"):
            raise ConfigError(f"unknown kvq preset {str(name_or_path)!r}; presets: {', '.join(preset_names())} "
                              f"(or give a path to a .yaml file)")
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read kvq config {str(p)!r}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {p}: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("calibration"), str) and data["calibration"] != MODEL_CALIBRATION:
        # relative to the YAML file, so a config and its calibration file move together
        data = dict(data, calibration=str(p.absolute().parent / Path(data["calibration"]).expanduser()))
    return from_dict(data, str(p))


def resolve(cfg: KVQConfig, num_layers: int, num_kv_heads: int) -> list[list[tuple[CodecSpec, CodecSpec]]]:
    """table[layer][kv_head] = (key spec, value spec), overrides applied in order."""
    table = [[(cfg.key, cfg.value) for _ in range(num_kv_heads)] for _ in range(num_layers)]
    for i, ov in enumerate(cfg.overrides):
        try:
            layers = select(ov.layers, num_layers, "layer")
        except IndexError as e:
            raise ConfigError(f"config {cfg.name!r}: overrides.{i}.layers: {e} (got {ov.layers!r})") from None
        try:
            heads = select(ov.heads, num_kv_heads, "kv head")
        except IndexError as e:
            raise ConfigError(f"config {cfg.name!r}: overrides.{i}.heads: {e} (got {ov.heads!r})") from None
        for layer in layers:
            for h in heads:
                k, v = table[layer][h]
                table[layer][h] = (ov.key or k, ov.value or v)
    return table


def for_draft(cfg: KVQConfig, num_layers: int, num_kv_heads: int,
              model: str | os.PathLike | None = None) -> tuple[KVQConfig, list[str]]:
    """``cfg`` for a standalone speculative-decoding draft model (directory ``model``), which vLLM serves with
    the target's cache dtype and config: the YAML was written for the target, and the user has no way to
    give the draft its own, so what only the target has must not stop the server. Selector items naming
    layers or KV heads the draft does not have are dropped (an override left with none selects nothing, but
    still counts toward the config's largest slot, ``customize_spec``'s answer for draft and target alike).
    A calibration file is the target's statistics and is not used; ``calibration: model`` is kept when the
    draft has statistics of its own. Returns the config and one note per change, for the log. The target
    itself keeps ``resolve``'s errors."""
    notes: list[str] = []
    overrides = []
    for i, ov in enumerate(cfg.overrides):
        update = {}
        for field, n, what in (("layers", num_layers, "layer"), ("heads", num_kv_heads, "kv head")):
            sel = getattr(ov, field)
            if sel is None:
                continue
            items = sel if isinstance(sel, list) else [sel]
            kept = [it for it in items if _selects(it, n, what)]
            if len(kept) != len(items):
                notes.append(f"overrides.{i}.{field}: {sel!r} -> {kept!r} (the draft has {n} {what}s)")
                update[field] = kept  # [] selects nothing (``select``); built past validation on purpose
        overrides.append(ov.model_copy(update=update) if update else ov)
    update: dict[str, Any] = {"overrides": overrides}
    own = cfg.calibration == MODEL_CALIBRATION and model is not None and model_calibration_path(model).is_file()
    if cfg.calibration is not None and not own:
        notes.append(f"calibration {cfg.calibration!r}: no statistics of the draft model, its codecs run "
                     f"uncalibrated" if cfg.calibration == MODEL_CALIBRATION else
                     f"calibration {cfg.calibration!r} holds the target's statistics: not used for the draft")
        update["calibration"] = None
    return cfg.model_copy(update=update), notes


def _selects(item, n: int, what: str) -> bool:
    try:
        select(item, n, what)
    except IndexError:
        return False
    return True


def model_calibration_path(model: str | os.PathLike) -> Path:
    """Where ``calibration: model`` looks for a model's statistics (``vllm-kvq calibrate`` writes them there)."""
    return Path(model) / MODEL_CALIBRATION_FILE


def calibration(cfg: KVQConfig, num_layers: int, num_kv_heads: int, head_size: int,
                model: str | os.PathLike | None = None) -> CalibrationStats | None:
    """The config's calibration statistics, checked against the model's shape; None when uncalibrated.
    ``model`` (the served model's directory) resolves ``calibration: model``."""
    if cfg.calibration is None:
        return None
    path = cfg.calibration
    if path == MODEL_CALIBRATION:
        if model is None:
            raise ConfigError(f"config {cfg.name!r} uses the served model's calibration (calibration: model), but no "
                              f"model directory is known here")
        path = str(model_calibration_path(model))
        if not os.path.isfile(path):
            raise ConfigError(f"config {cfg.name!r} needs calibration statistics of the model {str(model)!r}: there is "
                              f"no {path}; make them with `vllm-kvq calibrate {model}` (a local model directory; "
                              f"one forward pass over 1024 tokens), or pick an uncalibrated dtype such as turboquant4")
    try:
        stats = load_calibration(path)
        stats.check(num_layers, num_kv_heads, head_size)
    except ValueError as e:
        raise ConfigError(f"config {cfg.name!r}: calibration: {e} (got {path!r}); calibrate this "
                          f"model with `vllm-kvq calibrate`") from None
    return stats


__all__ = ["calibration", "load_calibration", "model_calibration_path", "MODEL_CALIBRATION", "for_draft",
           "ConfigError", "CodecSpec", "KVQConfig", "Override", "load", "from_dict", "resolve", "preset_names",
           "preset_dir", "parse_codec"]

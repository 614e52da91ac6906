"""The YAML schema: which codec each (layer, KV head) uses for keys and for values.

    name: turboquant3
    description: 3-bit TurboQuant keys and values
    seed: 0                       # seeds the random rotations
    key: turboquant3              # default codec for keys: a registered name ...
    value: {codec: turboquant, bits: 3, scale_mode: lsq}   # ... or a family with parameters
    overrides:                    # applied in order; later rules win
      - layers: [0, -1]           # ints (negative counts from the end), "a:b" ranges, or a list of both
        heads: "0:1"              # optional, same syntax over KV heads
        key: bf16                 # optional; value likewise
    calibration: smollm2.safetensors   # optional, from `vllm-kvq calibrate`; relative to this file, or
                                  # `model`: the served model's own (MODEL_DIR/kvq/calibration.safetensors)
    smooth_keys: true             # with calibration: also apply its per-channel key scales
    sink_tokens: 1                # optional: every block keeps its first tokens at bf16 (attention sinks)
    exact_self: true              # optional: each query attends its own token at full precision (the step's
                                  # K/V, not the cache's copy; no cache bytes)

Unknown keys, wrong types and unknown codecs are errors that name the key path, the value and what is
allowed (``ConfigError``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

from vllm_kvq import codecs
from vllm_kvq.calibration import CalibrationStats

Selector = Union[StrictInt, StrictStr, list[Union[StrictInt, StrictStr]]]


class CodecSpec(BaseModel):
    """A codec name plus optional parameters; YAML may give just the name as a string."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    codec: StrictStr
    params: tuple[tuple[str, Any], ...] = ()

    def build(self, head_dim: int, seed: int) -> codecs.VectorCodec:
        return codecs.get(self.codec, head_dim=head_dim, seed=seed, **dict(self.params))

    def __str__(self) -> str:
        if not self.params:
            return self.codec
        return f"{self.codec}(" + ", ".join(f"{k}={v}" for k, v in self.params) + ")"


def parse_codec(value: Any) -> CodecSpec:
    if isinstance(value, CodecSpec):
        return value
    if isinstance(value, str):
        name, params = value, {}
    elif isinstance(value, dict):
        if "codec" not in value:
            raise ValueError(f"a codec mapping needs a 'codec' key; got keys {sorted(value)}")
        params = dict(value)
        name = params.pop("codec")
        if not isinstance(name, str):
            raise ValueError(f"'codec' must be a string, got {name!r}")
    else:
        raise ValueError(f"expected a codec name or a mapping with 'codec', got {value!r}")
    if name not in codecs.names():
        raise ValueError(f"unknown codec {name!r}; allowed: {', '.join(codecs.names())}")
    allowed = codecs.family_params(name) - {"seed"}
    bad = sorted(set(params) - allowed)
    if bad:
        raise ValueError(f"codec {name!r} does not take {', '.join(map(repr, bad))}; allowed: {', '.join(sorted(allowed))}")
    spec = CodecSpec(codec=name, params=tuple(sorted(params.items())))
    try:  # fail at load time, not at serve time, on bad parameter values
        spec.build(head_dim=128, seed=0)
    except TypeError as e:  # a missing required parameter, e.g. {codec: uniform} without bits
        raise ValueError(f"codec {name!r} cannot be built from {dict(params)!r} ({e}); "
                         f"parameters: {', '.join(sorted(allowed))}") from None
    except ValueError as e:
        raise ValueError(str(e)) from None
    return spec


_SELECTOR_RE = re.compile(r"^\s*(-?\d+)?\s*(:\s*(-?\d+)?\s*){0,2}$")


def _check_selector(v: Any) -> Any:
    # Checked here, before pydantic's union validation, so a bad selector gives one error naming it rather
    # than one per union member, and so ``select`` never meets a string it cannot parse.
    items = v if isinstance(v, list) else [v]
    if isinstance(v, list) and not v:
        raise ValueError("an empty selector selects nothing")
    for it in items:
        ok = (isinstance(it, int) and not isinstance(it, bool)) or (
            isinstance(it, str) and it.strip() != "" and _SELECTOR_RE.match(it)
            and (it.count(":") < 2 or it.rsplit(":", 1)[1].strip() == "" or int(it.rsplit(":", 1)[1]) != 0))
        if not ok:
            raise ValueError(f"bad selector {it!r}: use an int, 'a:b' or 'a:b:step' with step != 0, or a list of "
                             f"these (negative counts from the end)")
    return v


def select(selector: Selector | None, n: int, what: str) -> list[int]:
    """Indices in [0, n) named by a selector; None selects all."""
    if selector is None:
        return list(range(n))
    out: list[int] = []
    for it in selector if isinstance(selector, list) else [selector]:
        if isinstance(it, int) or (isinstance(it, str) and ":" not in it):
            i = int(it)
            if not -n <= i < n:
                raise IndexError(f"{what} index {i} out of range for {n} {what}s (allowed {-n}..{n - 1})")
            out.append(i % n)
        else:
            parts = [int(p) if p.strip() else None for p in it.split(":")]
            picked = range(n)[slice(*parts)]
            if not picked:
                # Most likely a config written for a larger model: say so rather than silently skip the rule.
                raise IndexError(f"{what} range {it!r} selects no {what} of {n} (allowed indices {-n}..{n - 1})")
            out.extend(picked)
    return sorted(set(out))


class Override(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    layers: Selector | None = None
    heads: Selector | None = None
    key: CodecSpec | None = None
    value: CodecSpec | None = None

    _codec = field_validator("key", "value", mode="before")(lambda cls, v: None if v is None else parse_codec(v))
    _sel = field_validator("layers", "heads", mode="before")(lambda cls, v: None if v is None else _check_selector(v))


class KVQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: StrictStr = "custom"
    description: StrictStr = ""
    seed: StrictInt = Field(0, ge=0)
    key: CodecSpec
    value: CodecSpec
    overrides: list[Override] = []
    calibration: StrictStr | None = None
    smooth_keys: StrictBool = True
    sink_tokens: StrictInt = Field(0, ge=0, le=16)
    # attention reads each query's own token from the step's exact K/V instead of the cache (no cache bytes)
    exact_self: StrictBool = False

    _codec = field_validator("key", "value", mode="before")(lambda cls, v: parse_codec(v))

    @field_validator("calibration")
    @classmethod
    def _calibration_file(cls, v: str | None) -> str | None:
        # Readable and well-formed now; whether its shapes fit the model is known only when formats are built.
        if v is not None and v != MODEL_CALIBRATION:
            load_calibration(v)
        return v


# ``calibration: model``: the statistics ``vllm-kvq calibrate MODEL_DIR`` writes into the model directory, so one
# preset serves any model that has been calibrated. In a subdirectory: vLLM and transformers load every
# top-level *.safetensors of a model directory as weights.
MODEL_CALIBRATION = "model"
MODEL_CALIBRATION_FILE = "kvq/calibration.safetensors"


_CALIBRATIONS: dict[tuple[str, int, int], CalibrationStats] = {}


def load_calibration(path: str) -> CalibrationStats:
    """The statistics in a calibration file (cached by path, size and mtime); ValueError when unusable."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot read calibration file: {e.strerror}; make one with `vllm-kvq calibrate`") from None
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _CALIBRATIONS:
        try:
            _CALIBRATIONS[key] = CalibrationStats.load(path)
        except (ValueError, OSError) as e:
            raise ValueError(f"not a calibration file from `vllm-kvq calibrate`: {e}") from None
    return _CALIBRATIONS[key]

"""Vector codecs, registered by name.

    codec = codecs.get("turboquant3", head_dim=128)
    codes = codec.encode(x)    # (N, D) float -> (N, codec.nbytes) uint8
    x_hat = codec.decode(codes)

A name is either registered as-is (``turboquant3``) or a family name plus parameters given as keywords
(``codecs.get("uniform", head_dim=128, bits=4, group_size=32)``); YAML configs use the same two forms.
"""

from __future__ import annotations

import functools
from typing import Callable

from vllm_kvq.codecs.base import Field, VectorCodec
from vllm_kvq.codecs.lloyd_max import Codebook, lloyd_max_codebook
from vllm_kvq.codecs.raw import RawCodec
from vllm_kvq.codecs.turboquant import TurboQuantCodec
from vllm_kvq.codecs.uniform import UniformCodec

# family name -> (factory(head_dim, **params), allowed parameter names)
_FAMILIES: dict[str, tuple[Callable[..., VectorCodec], frozenset[str]]] = {}
# preset name -> (family, fixed params)
_PRESETS: dict[str, tuple[str, dict]] = {}


def register_family(name: str, factory: Callable[..., VectorCodec], params: set[str]) -> None:
    if name in _FAMILIES or name in _PRESETS:
        raise ValueError(f"codec name {name!r} is already registered")
    _FAMILIES[name] = (factory, frozenset(params) | {"seed"})


def register_preset(name: str, family: str, **params) -> None:
    if name in _FAMILIES or name in _PRESETS:
        raise ValueError(f"codec name {name!r} is already registered")
    if family not in _FAMILIES:
        raise ValueError(f"unknown codec family {family!r}; known: {', '.join(sorted(_FAMILIES))}")
    _PRESETS[name] = (family, params)


def names() -> list[str]:
    """Every name ``get`` accepts: presets, then families."""
    return sorted(_PRESETS) + sorted(_FAMILIES)


def family_names() -> list[str]:
    """Names that need parameters (``get("uniform", bits=4)``), as opposed to presets."""
    return sorted(_FAMILIES)


def family_params(name: str) -> frozenset[str]:
    fam = _PRESETS[name][0] if name in _PRESETS else name
    return _FAMILIES[fam][1]


def get(name: str, head_dim: int, **params) -> VectorCodec:
    """A codec by registry name; keyword params override a preset's or fill a family's."""
    if name in _PRESETS:
        family, fixed = _PRESETS[name]
        merged = {**fixed, **params}
        label = name if not params or all(fixed.get(k) == v for k, v in params.items() if k != "seed") else None
    elif name in _FAMILIES:
        family, merged, label = name, dict(params), None
    else:
        raise KeyError(f"unknown codec {name!r}; registered: {', '.join(names())}")
    factory, allowed = _FAMILIES[family]
    bad = sorted(set(merged) - allowed)
    if bad:
        raise ValueError(f"codec {name!r} does not take {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")
    return _build(family, head_dim, label, tuple(sorted(merged.items())))


@functools.lru_cache(maxsize=None)
def _build(family: str, head_dim: int, label: str | None, items: tuple) -> VectorCodec:
    factory, _ = _FAMILIES[family]
    return factory(head_dim, name=label, **dict(items))


register_family("turboquant", TurboQuantCodec, {"bits", "scale_mode", "rotation"})
register_family("uniform", UniformCodec, {"bits", "group_size", "rotate"})
register_family("raw", RawCodec, {"dtype"})
for _b in (2, 2.5, 3, 3.5, 4):
    register_preset(f"turboquant{_b:g}", "turboquant", bits=_b)
register_preset("uniform4", "uniform", bits=4)
register_preset("uniform8", "uniform", bits=8)
register_preset("bf16", "raw", dtype="bf16")
register_preset("fp16", "raw", dtype="fp16")

__all__ = ["VectorCodec", "Field", "Codebook", "get", "names", "register_family", "register_preset",
           "lloyd_max_codebook", "TurboQuantCodec", "UniformCodec", "RawCodec", "family_params", "family_names"]

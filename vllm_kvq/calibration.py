"""Calibrated KV statistics: a fixed per-(layer, KV head) key mean, value mean and key channel scale.

A cache stores ``(k - mu_k) / s`` and ``v - mu_v`` instead of k and v. Neither costs a byte per token:

* ``q . mu_k`` is the same for every key a query sees, so softmax ignores it and keys are never shifted
  back; the query is multiplied by ``s`` instead of the keys (``(q * s) . ((k - mu_k) / s) = q . (k - mu_k)``).
* Attention weights sum to one, so ``mu_v`` is added once to each output row.

Centring removes the large common component of post-RoPE keys (and of values) that a norm-scaled quantizer
otherwise spends its levels on. The key channel scale weighs each channel by what an error there costs: a
norm-scaled quantizer after a rotation adds noise of the same variance to every channel of ``(k - mu_k) / s``,
proportional to its squared norm, so a score's error ``q . (s * e)`` has variance proportional to
``sum_i Q_i s_i^2 * sum_i K_i / s_i^2`` (``K_i``, ``Q_i``: the mean squares of the centred key's and the query's
channel i), least at ``s_i^2 = sqrt(K_i / Q_i)`` (Cauchy-Schwarz). So ``s = (K / Q) ** (alpha / 2)`` per
channel with ``alpha = 1/2`` (geometric mean 1; the two channels of a RoPE pair share K and Q). Without query
statistics (``q_ms=None``) ``s = K ** (alpha / 2)``, the key-only form. Measured on SmolLM2 (docs/quality.md):
the query term lowers the KL of 4-bit and 3.5/3-bit caches by ~22 %.

    stats = compute(model, input_ids)                      # one eager forward of a HF causal LM
    stats.save("smollm2.safetensors"); CalibrationStats.load(path).check(num_layers, num_kv_heads, head_size)

The file holds three float32 tensors of shape (L, Hk, D): ``mu_k``, ``mu_v``, ``k_smooth``, and for
position-aware key centring (``key_centre="rope"``, the default for RoPE models; ``vllm_kvq.key_centre``) a
fourth, ``rope_freq`` (R/2,): the model's RoPE frequencies, and ``mu_k`` is then the mean of the keys before
RoPE, which the cache turns to each key's position. Nothing here imports vLLM; transformers is imported only
by ``compute``'s caller (it takes a loaded model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

TENSORS = ("mu_k", "mu_v", "k_smooth")
KEY_CENTRES = ("rope", "fixed")  # position-aware (vllm_kvq.key_centre) or one post-RoPE key mean


@dataclass(frozen=True)
class CalibrationStats:
    mu_k: torch.Tensor  # (L, Hk, D) float32, mean of post-RoPE keys
    mu_v: torch.Tensor  # (L, Hk, D) float32, mean of values
    k_smooth: torch.Tensor  # (L, Hk, D) float32 > 0, per-channel key scale, geometric mean 1 per head
    metadata: tuple[tuple[str, str], ...] = ()
    # (R/2,) RoPE frequencies when mu_k is the pre-RoPE key mean (position-aware centring), else None
    rope_freq: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mu_k.shape)

    def check(self, num_layers: int, num_kv_heads: int, head_size: int) -> None:
        """Raises ValueError naming the expected and found shapes."""
        want = (num_layers, num_kv_heads, head_size)
        bad = [f"{n} {tuple(getattr(self, n).shape)}" for n in TENSORS if tuple(getattr(self, n).shape) != want]
        if bad:
            raise ValueError(f"expected (layers, kv_heads, head_size) = {want} for every tensor, got "
                             + ", ".join(bad))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {n: getattr(self, n).float().contiguous() for n in TENSORS}
        if self.rope_freq is not None:
            tensors["rope_freq"] = self.rope_freq.float().contiguous()
        save_file(tensors, str(path), metadata=dict(self.metadata))

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStats":
        """Raises ValueError when the file is not a calibration file (OSError when it cannot be read)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except SafetensorError as e:
            raise ValueError(f"not a safetensors file ({e})") from None
        missing = [n for n in TENSORS if n not in tensors]
        if missing:
            raise ValueError(f"missing tensors {missing}; found {sorted(tensors)}, need {list(TENSORS)}")
        t = {n: tensors[n].float() for n in TENSORS}
        if any(x.dim() != 3 for x in t.values()) or len({x.shape for x in t.values()}) != 1:
            raise ValueError("expected three tensors of one shape (layers, kv_heads, head_size), got "
                             + ", ".join(f"{n} {tuple(x.shape)}" for n, x in t.items()))
        if not bool((t["k_smooth"] > 0).all()) or not all(bool(x.isfinite().all()) for x in t.values()):
            raise ValueError("k_smooth must be positive and every value finite")
        freq = tensors.get("rope_freq")
        if freq is not None:
            d = t["mu_k"].shape[-1]
            if freq.dim() != 1 or not 0 < 2 * freq.numel() <= d or not bool((freq.float() > 0).all()):
                raise ValueError(f"rope_freq must hold R/2 positive frequencies with R <= head_size {d}, got "
                                 f"{tuple(freq.shape)}")
            freq = freq.float()
        return cls(**t, metadata=tuple(sorted(meta.items())), rope_freq=freq)


# A RoPE pair whose angle moves more than this over the serving horizon gets no key mean (see rope_mask).
MAX_DRIFT_RAD = 1.1


def rope_frequencies(config, head_dim: int) -> tuple[torch.Tensor, int] | None:
    """(angular frequency per rotate-half pair (i, i + R/2), R) of a HF model config's rotary embedding, R the
    rotated channels (partial rotary: the first R of ``head_dim``); None when the config names no RoPE base.
    Scaled RoPE types (llama3, yarn, ...) slow the low frequencies down: the base frequencies used here are
    then an upper bound, which only masks more pairs."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = (params.get("rope_theta") if isinstance(params, dict) else None) or getattr(config, "rope_theta", None)
    if not theta:
        return None
    rot = int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0)) // 2 * 2
    i = torch.arange(rot // 2, dtype=torch.float64)
    return (float(theta) ** (-2 * i / rot)).float(), rot


def rope_mask(freq: torch.Tensor, rot: int, head_dim: int, horizon: int) -> torch.Tensor:
    """(D,) 1.0 for channels whose key mean holds over positions 0..horizon, else 0.0.

    Post-RoPE keys rotate pair (i, i + R/2) by freq[i] per position. A pair that turns by more than
    MAX_DRIFT_RAD over the horizon has no position-independent mean: the mean measured on the calibration
    text's positions points elsewhere at later positions, and subtracting it there makes the stored vector
    longer, not shorter (measured: needle retrieval at 4K fell from 5/5 to 1-2/5 with a 1024-position mean).
    Unrotated channels (partial rotary) always keep their mean."""
    keep = (freq * horizon <= MAX_DRIFT_RAD).float()
    mask = torch.ones(head_dim)
    mask[:rot // 2] = keep
    mask[rot // 2:rot] = keep
    return mask


def _tie_pairs(ms: torch.Tensor, half: int) -> torch.Tensor:
    """(..., D) per-channel mean squares with the two channels of each rotate-half RoPE pair (i, i + half),
    i < half, replaced by their average: a pair's energy is rotation-invariant, a single channel's is not."""
    pair = (ms[..., :half] + ms[..., half:2 * half]) / 2
    return torch.cat([pair, pair, ms[..., 2 * half:]], -1)


def channel_scale(k_ms: torch.Tensor, q_ms: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Key channel scales ``(k_ms / q_ms) ** (alpha / 2)`` (``k_ms ** (alpha / 2)`` without queries),
    geometric mean 1 per head. k_ms, q_ms (Hk, D): mean squares of the centred keys and of the queries (the
    KV head's query heads averaged), pairs already tied. See the module docstring for why."""
    r = k_ms.float().clamp(min=1e-12)
    if q_ms is not None:
        q_ms = q_ms.float()
        r = r / q_ms.clamp(min=1e-12 * float(q_ms.max().clamp(min=1e-30)))
    s = r ** (alpha / 2)
    return s / s.log().mean(-1, keepdim=True).exp()  # geometric mean 1: the codec's scale absorbs the rest


def statistics(keys: torch.Tensor,  # (Hk, N, D) post-RoPE keys of one layer
               values: torch.Tensor,  # (Hk, N, D)
               smooth_alpha: float = 0.5, rope: tuple[torch.Tensor, int] | None = None,
               horizon: int | None = None,
               q_ms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu_k, mu_v, k_smooth), each (Hk, D) float32, from one layer's keys and values. With ``rope``
    (``rope_frequencies``) and ``horizon`` (the longest context served) the key mean keeps only the RoPE
    pairs that do not turn over the horizon, and both channels of a pair share one scale (a pair's energy is
    rotation-invariant, a single channel's is not). ``q_ms`` (Hk, D): the queries' channel mean squares
    (``channel_scale``); None: key-only scales."""
    k, v = keys.float(), values.float()
    mu_k, mu_v = k.mean(1), v.mean(1)
    # The scales measure each channel's spread around the calibration span's mean, also where that mean is not
    # kept: a turning pair's mean energy is not spread the codec has to cover (measured: scales taken around
    # the masked mean cost +3.6 -> +7.3 % perplexity and 9/10 -> 6/10 needle retrieval on SmolLM2).
    ms = (k - mu_k[:, None]).pow(2).mean(1)
    if rope is not None and horizon:
        mu_k = mu_k * rope_mask(*rope, k.shape[-1], horizon)
    if rope is not None:
        ms = _tie_pairs(ms, rope[1] // 2)
        q_ms = None if q_ms is None else _tie_pairs(q_ms, rope[1] // 2)
    return mu_k, mu_v, channel_scale(ms, q_ms, smooth_alpha)


def statistics_rope(keys: torch.Tensor,  # (Hk, N, D) post-RoPE keys of one layer
                    values: torch.Tensor,  # (Hk, N, D)
                    positions: torch.Tensor,  # (N,) their positions
                    freq: torch.Tensor,  # (R/2,) RoPE frequencies
                    smooth_alpha: float = 0.5,
                    q_ms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu_k, mu_v, k_smooth) for position-aware key centring: ``mu_k`` is the mean of the keys with RoPE
    undone (the mean the cache turns to each key's position, ``vllm_kvq.key_centre``); the scales measure
    each channel's spread around that turning mean, the two channels of a RoPE pair sharing one, weighed by
    the queries' ``q_ms`` (Hk, D) when given (``channel_scale``)."""
    from vllm_kvq import key_centre

    k, v = keys.float(), values.float()
    mu_k = key_centre.rotate(k, positions, freq, inverse=True).mean(1)  # (Hk, D)
    resid = k - key_centre.rotate(mu_k[:, None].expand_as(k), positions, freq)
    ms = _tie_pairs(resid.pow(2).mean(1), freq.numel())
    q_ms = None if q_ms is None else _tie_pairs(q_ms, freq.numel())
    return mu_k, v.mean(1), channel_scale(ms, q_ms, smooth_alpha)


@torch.no_grad()
def capture_kv(model, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE keys and values of every layer, [(k, v)] each (Hk, N, D), from one forward of a HF causal LM.

    They are read from the KV cache the forward fills, which holds exactly what attention consumes (keys after
    the rotary embedding) for any architecture transformers supports, with no per-model hook to maintain.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    model(input_ids=input_ids.reshape(1, -1), past_key_values=cache, use_cache=True)
    out = []
    for layer in cache.layers:
        out.append((layer.keys[0].float(), layer.values[0].float()))
    return out


def compute(model, input_ids: torch.Tensor, *, skip_first: int = 4, smooth_alpha: float = 0.5,
            rope_horizon: int | None = None, key_centre: str = "fixed", smooth_queries: bool = True,
            progress: Callable[[str], None] | None = None) -> CalibrationStats:
    """Statistics of one forward over ``input_ids`` (N,), ignoring the first ``skip_first`` positions
    (attention sinks: their keys and values are far from the rest and would pull the means).

    ``key_centre="rope"``: position-aware key centring (``statistics_rope``; needs a RoPE base in the model
    config). ``"fixed"``: one post-RoPE key mean; ``rope_horizon`` (the longest context to be served; None:
    no RoPE handling) then drops the means of RoPE pairs that turn over it and ties the pairs' scales."""
    if key_centre not in KEY_CENTRES:
        raise ValueError(f"key_centre must be one of {', '.join(KEY_CENTRES)}, got {key_centre!r}")
    n = int(input_ids.numel())
    if n <= skip_first:
        raise ValueError(f"need more than skip_first={skip_first} tokens, got {n}")
    say = progress or (lambda msg: None)
    say(f"forward over {n} tokens")
    if smooth_queries:  # the queries as attention consumes them, recorded during the same forward
        from vllm_kvq import fake_quant

        with fake_quant.recording_query_energy(model, skip_first) as q_energy:
            kv = capture_kv(model, input_ids)
    else:  # the model is left as it is
        kv = capture_kv(model, input_ids)
    d = kv[0][0].shape[-1]
    if smooth_queries and len(q_energy) != len(kv):
        raise ValueError(f"saw the queries of {len(q_energy)} of {len(kv)} layers: this architecture does not "
                         f"attend through transformers' attention interface; pass smooth_queries=False "
                         f"(`vllm-kvq calibrate --no-smooth-queries`) for key-only scales")
    rope = rope_frequencies(model.config, d) if (rope_horizon or key_centre == "rope") else None
    if key_centre == "rope" and (rope is None or rope[1] == 0):
        raise ValueError("key_centre='rope' needs a RoPE model (no rope_theta in the model config); use 'fixed'")
    if rope_horizon and rope is None:
        say("no RoPE base in the model config: key means are kept on every channel")
    positions = torch.arange(skip_first, n)
    rows = []
    for i, (k, v) in enumerate(kv):
        # the KV head's query heads (query head j reads KV head j // G), their channel mean squares averaged
        q_ms = q_energy[i].float().reshape(k.shape[0], -1, d).mean(1) if smooth_queries else None
        if key_centre == "rope":
            rows.append(statistics_rope(k[:, skip_first:], v[:, skip_first:], positions, rope[0], smooth_alpha,
                                        q_ms=q_ms))
        else:
            rows.append(statistics(k[:, skip_first:], v[:, skip_first:], smooth_alpha, rope, rope_horizon,
                                   q_ms=q_ms))
        mk, mv, s = rows[-1]
        say(f"layer {i:3d}: |mu_k| {mk.norm(dim=-1).mean():8.3f}  |mu_v| {mv.norm(dim=-1).mean():7.3f}  "
            f"k_smooth {s.min():.3f}..{s.max():.3f}")
    mu_k, mu_v, ks = (torch.stack(x) for x in zip(*rows))
    meta = (("skip_first", str(skip_first)), ("smooth_alpha", str(smooth_alpha)), ("tokens", str(n)),
            ("smooth_queries", "1" if smooth_queries else "0"),
            ("key_centre", key_centre),
            ("rope_horizon", str(rope_horizon if rope is not None and key_centre == "fixed" else 0)))
    return CalibrationStats(mu_k, mu_v, ks, metadata=meta,
                            rope_freq=rope[0].float() if key_centre == "rope" else None)

"""Per-layer bit allocation under a byte budget: measure each layer's sensitivity, then solve a knapsack.

``vllm-kvq calibrate MODEL --budget BITS`` runs this after computing the calibration statistics:

1. Sensitivity. The model runs in transformers with fake-quantized K/V (``vllm_kvq.fake_quant``: the
   package's own store -> decode) on a few prompts. For every layer, side (keys, values) and candidate codec,
   only that one (layer, side) is quantized, every other stays bf16, and the loss is the mean KL divergence
   of next-token distributions against the bf16 cache (top-64 + rest bin). Also measured per KV head at the
   cheapest candidate when asked (``--head-sensitivity``): informative only, see below.
2. Choice. Losses are taken as additive over (layer, side) (the usual first-order model: KVTuner, HAWQ) and
   the cheapest total loss meeting the budget is found exactly by dynamic programming over bytes:
   - ``slot="uniform"`` (default): every layer's K+V slot fits the budget: per layer, the best (K, V) pair
     within the budget;
   - ``slot="mixed"``: only the average over layers must fit (layers may differ). vLLM allocates each
     layer's own slot (the adapter gives every layer's spec its own size; vLLM keeps the layers in one
     KV-cache group whose block holds one page per layer), so a mixed choice costs its average bytes in
     vLLM's KV-token count, not its largest layer's (``VLLM_KVQ_PADDED_SLOTS=1`` shows the padded count).
   With ``--sink-tokens`` (default 1) every slot also carries the sink area (``sink_area_bytes`` at the
   cache's block size), which the budget pays first; sensitivities are measured with the sinks and, with
   ``--exact-self`` (default), each query's own token exact, as the written YAML serves them.
   Per-head choices are not made: a layer's slot is as large as its largest head, so mixing codecs across
   heads of a layer buys nothing unless their K+V bytes are equal.
3. The YAML: the most common (K, V) pair as the default, one override per differing layer, the calibration
   file, and a description of the budget and the predicted loss.

Budgets are in bits per cached element, metadata included: ``BITS * 2 * head_dim / 8`` bytes per token per KV
head for K and V together (bf16 = 16).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vllm_kvq import codecs, fake_quant
from vllm_kvq.kv_format import KVFormat, calibration_kwargs

# FibQuant up to 3 bits (its 2-D/4-D codebooks beat TurboQuant's scalar codes by 4-10 % MSE at the same bytes, and
# through vLLM its per-layer choice beat TurboQuant-only candidates at the same budget: docs/quality.md,
# "FibQuant candidates"), TurboQuant above
DEFAULT_CANDIDATES = ("fibquant1.75", "fibquant2", "fibquant2.5", "fibquant3", "turboquant3.5", "turboquant4")
SIDES = ("K", "V")


@dataclass
class Sensitivity:
    """loss[layer][side][codec] = mean KL (nats/token) with only that (layer, side) quantized by codec."""

    candidates: list[str]
    nbytes: dict[str, int]  # codec -> bytes per vector
    loss: list[dict[str, dict[str, float]]]  # [layer] -> {"K": {codec: kl}, "V": {...}}
    head_loss: list[list[float]] | None = None  # [layer][head]: K and V of that head at the cheapest codec
    tokens: int = 0
    recipe: dict = field(default_factory=dict)  # what else the runs had: sink_tokens, block_size, exact_self


@dataclass
class Choice:
    per_layer: list[tuple[str, str]]  # (K codec, V codec) per layer
    bytes_per_layer: list[int]  # K+V bytes per token per KV head
    predicted_loss: float  # sum of the chosen (layer, side) losses
    budget_bytes: float
    slot: str
    notes: list[str] = field(default_factory=list)

    @property
    def avg_bytes(self) -> float:
        return sum(self.bytes_per_layer) / len(self.bytes_per_layer)

    @property
    def padded_bytes(self) -> int:
        return max(self.bytes_per_layer)

    @property
    def vllm_bytes(self) -> float:
        """Bytes per token per KV head that vLLM allocates on average: each layer's own slot, which
        ``bytes_per_layer`` already is (codes rounded to an even size, then the unrounded sink area, as
        ``KVFormat`` lays a slot out)."""
        return self.avg_bytes


def slot_code_bytes(k_nbytes: int, v_nbytes: int) -> int:
    """A slot's K + V bytes as ``KVFormat`` lays them out: rounded up to even (fp16 metadata stays 2-byte
    aligned); a sink area follows unrounded."""
    b = k_nbytes + v_nbytes
    return b + b % 2


def measure(model, prompts: list[list[int]], *, num_layers: int, num_kv_heads: int, head_dim: int,
            calibration_stats=None, smooth_keys: bool = True, candidates=DEFAULT_CANDIDATES,
            head_sensitivity: bool = False, progress: bool = True, sink_tokens: int = 0,
            block_size: int | None = None, exact_self: bool = False) -> Sensitivity:
    """Quantize one (layer, side) at a time with each candidate (and, if asked, one KV head at a time at the
    cheapest candidate); loss = mean KL against the bf16 cache over the prompts' tokens. ``sink_tokens`` (with
    the cache's ``block_size``) and ``exact_self`` measure with the recipe's sinks and exact own token, which
    change how much each codec costs (a centred key cache loses most at the sink tokens)."""
    from tqdm import tqdm

    cands = [codecs.get(c, head_dim=head_dim) for c in candidates]
    nbytes = {name: c.nbytes for name, c in zip(candidates, cands)}
    bf16 = codecs.get("bf16", head_dim=head_dim)

    def fmt(layer, kc, vc, heads=None):
        keys = [kc if heads is None or h in heads else bf16 for h in range(num_kv_heads)]
        vals = [vc if heads is None or h in heads else bf16 for h in range(num_kv_heads)]
        return KVFormat(head_dim, keys, vals, sink_tokens=sink_tokens, block_size=block_size if sink_tokens else None,
                        **calibration_kwargs(calibration_stats, layer, smooth_keys))

    with fake_quant.quantized(model, None):
        refs = [fake_quant.score(model, p, keep_top=64) for p in prompts]
    tokens = sum(r["nll"].numel() for r in refs)

    def loss_of(layer, f) -> float:
        with fake_quant.quantized(model, fake_quant.formats_quantizer({layer: f}, only={layer}),
                                  recent_window=1 if exact_self else 0):
            kl = [fake_quant.score(model, p, ref_top=r["top"])["kl"] for p, r in zip(prompts, refs)]
        return torch.cat(kl).double().mean().item()

    jobs = [(layer, side, i) for layer in range(num_layers) for side in SIDES for i in range(len(cands))]
    loss = [{s: {} for s in SIDES} for _ in range(num_layers)]
    bar = tqdm(jobs, desc="sensitivity", unit="run", file=sys.stderr, disable=not progress)
    for layer, side, i in bar:
        bar.set_postfix_str(f"layer {layer} {side} {candidates[i]}")
        kc, vc = (cands[i], bf16) if side == "K" else (bf16, cands[i])
        loss[layer][side][candidates[i]] = loss_of(layer, fmt(layer, kc, vc))
    head_loss = None
    if head_sensitivity:
        cheap = min(range(len(cands)), key=lambda i: cands[i].nbytes)
        head_loss = [[0.0] * num_kv_heads for _ in range(num_layers)]
        hjobs = [(layer, h) for layer in range(num_layers) for h in range(num_kv_heads)]
        for layer, h in tqdm(hjobs, desc="head sensitivity", unit="run", file=sys.stderr, disable=not progress):
            head_loss[layer][h] = loss_of(layer, fmt(layer, cands[cheap], cands[cheap], heads={h}))
    return Sensitivity(list(candidates), nbytes, loss, head_loss, tokens,
                       recipe=recipe_of(sink_tokens, block_size, exact_self))


def recipe_of(sink_tokens: int, block_size: int | None, exact_self: bool) -> dict:
    return {"sink_tokens": sink_tokens, "block_size": block_size if sink_tokens else None, "exact_self": exact_self}


def save_sensitivity(sens: Sensitivity, path) -> None:
    import dataclasses
    import json

    Path(path).write_text(json.dumps(dataclasses.asdict(sens)))


def load_sensitivity(path, candidates: list[str], num_layers: int, recipe: dict | None = None) -> Sensitivity:
    """A saved measurement; ValueError when it was made for other candidates, another layer count or (when
    ``recipe`` is given) another recipe of sinks and exact own token."""
    import json

    d = json.loads(Path(path).read_text())
    if d["candidates"] != list(candidates) or len(d["loss"]) != num_layers:
        raise ValueError(f"{path} holds sensitivities for {d['candidates']} over {len(d['loss'])} layers, not "
                         f"{list(candidates)} over {num_layers}: delete it or pass another --sensitivity file")
    d.setdefault("recipe", {})
    if recipe is not None and d["recipe"] != recipe:
        raise ValueError(f"{path} was measured with {d['recipe'] or 'no sinks and no exact own token'}, not {recipe}: "
                         f"delete it or pass another --sensitivity file")
    return Sensitivity(**d)


def _best_pair(sens: Sensitivity, layer: int, max_bytes: float) -> tuple[float, str, str] | None:
    best = None
    for k in sens.candidates:
        for v in sens.candidates:
            b = slot_code_bytes(sens.nbytes[k], sens.nbytes[v])
            if b <= max_bytes:
                cost = sens.loss[layer]["K"][k] + sens.loss[layer]["V"][v]
                if best is None or cost < best[0]:
                    best = (cost, k, v)
    return best


def choose(sens: Sensitivity, budget_bytes: float, slot: str = "uniform", overhead: int = 0) -> Choice:
    """The (K, V) codec of every layer with the least summed loss whose bytes meet ``budget_bytes`` per token
    per KV head: in every layer (``uniform``) or on average over layers (``mixed``). ``overhead``: bytes every
    slot carries beside the codes (a sink area, ``sink_area_bytes``), counted in the budget."""
    n = len(sens.loss)
    cheapest = 2 * min(sens.nbytes.values())
    total_budget_bytes, budget_bytes = budget_bytes, budget_bytes - overhead
    if budget_bytes < cheapest:
        raise ValueError(f"budget of {total_budget_bytes:.1f} bytes per token per KV head"
                         + (f" ({budget_bytes:.1f} after the {overhead} B sink area)" if overhead else "")
                         + f" is below the cheapest pair of candidates ({cheapest} bytes: "
                         f"{min(sens.nbytes, key=sens.nbytes.get)} for K and V)")
    if slot == "uniform":
        picks = [_best_pair(sens, layer, budget_bytes) for layer in range(n)]
        per_layer = [(k, v) for _, k, v in picks]
        total = sum(c for c, _, _ in picks)
    elif slot == "mixed":
        # multiple-choice knapsack over layers: state = bytes spent so far (integers), value = least loss
        total_budget = int(budget_bytes * n)
        options = []
        for layer in range(n):
            opts = {}
            for k in sens.candidates:
                for v in sens.candidates:
                    b = slot_code_bytes(sens.nbytes[k], sens.nbytes[v])
                    cost = sens.loss[layer]["K"][k] + sens.loss[layer]["V"][v]
                    if b not in opts or cost < opts[b][0]:
                        opts[b] = (cost, k, v)
            options.append(opts)
        best: dict[int, tuple[float, list]] = {0: (0.0, [])}
        for opts in options:
            nxt: dict[int, tuple[float, list]] = {}
            for spent, (cost, path) in best.items():
                for b, (c, k, v) in opts.items():
                    s = spent + b
                    if s <= total_budget and (s not in nxt or cost + c < nxt[s][0]):
                        nxt[s] = (cost + c, path + [(k, v)])
            best = nxt
        total, per_layer = min(best.values(), key=lambda t: t[0])
    else:
        raise ValueError(f"slot must be 'uniform' or 'mixed', got {slot!r}")
    bpl = [slot_code_bytes(sens.nbytes[k], sens.nbytes[v]) + overhead for k, v in per_layer]
    return Choice(per_layer, bpl, total, total_budget_bytes, slot)


def sink_area_bytes(sink_tokens: int, head_dim: int, block_size: int) -> int:
    """Bytes per slot of the per-block sink area (``kv_format``: bf16 K and V of each sink token spread over
    the block's slots)."""
    if not sink_tokens:
        return 0
    return -(-sink_tokens * 4 * head_dim // block_size)


def to_yaml_dict(choice: Choice, *, name: str, calibration_file: str | None, smooth_keys: bool,
                 budget_bits: float, head_dim: int, sink_tokens: int = 0, exact_self: bool = False) -> dict:
    common = max(set(choice.per_layer), key=choice.per_layer.count)
    d = {"name": name,
         "description": (f"chosen by `vllm-kvq calibrate --budget {budget_bits:g}` ({choice.slot} slot): "
                         f"{choice.vllm_bytes:.1f} bytes per token per KV head on average, what vLLM allocates "
                         f"({4 * head_dim / choice.vllm_bytes:.2f}x vs bf16 {4 * head_dim}), {choice.padded_bytes} "
                         f"in the largest layer; predicted loss {choice.predicted_loss:.4f} nats/token (sum of "
                         f"per-layer KL)"),
         "key": common[0], "value": common[1]}
    overrides = [{"layers": i, "key": k, "value": v} for i, (k, v) in enumerate(choice.per_layer) if (k, v) != common]
    if overrides:
        d["overrides"] = overrides
    if calibration_file:
        d["calibration"] = calibration_file
        d["smooth_keys"] = smooth_keys
    if sink_tokens:
        d["sink_tokens"] = sink_tokens
    if exact_self:
        d["exact_self"] = True
    return d


def table(sens: Sensitivity, choice: Choice) -> str:
    """Per layer: the KL of each side at each candidate, what was chosen and its bytes."""
    short = {c: c.replace("turboquant", "tq") for c in sens.candidates}
    head = (["layer"] + [f"K {short[c]}" for c in sens.candidates] + [f"V {short[c]}" for c in sens.candidates]
            + ["chosen K", "chosen V", "bytes"] + (["worst head"] if sens.head_loss else []))
    lines = [" | ".join(head)]
    for i, (k, v) in enumerate(choice.per_layer):
        row = [str(i)] + [f"{sens.loss[i]['K'][c]:.4f}" for c in sens.candidates]
        row += [f"{sens.loss[i]['V'][c]:.4f}" for c in sens.candidates]
        row += [short[k], short[v], str(choice.bytes_per_layer[i])]
        if sens.head_loss:
            hl = sens.head_loss[i]
            row.append(f"{max(range(len(hl)), key=hl.__getitem__)} ({max(hl):.4f})")
        lines.append(" | ".join(row))
    return "\n".join(lines)


def explain(choice: Choice, head_dim: int) -> list[str]:
    bf16 = 4 * head_dim
    out = [f"budget {choice.budget_bytes:.1f} B per token per KV head (K+V): chose {choice.avg_bytes:.1f} B on average, "
           f"{choice.padded_bytes} B in the largest layer",
           f"vLLM allocates each layer's own slot (per-layer slot sizes): {choice.vllm_bytes:.1f} B on average, "
           f"{bf16 / choice.vllm_bytes:.2f}x the KV tokens of bf16 ({bf16} B)"
           + (f"; padding every layer to the largest would give {bf16 / choice.padded_bytes:.2f}x"
              if choice.padded_bytes > choice.vllm_bytes else ""),
           f"predicted loss (sum of per-(layer, side) KL): {choice.predicted_loss:.4f} nats/token"]
    return out


def budget_bytes(bits: float, head_dim: int) -> float:
    if not 0 < bits <= 16:
        raise ValueError(f"budget must be in (0, 16] bits per cached element, got {bits}")
    return bits * 2 * head_dim / 8


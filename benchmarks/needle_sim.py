"""Needle retrieval in the simulator, measured continuously: the pass key's log-probability under each cache.

Greedy needle retrieval through vLLM (``vllm-kvq eval needle``) is a yes/no per prompt: on SmolLM2 at 4K the
bf16 cache itself finds 8 of 10 or 17 of 20 keys and single keys flip between runs of one preset, so 20
prompts cannot tell a cache that equals bf16 from one that does not. This script asks the same prompts (the
eval's pass-key filler, depths and key format) in transformers with the package's fake-quantized K/V
(``vllm_kvq.fake_quant``: every layer's keys and values through ``ops.reference.store`` -> decode, as the
backend's strict prefill reads them) and scores the key teacher-forced after the question:

- key NLL: the summed negative log-likelihood of the key's tokens, paired against the bf16 cache on the same
  prompt (mean difference ± its standard error over the prompts);
- found: every key token is the model's most likely next token (what greedy decoding needs to write the key).

    .venv/bin/python benchmarks/needle_sim.py --configs k4v4-cal-sink,k3.5v3-edge-cal-sink --length 4096

``--configs`` takes preset names of ``configs/`` or YAML paths (e.g. a ``calibrate --budget`` output); a
config's sinks are placed at the block size the plugin serves it in (``--block-size``, default 256) and its
``exact_self`` reads each query's own token exactly. float32 model (a 4K prompt takes ~15-25 s per cache on 2
cores). ``--window W`` also runs every config with its W most recent tokens exact (the simulator's bf16 window).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from vllm_kvq import config, fake_quant
from vllm_kvq.eval import needle
from vllm_kvq.kv_format import formats_from_config


def prompts_for(tok, length: int, depths: list[float], keys_per_depth: int, seed: int) -> list[dict]:
    """The eval's needle prompts (``eval.needle.build_prompt``) at ``length`` tokens, tokenized with the key
    appended: {"ids": prompt + key tokens, "key_from": index of the first key token, "depth", "key"}."""
    units = needle.haystack_units("repeat")

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    n = needle.fit_units(count, units, length)
    rng = random.Random(seed)
    out = []
    for depth in depths:
        for _ in range(keys_per_depth):
            p = needle.build_prompt(units, n, depth, str(rng.randint(10000, 99999)), length)
            head = tok(p.text, add_special_tokens=False)["input_ids"]
            full = tok(p.text + " " + p.key, add_special_tokens=False)["input_ids"]
            if full[:len(head)] != head:
                raise RuntimeError("the key's tokens do not extend the prompt's: the tokenizer merges across them")
            out.append({"ids": full, "key_from": len(head), "depth": depth, "key": p.key})
    return out


def quantizer_for(model_dir: str, name: str, model_cfg, block_size: int):
    cfg = config.load(name)
    hd = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
    fmts = formats_from_config(cfg, num_layers=model_cfg.num_hidden_layers,
                               num_kv_heads=model_cfg.num_key_value_heads, head_size=hd,
                               block_size=block_size if cfg.sink_tokens else None, model=model_dir)
    return fake_quant.formats_quantizer(fmts), (1 if cfg.exact_self else 0)


@torch.no_grad()
def key_scores(model, prompts: list[dict], quantizer=None, window: int = 0, progress: str | None = None):
    """Per prompt: (key NLL, found) with the given quantizer (None: the bf16 cache)."""
    from tqdm import tqdm

    res = []
    with fake_quant.quantized(model, quantizer, recent_window=window):
        for p in tqdm(prompts, desc=progress or "bf16", unit="prompt", file=sys.stderr):
            r = fake_quant.score(model, p["ids"], score_from=p["key_from"], keep_top=1)
            tgt = torch.tensor(p["ids"][p["key_from"]:])
            res.append((r["nll"].sum().item(), bool((r["top"][0][:, 0] == tgt).all())))
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=lambda s: [x for x in s.split(",") if x], required=True)
    ap.add_argument("--model", default=None, help="HF model dir (default: SmolLM2, prepared if needed)")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depths", default=",".join(f"{(i + 0.5) / 20:g}" for i in range(20)),
                    help="relative needle depths (default: 20, 0.025 ... 0.975, as docs/quality.md's sweeps)")
    ap.add_argument("--keys", type=int, default=1, help="keys per depth")
    ap.add_argument("--block-size", type=int, default=256, help="the cache's block size (places the sinks)")
    ap.add_argument("--window", type=int, default=0,
                    help="also read each query's W most recent tokens exactly (a bf16 window, docs/window-design.md;"
                         " not a served feature yet): every config is run with and without it")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model_dir = a.model
    if model_dir is None:
        from vllm_kvq.eval.models import prepare_smollm2

        model_dir = str(prepare_smollm2())
    tok, model = fake_quant.load_model(model_dir)
    prompts = prompts_for(tok, a.length, [float(d) for d in a.depths.split(",")], a.keys, a.seed)
    t0 = time.time()
    base = key_scores(model, prompts)
    rows = {"bf16": {"nll": [b[0] for b in base], "found": [b[1] for b in base], "secs": round(time.time() - t0)}}
    for name in a.configs:
        t0 = time.time()
        q, window = quantizer_for(model_dir, name, model.config, a.block_size)
        r = key_scores(model, prompts, q, window, progress=name)
        rows[name] = {"nll": [x[0] for x in r], "found": [x[1] for x in r], "secs": round(time.time() - t0)}
        if a.window > window:
            r = key_scores(model, prompts, q, a.window, progress=f"{name} +window {a.window}")
            rows[f"{name} +window {a.window}"] = {"nll": [x[0] for x in r], "found": [x[1] for x in r]}
    n = len(prompts)
    print(f"needle at {a.length} tokens, {n} prompts (depths {a.depths}, {a.keys} key(s) each); "
          f"key NLL summed over the key's tokens, paired against bf16")
    print(f"{'cache':34} {'found':>7} {'key NLL':>8} {'Δ vs bf16 ± SE':>16}  by depth")
    for name, r in rows.items():
        d = torch.tensor(r["nll"], dtype=torch.float64) - torch.tensor(rows["bf16"]["nll"], dtype=torch.float64)
        se = d.std().item() / math.sqrt(n) if n > 1 else float("nan")
        marks = "".join("x" if f else "." for f in r["found"])
        print(f"{name:34} {sum(r['found']):>3}/{n:<3} {sum(r['nll']) / n:8.3f} "
              f"{d.mean().item():+8.3f} ± {se:5.3f}  {marks}")
    if a.out:
        Path(a.out).write_text(json.dumps({"length": a.length, "depths": a.depths, "keys": a.keys,
                                           "prompts": [{k: p[k] for k in ("depth", "key")} for p in prompts],
                                           "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""``vllm-kvq calibrate MODEL_DIR --text shakespeare:macbeth --tokens 1024 --out FILE.safetensors``

One eager forward of the model in HF transformers (float32, CPU is fine for small models) over the first
``--tokens`` tokens of a text; writes the per-(layer, KV head) key/value means and key channel scales that a
config's ``calibration:`` key points to. Calibrate on a text other than the one you evaluate on.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _positive(s: str) -> int:
    n = int(s)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a local HF model directory")
    p.add_argument("--text", default="shakespeare:macbeth", help="shakespeare:PLAY or a text file path")
    p.add_argument("--tokens", type=_positive, default=1024, help="tokens of the text to run (default 1024)")
    p.add_argument("--skip-first", type=int, default=4, help="leading positions left out of the statistics")
    p.add_argument("--smooth-alpha", type=float, default=0.5,
                   help="key channel scale = rms(centred key) ** alpha (0 disables smoothing; default 0.5)")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvq import calibration
    from vllm_kvq.eval.data import load_text

    def say(msg):
        print(f"[calibrate] {msg}", file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    say(f"loading {args.model}")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = tok(load_text(args.text))["input_ids"][:args.tokens]
    if len(ids) < args.tokens:
        say(f"warning: {args.text} has only {len(ids)} tokens")
    stats = calibration.compute(model, torch.tensor(ids), skip_first=args.skip_first,
                                smooth_alpha=args.smooth_alpha, progress=say)
    meta = dict(stats.metadata, model=str(Path(args.model).name), text=args.text)
    stats = calibration.CalibrationStats(stats.mu_k, stats.mu_v, stats.k_smooth, tuple(sorted(meta.items())))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(out)
    L, H, D = stats.shape
    say(f"wrote {out} ({out.stat().st_size} B): mu_k, mu_v, k_smooth of shape ({L}, {H}, {D}) "
        f"in {time.time() - t0:.1f}s")
    print(out)
    return 0

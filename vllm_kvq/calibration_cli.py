"""``vllm-kvq calibrate MODEL_DIR [--text shakespeare:macbeth] [--tokens 1024] [--out FILE.safetensors]``

One eager forward of the model in HF transformers (float32, CPU is fine for small models) over the first
``--tokens`` tokens of a text; writes the per-(layer, KV head) key/value means and key channel scales that a
config's ``calibration:`` key points to. By default they go into the model directory
(``MODEL_DIR/kvq/calibration.safetensors``), where the calibrated presets (``calibration: model``, e.g.
``--kv-cache-dtype k4v4-cal-sink``) find them. Calibrate on a text other than the one you evaluate on.

``--budget BITS`` (bits per cached element, metadata included; bf16 = 16) also chooses every layer's key and
value codec: it measures each layer's sensitivity on ``--prompts`` prompts of the same text (after the
calibration tokens), picks the cheapest-loss choice that meets the budget (``vllm_kvq.budget``), prints a
table of what it chose and why, and writes a YAML config (``--config-out``, default beside ``--out``) that
``vllm serve --kv-cache-dtype kvq --additional-config '{"kvq_config": "FILE.yaml"}'`` takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

# Where the RoPE-aware key mean stops by default (``--rope-horizon``): SmolLM2's trained context.
DEFAULT_ROPE_HORIZON = 8192


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
    p.add_argument("--key-centre", choices=("auto", "rope", "fixed"), default="auto",
                   help="rope: the key mean follows each key's RoPE position (the mean of the keys before RoPE, "
                        "turned by the cache to each key's position); fixed: one post-RoPE mean (see --rope-horizon); "
                        "auto (default): rope when the model config has a RoPE base, else fixed")
    p.add_argument("--rope-horizon", type=int, default=None,
                   help="--key-centre fixed only: the longest context you will serve (default: the model's "
                        f"max_position_embeddings, at most {DEFAULT_ROPE_HORIZON}); key means are kept only on RoPE "
                        "pairs that do not turn over it (0: keep every channel's mean)")
    p.add_argument("--smooth-alpha", type=float, default=0.5,
                   help="key channel scale = (rms(centred key) / rms(query)) ** alpha, the least score error at "
                        "0.5 (the default); 0 disables smoothing")
    p.add_argument("--smooth-queries", action=argparse.BooleanOptionalAction, default=True,
                   help="weigh the key channel scales by the queries' channel energy (default; "
                        "--no-smooth-queries: rms(centred key) ** alpha, the key-only form)")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None,
                   help="output .safetensors file (default MODEL_DIR/kvq/calibration.safetensors, which the "
                        "calibrated presets read)")
    b = p.add_argument_group("bit allocation (--budget)")
    b.add_argument("--budget", type=float, default=None,
                   help="bits per cached element incl. metadata (e.g. 3.25 = 52 B per token per head at head_dim 64)")
    b.add_argument("--candidates", default=",".join(budget_candidates()),
                   help="codecs each layer's keys and values may use (default: %(default)s)")
    b.add_argument("--slot", choices=("uniform", "mixed"), default="uniform",
                   help="uniform: every layer fits the budget; mixed: the average over layers does (vLLM allocates each layer's own slot, so the average is what it costs)")
    b.add_argument("--prompts", type=_positive, default=1, help="prompts for the sensitivity runs (default 1)")
    b.add_argument("--prompt-tokens", type=_positive, default=512, help="tokens per prompt (default 512)")
    b.add_argument("--head-sensitivity", action="store_true",
                   help="also measure each KV head at the cheapest candidate (reported, not used in the choice)")
    b.add_argument("--sensitivity", default=None,
                   help="JSON file of measured sensitivities: read if it exists (same model and candidates), "
                        "else written, so several budgets share one measurement")
    b.add_argument("--sink-tokens", type=int, default=1,
                   help="attention-sink tokens kept at bf16 per block (default 1; 0: none); their area counts in "
                        "the budget at --block-size")
    b.add_argument("--block-size", type=_positive, default=256,
                   help="the cache's block size, which sizes the sink area (default 256: the plugin serves "
                        "configs with sinks in 256-token blocks unless vLLM gets --block-size)")
    b.add_argument("--exact-self", action=argparse.BooleanOptionalAction, default=True,
                   help="each query attends its own token at full precision (exact_self; no cache bytes; "
                        "default on)")
    b.add_argument("--config-out", default=None, help="the YAML to write (default: --out with .yaml)")
    b.add_argument("--name", default=None, help="config name (default: the YAML's file stem)")
    p.set_defaults(run=run)
    return p


def budget_candidates() -> tuple[str, ...]:
    from vllm_kvq.budget import DEFAULT_CANDIDATES

    return DEFAULT_CANDIDATES


def run(args) -> int:
    import torch

    from vllm_kvq import calibration, config, fake_quant
    from vllm_kvq.eval.data import load_text

    def say(msg):
        print(f"[calibrate] {msg}", file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    say(f"loading {args.model}")
    if args.budget is not None:  # fail before the slow part
        from vllm_kvq import budget as _budget

        if not 0 <= args.sink_tokens <= 16 or args.sink_tokens > args.block_size:
            raise SystemExit(f"--sink-tokens must be in 0..16 and at most --block-size, got {args.sink_tokens}")

        cands = [c for c in args.candidates.split(",") if c]
        unknown = [c for c in cands if c not in _budget.codecs.names()]
        if not cands or unknown:
            raise SystemExit(f"--candidates: unknown codecs {unknown or '(none given)'}; registered: "
                             f"{', '.join(_budget.codecs.names())}")
    # the fake-quant attention is plain eager attention until a quantizer is set: the statistics are the same
    tok, model = fake_quant.load_model(args.model)
    all_ids = tok(load_text(args.text))["input_ids"]
    ids = all_ids[:args.tokens]
    if len(ids) < args.tokens:
        say(f"warning: {args.text} has only {len(ids)} tokens")
    centre = args.key_centre
    if centre == "auto":
        centre = "rope" if calibration.rope_frequencies(model.config, 2) else "fixed"
    if centre == "rope" and args.rope_horizon is not None:
        raise SystemExit("--rope-horizon applies to --key-centre fixed only")
    horizon = args.rope_horizon
    if horizon is None:
        horizon = min(getattr(model.config, "max_position_embeddings", None) or DEFAULT_ROPE_HORIZON,
                      DEFAULT_ROPE_HORIZON)
    say(f"key centring: {centre}" + (" (the mean follows RoPE positions)" if centre == "rope" else ""))
    try:
        stats = calibration.compute(model, torch.tensor(ids), skip_first=args.skip_first,
                                    rope_horizon=(horizon or None) if centre == "fixed" else None,
                                    key_centre=centre, smooth_alpha=args.smooth_alpha,
                                    smooth_queries=args.smooth_queries, progress=say)
    except ValueError as e:
        raise SystemExit(f"calibrate: {e}") from None
    meta = dict(stats.metadata, model=str(Path(args.model).name), text=args.text)
    stats = dataclasses.replace(stats, metadata=tuple(sorted(meta.items())))
    out = Path(args.out) if args.out else config.model_calibration_path(args.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats.save(out)
    L, H, D = stats.shape
    say(f"wrote {out} ({out.stat().st_size} B): mu_k, mu_v, k_smooth of shape ({L}, {H}, {D}) "
        f"in {time.time() - t0:.1f}s")
    print(out)
    if args.budget is not None:
        return _allocate(args, model, all_ids, stats, out, cands, say)
    return 0


def _allocate(args, model, all_ids, stats, calib_path: Path, cands: list[str], say) -> int:
    import yaml

    from vllm_kvq import budget, config

    L, H, D = stats.shape
    target = budget.budget_bytes(args.budget, D)
    need = args.prompts * args.prompt_tokens
    rest = all_ids[args.tokens:] if len(all_ids) - args.tokens >= need else all_ids
    if len(rest) < need:
        raise SystemExit(f"{args.text} has {len(all_ids)} tokens, fewer than --prompts x --prompt-tokens = {need}")
    prompts = [rest[i * args.prompt_tokens:(i + 1) * args.prompt_tokens] for i in range(args.prompts)]
    smooth = args.smooth_alpha > 0
    say(f"sensitivity: {L} layers x K/V x {len(cands)} codecs on {args.prompts} x {args.prompt_tokens} tokens")
    cache = Path(args.sensitivity) if args.sensitivity else None
    recipe = budget.recipe_of(args.sink_tokens, args.block_size, args.exact_self)
    try:
        sens = budget.load_sensitivity(cache, cands, L, recipe) if cache and cache.exists() else None
    except ValueError as e:
        raise SystemExit(f"--sensitivity: {e}") from None
    if sens is None:
        sens = budget.measure(model, prompts, num_layers=L, num_kv_heads=H, head_dim=D, calibration_stats=stats,
                              smooth_keys=smooth, candidates=cands, head_sensitivity=args.head_sensitivity,
                              sink_tokens=args.sink_tokens, block_size=args.block_size, exact_self=args.exact_self)
        if cache:
            budget.save_sensitivity(sens, cache)
    else:
        say(f"sensitivities from {cache}")
    try:
        choice = budget.choose(sens, target, args.slot,
                               overhead=budget.sink_area_bytes(args.sink_tokens, D, args.block_size))
    except ValueError as e:
        raise SystemExit(f"--budget {args.budget:g}: {e}") from None
    cfg_path = Path(args.config_out or calib_path.with_suffix(".yaml"))
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    rel = calib_path.resolve()
    try:
        rel = rel.relative_to(cfg_path.parent.resolve())
    except ValueError:
        pass
    data = budget.to_yaml_dict(choice, name=args.name or cfg_path.stem, calibration_file=str(rel),
                               smooth_keys=smooth, budget_bits=args.budget, head_dim=D,
                               sink_tokens=args.sink_tokens, exact_self=args.exact_self)
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    config.load(cfg_path)  # what we wrote must load, with its calibration file
    print(f"\nKL per layer (nats/token, only that layer's K or V quantized; bf16 elsewhere):")
    print(budget.table(sens, choice))
    for line in budget.explain(choice, D):
        print(line)
    print(f"wrote {cfg_path}")
    return 0

"""``vllm-kvq config show FILE|PRESET [--layers N --kv-heads H --head-size D | --model DIR] [--block-size T]`` and
``config list``."""

from __future__ import annotations

import argparse
import sys

from vllm_kvq import config as _config
from vllm_kvq.kv_format import formats_from_config


def _positive(text: str) -> int:
    n = int(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return n


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_)
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved per-layer, per-head table")
    show.add_argument("config", help="a preset name (see `config list`) or a YAML file")
    show.add_argument("--layers", type=_positive, default=32, help="number of attention layers (default 32)")
    show.add_argument("--kv-heads", type=_positive, default=8, help="KV heads per layer (default 8)")
    show.add_argument("--head-size", type=_positive, default=128, help="head size (default 128)")
    show.add_argument("--layout", action="store_true", help="also print each distinct slot layout")
    show.add_argument("--model", default=None,
                      help="a local model directory: its shape (instead of --layers/--kv-heads/--head-size) and, "
                           "for `calibration: model` configs, its calibration")
    show.add_argument("--block-size", type=_positive, default=None,
                      help="tokens per cache block, which sizes the sink area (default: the plugin's for configs "
                           "with sinks, 256)")
    show.set_defaults(run=run_show)
    lst = csub.add_parser("list", help="list the presets")
    lst.set_defaults(run=run_list)
    return p


def run_list(args) -> int:
    for name in _config.preset_names():
        cfg = _config.load(name)
        print(f"{name:<20} {cfg.description}")
    return 0


def show(cfg: _config.KVQConfig, layers: int, kv_heads: int, head_size: int, layout: bool = False,
         model: str | None = None, block_size: int | None = None) -> str:
    if block_size is None and cfg.sink_tokens:
        from vllm_kvq.vllm.formats import preferred_block_size

        block_size = preferred_block_size(cfg)  # what the plugin serves it in without --block-size
    fmts = formats_from_config(cfg, num_layers=layers, num_kv_heads=kv_heads, head_size=head_size,
                               block_size=block_size, model=model)
    out = [f"config {cfg.name!r}: {cfg.description}".rstrip(": "),
           f"model shape: {layers} layers x {kv_heads} KV heads x head_size {head_size}, seed {cfg.seed}"]
    if cfg.calibration is not None:
        path = (_config.model_calibration_path(model) if cfg.calibration == _config.MODEL_CALIBRATION and model
                else cfg.calibration)
        centre = ("keys centred by a mean that follows each key's RoPE position" if fmts[0].key_rope
                  else "keys centred by a fixed mean")
        out.append(f"calibration: {path}: {centre}, values centred"
                   + (", key channels smoothed" if cfg.smooth_keys else ""))
    if cfg.sink_tokens:
        out.append(f"sinks: the first {cfg.sink_tokens} token(s) of every block at bf16 ({fmts[0].sink_bytes} B per "
                   f"slot at {block_size}-token blocks)")
    if cfg.exact_self:
        out.append("exact_self: each query attends its own token with the step's exact key and value (no cache bytes)")
    out.append("")
    # The resolved specs, not codec.name: a preset with a changed parameter keeps its codec name
    # ("turboquant3" with scale_mode=norm), and the table must show what will actually run.
    table = _config.resolve(cfg, layers, kv_heads)
    names = [[tuple(str(s).replace(", ", ",") for s in pair) for pair in row] for row in table]
    w = max(22, *(len(n) for row in names for pair in row for n in pair))
    out.append(f"{'layer':>5}  {'head':>4}  {'key':<{w}} {'value':<{w}} {'K+V B':>6}  {'slot B':>6}")
    for layer, f in enumerate(fmts):
        for h in range(kv_heads):
            k, v = f.keys[h], f.values[h]
            kn, vn = names[layer][h]
            out.append(f"{layer:>5}  {h:>4}  {kn:<{w}} {vn:<{w}} {k.nbytes + v.nbytes:>6}  {f.slot_bytes:>6}")
    total = sum(f.bytes_per_token() for f in fmts)
    bf16 = layers * kv_heads * 2 * head_size * 2
    out += ["", f"bytes per token (all layers, K+V, padding included): {total}  (bf16: {bf16})",
            f"compression vs bf16: {bf16 / total:.2f}x"]
    if len({f.slot_bytes for f in fmts}) > 1:
        pad = max(f.slot_bytes for f in fmts) * kv_heads * layers
        out.append(f"vLLM allocates each layer's own slot (the bytes above); every layer padded to the largest slot "
                   f"(VLLM_KVQ_PADDED_SLOTS=1) would be {pad} B/token, {bf16 / pad:.2f}x")
    if layout:
        seen = set()
        for f in fmts:
            text = f.describe().split("\n", 1)[1]
            if text not in seen:
                seen.add(text)
                out += ["", f.describe()]
    return "\n".join(out)


def run_show(args) -> int:
    try:
        cfg = _config.load(args.config)
        layers, kv_heads, head_size = args.layers, args.kv_heads, args.head_size
        if args.model:
            from vllm_kvq.eval.sweep import model_shape

            s = model_shape(args.model)
            layers, kv_heads, head_size = s["layers"], s["kv_heads"], s["head_dim"]
        print(show(cfg, layers, kv_heads, head_size, args.layout, model=args.model, block_size=args.block_size))
    except (_config.ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

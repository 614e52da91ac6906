"""The ``vllm-kvq`` command. Each sub-command lives beside what it drives and is imported lazily, so
``vllm-kvq config show`` does not pay for importing vLLM."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module with add_parser(subparsers) and run(args), one-line help)
COMMANDS = {
    "config": ("vllm_kvq.config.cli", "inspect YAML configs: resolved per-layer/head table, bytes, compression"),
    "model": ("vllm_kvq.eval.models", "prepare models offline (the SmolLM2-135M demo model)"),
    "eval": ("vllm_kvq.eval.cli", "measure quality through a running OpenAI-compatible server"),
    "calibrate": ("vllm_kvq.calibration_cli", "compute the K/V means and key scales for a config's calibration:"),
    "serve-demo": ("vllm_kvq.vllm.serve_demo", "prepare the demo model and run `vllm serve` with a quantized cache"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-kvq", description="Quantized KV caches for vLLM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the command asked for (help lists them all).
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_) in COMMANDS.items():
        if wanted in (None, name):
            try:
                importlib.import_module(module).add_parser(sub, name, help_)
            except ImportError as e:
                if wanted == name:
                    raise
                sub.add_parser(name, help=f"{help_} (unavailable: {e})")
        else:
            sub.add_parser(name, help=help_)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

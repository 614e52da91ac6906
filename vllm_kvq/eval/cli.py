"""``vllm-kvq eval ppl|needle|greedy|lmeval|sweep|report|codecs``: quality through a running server, and at codec level."""

from __future__ import annotations

import argparse
import importlib

# action -> (module with add_arguments(parser) and run(args), help)
ACTIONS = {
    "ppl": ("vllm_kvq.eval.ppl", "perplexity over sliding windows via prompt logprobs"),
    "needle": ("vllm_kvq.eval.needle", "passkey retrieval through greedy generation, per length and depth"),
    "greedy": ("vllm_kvq.eval.greedy", "greedy continuations; agreement and first divergence vs a reference run"),
    "lmeval": ("vllm_kvq.eval.lmeval", "the packaged lm-eval tasks (offline Shakespeare) against a server"),
    "sweep": ("vllm_kvq.eval.sweep", "serve each --kv-cache-dtype in turn, run ppl + needle + lm-eval, "
                                     "write a Markdown table and a frontier plot"),
    "report": ("vllm_kvq.eval.report", "one table, goal check and frontier plot from several sweep dirs"),
    "codecs": ("vllm_kvq.eval.codec_report", "attention error of every codec on SmolLM2's real K/V vs theory"),
}


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_)
    esub = p.add_subparsers(dest="eval_command", required=True, metavar="ACTION")
    for action, (module, ahelp) in ACTIONS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as e:  # e.g. matplotlib missing: the other actions still work
            esub.add_parser(action, help=f"{ahelp} (unavailable: {e})")
            continue
        ap = esub.add_parser(action, help=ahelp, description=(mod.__doc__ or "").strip().split("\n\n")[0],
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(ap)
        ap.set_defaults(run=mod.run)
    return p

"""``vllm-kvq serve-demo``: prepare the demo model (SmolLM2-135M-Instruct, offline) and run the real
``vllm serve`` on it with a quantized KV cache. What ``make serve`` runs."""

from __future__ import annotations

import os
import shutil
import sys

from vllm_kvq.vllm.dtypes import KVQ_DTYPES


def add_parser(sub, name, help_):
    p = sub.add_parser(name, help=help_, description=help_ + ". Arguments after -- go to `vllm serve` as they are.")
    p.add_argument("--kv-cache-dtype", default="turboquant3",
                   help=f"one of {', '.join(KVQ_DTYPES)}, or any dtype vLLM knows (default turboquant3)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--served-model-name", default="smollm2")
    p.add_argument("--compile", action="store_true",
                   help="let vLLM torch.compile the model (on CPU the default is eager: start-up in seconds, not minutes)")
    p.add_argument("vllm_args", nargs="*", help="extra `vllm serve` arguments (after --)")
    p.set_defaults(run=run)
    return p


def command(args, model_path: str) -> list[str]:
    vllm_bin = shutil.which("vllm", path=os.path.dirname(sys.executable)) or shutil.which("vllm") or "vllm"
    cmd = [vllm_bin, "serve", model_path, "--kv-cache-dtype", args.kv_cache_dtype, "--host", args.host,
           "--port", str(args.port), "--max-model-len", str(args.max_model_len),
           "--served-model-name", args.served_model_name, "--enable-prefix-caching", "--enable-chunked-prefill",
           "--dtype", "bfloat16"]
    if not any(a.startswith("--gpu-memory-utilization") or a.startswith("--kv-cache-memory") for a in args.vllm_args):
        try:
            import torch

            on_gpu = torch.cuda.is_available()
        except ImportError:
            on_gpu = False
        if not on_gpu:
            # On CPU this flag is the share of host memory vLLM reserves; its 0.92 default fails on a
            # machine that runs anything else.
            cmd += ["--gpu-memory-utilization", "0.3"]
        if not on_gpu and not args.compile and "--enforce-eager" not in args.vllm_args:
            cmd.append("--enforce-eager")
    return cmd + list(args.vllm_args)


def run(args) -> int:
    from vllm_kvq.eval.models import prepare_smollm2

    model = str(prepare_smollm2())
    cmd = command(args, model)
    print("+ " + " ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached

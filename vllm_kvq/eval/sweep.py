"""Serve each KV-cache dtype in turn and measure it: perplexity and KL, greedy agreement, needle, lm-eval.

    vllm-kvq eval sweep --dtypes auto,fp8,turboquant4,turboquant3.5,turboquant3,turboquant2.5,turboquant2 \\
        [--configs my.yaml,...] [--model DIR] --out-dir sweep/

For every entry ``vllm serve`` starts on 127.0.0.1 at a free port with the same KV byte budget, is measured,
and is stopped. Perplexity requests also record each position's top-k next tokens (``--top-k``), so the table
shows the KL divergence against the ``auto`` (bf16) entry; greedy continuations of ``--greedy-prompts``
prompts are compared token by token with the ``auto`` entry's. An entry whose server does not start (fp8 on vLLM-CPU, say) is recorded with its error and
the sweep goes on. Each entry's JSON is written as soon as it is measured, so ``--resume`` skips finished
ones. At the end: ``sweep.md`` (table + goal check) and ``frontier.png``.

Bytes per token: for our dtypes, the sum over layers of slot bytes x KV heads from vllm_kvq.kv_format (each
layer at its own slot, as the adapter gives vLLM one page size per layer); bf16 2 x 2 x head_dim x kv_heads x layers;
fp8 half of that.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from pathlib import Path

from vllm_kvq.eval import report
from vllm_kvq.eval.server import ServerError, VllmServer

DEFAULT_DTYPES = "auto,fp8,turboquant4,turboquant3.5,turboquant3,turboquant2.5,turboquant2"


def model_shape(model_dir: str | Path) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return {"layers": cfg["num_hidden_layers"], "kv_heads": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]}


def default_block_size() -> int:
    """The block size vLLM picks when none is given: 128 tokens on its CPU platform, 16 on GPUs."""
    import torch

    return 16 if torch.cuda.is_available() else 128


def default_max_model_len(context: int, needle_lengths=()) -> int:
    """The longest request the sweep sends (context + 1, needle prompts + 16), rounded up to a multiple of 256:
    vLLM's logged capacity is whole blocks per max-length request, so a length just past a block multiple
    (2049 = 2048 + 1) would charge 128-token blocks 6 % and 256-token ones 11 % of waste; a multiple of 256
    charges neither, and the capacity column compares the formats' bytes."""
    need = max([context + 1, *[n + 16 for n in needle_lengths]])
    return -(-need // 256) * 256


def bytes_per_token(dtype: str, model_dir: str | Path, config: str | None = None, block_size: int | None = None) -> int:
    """KV cache bytes per token, all layers, K and V, as vLLM allocates them (``block_size`` sizes the sink area
    of configs with ``sink_tokens``; default: the block size the plugin serves them in, 256 tokens, else
    vLLM's for this machine)."""
    s = model_shape(model_dir)
    full = 2 * s["head_dim"] * s["kv_heads"] * s["layers"]  # elements per token, K and V
    if dtype in ("auto", "bfloat16", "float16", "half"):
        return 2 * full
    if dtype.startswith("fp8"):
        return full
    from vllm_kvq import config as _config
    from vllm_kvq.kv_format import formats_from_config
    from vllm_kvq.vllm.dtypes import config_for_dtype

    from vllm_kvq.vllm.formats import preferred_block_size

    cfg = _config.load(config) if config else config_for_dtype(dtype)
    block_size = block_size or preferred_block_size(cfg) or default_block_size()
    fmts = formats_from_config(cfg, num_layers=s["layers"], num_kv_heads=s["kv_heads"], head_size=s["head_dim"],
                               block_size=block_size, model=str(model_dir))
    return sum(f.bytes_per_token() for f in fmts)


def kv_cache_tokens(log: str) -> int | None:
    """Tokens of KV cache vLLM allocated, from its start-up log ('... KV cache size: 23,296 tokens')."""
    m = re.findall(r"KV cache size: ([\d,]+) tokens", log)
    return int(m[-1].replace(",", "")) if m else None


def evaluate(base_url: str, *, context: int, ppl_text: str, ppl_windows: int | None, needle_lengths: list[int],
             needle_depths, lmeval_tasks: list[str], lmeval_limit: int | None, log_dir: Path, label: str,
             tokenizer: str, top_k: int = 20, greedy_prompts: int = 0, greedy_gen: int = 256) -> dict:
    from vllm_kvq.eval.greedy import run_greedy
    from vllm_kvq.eval.lmeval import run_lmeval
    from vllm_kvq.eval.needle import run_needle
    from vllm_kvq.eval.ppl import run_ppl

    out: dict = {}
    if ppl_windows != 0:
        out["ppl"] = run_ppl(base_url, ppl_text, context=context, max_windows=ppl_windows, top_k=top_k).to_json()
    if greedy_prompts:
        out["greedy"] = run_greedy(base_url, ppl_text, prompts=greedy_prompts, prompt_len=context - greedy_gen,
                                   gen=greedy_gen)
    if needle_lengths:
        out["needle"] = run_needle(base_url, needle_lengths, depths=needle_depths)
    if lmeval_tasks:
        out["lmeval"] = run_lmeval(base_url, tokenizer=tokenizer, tasks=lmeval_tasks, limit=lmeval_limit,
                                   max_length=context, output_path=log_dir / f"lmeval-{label}")
    return out


def run_sweep(model_dir: str | Path, entries: list[tuple[str, str, str | None]], out_dir: str | Path, *,
              context: int = 2048, ppl_text: str = "shakespeare:hamlet", ppl_windows: int | None = 3,
              needle_lengths: list[int] = (1024, 2048, 4096), needle_depths=(0.1, 0.5, 0.9),
              lmeval_tasks=("kvq_shakespeare_ppl", "kvq_shakespeare_mc"), lmeval_limit: int | None = 20,
              max_model_len: int | None = None, kv_cache_memory_bytes: int = 512 << 20, resume: bool = False,
              startup_timeout: float = 420.0, top_k: int = 20, greedy_prompts: int = 4,
              greedy_gen: int = 256) -> list[dict]:
    """``entries``: (label, kv_cache_dtype, YAML config path or None). Returns the results and writes
    ``<label>.json`` per entry, ``sweep.md`` and ``frontier.png`` under ``out_dir``."""
    out_dir = Path(out_dir)
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if greedy_prompts and not 0 < greedy_gen < context:
        raise ValueError(f"greedy_gen must be in 1..context-1 ({context - 1}): the prompt is context - greedy_gen tokens")
    max_model_len = max_model_len or default_max_model_len(context, needle_lengths)
    results = []
    for i, (label, dtype, config) in enumerate(entries):
        path = out_dir / f"{label}.json"
        if resume and path.is_file():
            results.append(json.loads(path.read_text()))
            print(f"[{i + 1}/{len(entries)}] {label}: cached in {path}", file=sys.stderr)
            continue
        print(f"[{i + 1}/{len(entries)}] {label}: serving --kv-cache-dtype {dtype}", file=sys.stderr)
        res: dict = {"label": label, "dtype": dtype, "config": config, "error": None}
        try:
            res["bytes_per_token"] = bytes_per_token(dtype, model_dir, config)
        except Exception as e:  # an unknown dtype still gets served, so vLLM's own message is recorded
            res["bytes_per_token"] = None
            res["note"] = f"bytes unknown: {e}"
        extra = ["--additional-config", json.dumps({"kvq_config": str(config)})] if config else []
        srv = VllmServer(model_dir, kv_cache_dtype=dtype, max_model_len=max_model_len, served_model_name="model",
                         kv_cache_memory_bytes=kv_cache_memory_bytes, extra_args=extra,
                         startup_timeout=startup_timeout, log_path=logs / f"server-{label}.log")
        t0 = time.monotonic()
        try:
            srv.start()
        except ServerError as e:
            res["error"] = "server failed to start: " + _server_error_line(str(e))
            print(f"  {label}: {res['error']}", file=sys.stderr)
        else:
            try:
                res["startup_s"] = srv.startup_s
                res["kv_cache_tokens"] = kv_cache_tokens(srv.log_text())
                res.update(evaluate(srv.base_url, context=context, ppl_text=ppl_text, ppl_windows=ppl_windows,
                                    needle_lengths=list(needle_lengths), needle_depths=needle_depths,
                                    lmeval_tasks=list(lmeval_tasks), lmeval_limit=lmeval_limit, log_dir=logs,
                                    label=label, tokenizer=str(model_dir), top_k=top_k,
                                    greedy_prompts=greedy_prompts, greedy_gen=greedy_gen))
            except Exception as e:  # keep the sweep going; the table shows what broke
                res["error"] = f"{type(e).__name__}: {e}"
                print(f"  {label}: {res['error'][:500]}", file=sys.stderr)
            finally:
                srv.stop()
        res["elapsed_s"] = time.monotonic() - t0
        path.write_text(json.dumps(res, indent=1) + "\n")
        results.append(res)
    write_outputs(results, out_dir, model=str(model_dir), context=context)
    return results


def _server_error_line(text: str) -> str:
    """The most telling line of a failed start-up log: the last exception message."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\b\w*(error|exception)\s*:", ln, flags=re.I) and "Traceback" not in ln:
            return re.sub(r"^\(\w+ pid=\d+\)\s*", "", ln)[:300]
    return lines[0][:300] if lines else "unknown error"


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}"


def write_outputs(results: list[dict], out_dir: str | Path, *, model: str = "", context: int | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.plot_frontier(results, out_dir / "frontier.png",
                         title=f"{Path(model).name}: KV cache memory vs fidelity (context {context})")
    md = [f"# KV cache sweep: {Path(model).name}", "",
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine()}; context {context}.", "",
          report.markdown_table(results), "", "Goals:", "", *report.goal_check(results), "",
          "![frontier](frontier.png)", ""]
    path = out_dir / "sweep.md"
    path.write_text("\n".join(md))
    return path


def parse_entries(dtypes: str, configs: str | None) -> list[tuple[str, str, str | None]]:
    entries = [(d, d, None) for d in dtypes.split(",") if d]
    for c in (configs or "").split(","):
        if c:
            entries.append((Path(c).stem, "kvq", c))
    labels = [e[0] for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate sweep entries: {labels}")
    return entries


def add_arguments(p) -> None:
    from vllm_kvq.eval.needle import parse_lengths

    p.add_argument("--dtypes", default=DEFAULT_DTYPES, help=f"--kv-cache-dtype values (default {DEFAULT_DTYPES})")
    p.add_argument("--configs", default=None, help="YAML configs, each served as --kv-cache-dtype kvq")
    p.add_argument("--model", default=None, help="model dir (default: the SmolLM2 demo model, prepared if needed)")
    p.add_argument("--out-dir", default="kvq-sweep")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--text", default="shakespeare:hamlet")
    p.add_argument("--ppl-windows", type=int, default=3, help="perplexity windows per dtype (0: skip)")
    p.add_argument("--top-k", type=int, default=20,
                   help="next-token candidates recorded per scored position for the KL column (0: no KL; at most 20, "
                        "vLLM's default --max-logprobs)")
    p.add_argument("--greedy-prompts", type=int, default=4, help="prompts continued greedily (0: skip)")
    p.add_argument("--greedy-gen", type=int, default=256,
                   help="tokens generated per prompt; each prompt is context - this long (default 256)")
    p.add_argument("--needle-lengths", type=lambda s: parse_lengths(s) if s.strip() else [], default=[1024, 2048, 4096],
                   help="needle prompt lengths ('' to skip; default 1k,2k,4k)")
    p.add_argument("--needle-depths", default="0.1,0.5,0.9")
    p.add_argument("--lmeval-tasks", default="kvq_shakespeare_ppl,kvq_shakespeare_mc", help="'' to skip")
    p.add_argument("--lmeval-limit", type=int, default=20, help="documents per lm-eval task")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=512 << 20)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="reuse <out-dir>/<label>.json of finished entries")


def run(args) -> int:
    model = args.model
    if model is None:
        from vllm_kvq.eval.models import prepare_smollm2

        model = str(prepare_smollm2())
    results = run_sweep(model, parse_entries(args.dtypes, args.configs), args.out_dir, context=args.context,
                        ppl_text=args.text, ppl_windows=args.ppl_windows, needle_lengths=args.needle_lengths,
                        needle_depths=[float(d) for d in args.needle_depths.split(",") if d],
                        lmeval_tasks=[t for t in args.lmeval_tasks.split(",") if t], lmeval_limit=args.lmeval_limit,
                        max_model_len=args.max_model_len, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                        resume=args.resume, top_k=args.top_k, greedy_prompts=args.greedy_prompts,
                        greedy_gen=args.greedy_gen)
    print((Path(args.out_dir) / "sweep.md").read_text())
    return 0 if any(not r.get("error") for r in results) else 1

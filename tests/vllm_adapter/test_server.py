"""The product as a user runs it: `vllm-kvq serve-demo` (what `make serve` runs: the real `vllm serve` on
SmolLM2-135M with a turboquant3 cache, prefix caching and chunked prefill on), used over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

START_TIMEOUT = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _stream(url: str, body: dict, timeout: float = 600) -> tuple[str, str | None]:
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    text, finish = [], None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = json.loads(line[5:])["choices"][0]
            text.append(choice.get("text", ""))
            finish = choice.get("finish_reason") or finish
    return "".join(text), finish


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "vllm_kvq.cli", "serve-demo", "--port", str(port), "--max-model-len", "2048",
           "--", "--max-num-batched-tokens", "128", "--max-num-seqs", "16"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.time() > deadline:
                    pytest.fail(f"server not ready after {START_TIMEOUT}s:\n{log.read_text()[-4000:]}")
                time.sleep(2)
        yield base, proc, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_served_with_our_cache(server):
    base, _, log = server
    text = log.read_text()
    assert "--kv-cache-dtype turboquant3" in text
    assert "vllm_kvq: turboquant3 -> 30 layers, slot 52 B" in text  # our backend resolved the format
    models = json.loads(urllib.request.urlopen(base + "/v1/models").read())
    assert [m["id"] for m in models["data"]] == ["smollm2"]


def test_completion_and_chat(server):
    base, _, _ = server
    # The answer is in the prompt: the completion must read it back from the quantized cache. (The bare
    # question "The capital of France is" is a near-tie for this 135M model at 3 bits: the bf16 cache says
    # Paris, turboquant3 "the Palace ...", with the code of 2026-11-23 as well as today's.)
    out = _post(base + "/v1/completions", {"model": "smollm2", "max_tokens": 8, "temperature": 0,
                                           "prompt": "Paris is the capital of France. Q: What is the capital of "
                                                     "France? A: The capital of France is"})
    assert "Paris" in out["choices"][0]["text"]
    chat = _post(base + "/v1/chat/completions", {"model": "smollm2", "max_tokens": 24, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert "Paris" in chat["choices"][0]["message"]["content"]


def test_sixteen_concurrent_streams(server):
    base, proc, _ = server
    shared = ("You are a helpful assistant. Answer briefly and in plain English. " * 8)  # a prefix to cache
    topics = ["the sea", "a cat", "the moon", "bread", "winter", "a river", "music", "trees",
              "a city", "the sun", "rain", "a horse", "books", "the night", "a garden", "mountains"]
    results: dict[int, tuple[str, str | None]] = {}
    errors: list[BaseException] = []

    def one(i):
        try:
            # min_tokens: greedy SmolLM2 may end such a prompt at once with EOS (vLLM's own bf16 cache does for
            # "the sea" offline, and which of the 16 does moves with any rounding change, as 3-bit codes turn
            # one bf16 ulp into different codes): an empty stream would say nothing about the streams.
            results[i] = _stream(base + "/v1/completions", {"model": "smollm2", "max_tokens": 16, "min_tokens": 8,
                                                            "temperature": 0,
                                                            "prompt": f"{shared}Write one sentence about {topics[i]}:"})
        except BaseException as e:  # collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(900)
    assert not errors, errors
    assert len(results) == 16
    words = 0
    for i, (text, finish) in results.items():
        assert finish in ("length", "stop"), (i, finish)
        assert text.strip() and all(c.isprintable() or c.isspace() for c in text) and any(c.isalpha() for c in text), (i, text)
        words += sum(w.strip('.,;:!?"\'').isalpha() for w in text.split())
    assert words >= 3 * 16, [t for t, _ in results.values()]  # real words, not empty or garbage streams
    assert proc.poll() is None


def test_bad_request_does_not_take_the_server_down(server):
    base, proc, _ = server
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(base + "/v1/completions", {"model": "smollm2", "prompt": "hi " * 5000, "max_tokens": 4})
    assert e.value.code == 400
    assert proc.poll() is None
    urllib.request.urlopen(base + "/health", timeout=10)

# The commands the README shows. Each installs what is missing first (scripts/setup_env.sh is idempotent).
PY := .venv/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
DTYPE ?= turboquant3
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast bench clean

setup:
	bash scripts/setup_env.sh

serve: setup
	$(PY) -m vllm_kvq.cli serve-demo --host $(HOST) --port $(PORT) --kv-cache-dtype $(DTYPE)

test: setup
	$(PY) -m pytest -q -ra --durations=25 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# GPU: decode and store against bf16 SDPA/FlashInfer at real shapes; CPU: a smoke run under the Triton interpreter.
BENCH_FLAGS = $(shell $(PY) -c "import torch; print('' if torch.cuda.is_available() else '--smoke')" 2>/dev/null)
bench: setup
	$(PY) benchmarks/bench_decode.py $(BENCH_FLAGS)
	$(PY) benchmarks/bench_store.py $(BENCH_FLAGS)

clean:
	rm -rf build *.egg-info .pytest_cache

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
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_codecs.py

clean:
	rm -rf build *.egg-info .pytest_cache

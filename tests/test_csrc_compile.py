"""Compile checks of csrc/ where nothing CUDA can run: the framework-agnostic kernels with plain nvcc, the torch
binding's syntax against the installed torch headers, and the contract between the two sides."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
BINDING = CUDA_DIR / "torch_bindings.cpp"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
AGNOSTIC = sorted(p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h"))


def _nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 "/usr/local/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def test_there_are_kernel_sources():
    assert KERNEL_SOURCES, "csrc/cuda has no .cu files"
    assert BINDING.exists()


@pytest.mark.parametrize("path", AGNOSTIC, ids=lambda p: p.name)
def test_kernel_files_are_framework_agnostic(path):
    text = path.read_text()
    bad = re.findall(r'#include\s*[<"]((?:torch|ATen|c10|pybind11|Python)[^>"]*)[>"]', text)
    assert not bad, f"{path.name} includes framework headers {bad}; only torch_bindings.cpp may"


@pytest.mark.parametrize("src", KERNEL_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles_kernels(src, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-std=c++17", "-arch=sm_90", "-O3", "-Xptxas", "-v", "-c", str(src), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    # A kernel that spills registers to local memory is a performance bug, not a style issue.
    spills = [ln for ln in res.stderr.splitlines() if re.search(r"[1-9]\d* bytes spill (stores|loads)", ln)]
    assert not spills, "\n".join(spills)
    warnings = [ln for ln in res.stderr.splitlines() if "warning" in ln and "csrc" in ln]
    assert not warnings, "\n".join(warnings)


def _torch_include() -> Path | None:
    try:
        import torch
    except ImportError:
        return None
    inc = Path(torch.__file__).parent / "include"
    return inc if (inc / "c10" / "cuda" / "CUDAStream.h").exists() else None


@pytest.mark.slow
def test_torch_binding_syntax(tmp_path):
    """The binding cannot be built against CPU torch, but its syntax and the torch API it calls can be checked:
    CPU wheels ship the c10/cuda headers, minus one generated file that an empty stub replaces."""
    inc, gxx = _torch_include(), shutil.which("g++")
    cuda_inc = next((Path(p) for p in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"),
                                        "/usr/local/cuda/include") if Path(p, "cuda_runtime_api.h").exists()), None)
    if inc is None or gxx is None or cuda_inc is None:
        pytest.skip("needs torch headers with c10/cuda, g++ and the CUDA runtime headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not (inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [gxx, "-std=c++20", "-fsyntax-only", f"-I{tmp_path}", f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}",
           f"-I{cuda_inc}", f"-I{sysconfig.get_paths()['include']}", f"-I{CUDA_DIR}", str(BINDING)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


def test_binding_schema_matches_python_caller():
    """The op schemas in the binding take the arguments vllm_kvq/kernels/cuda.py passes, in that order."""
    text = BINDING.read_text()
    caller = (ROOT / "vllm_kvq" / "kernels" / "cuda.py").read_text()
    for op in ("tq_store", "tq_decode"):
        schema = re.search(rf'"{op}\((.*?)\) -> \(\)"', text.replace('"\n      "', "").replace('" "', ""), re.S)
        assert schema, f"no schema for {op}"
        n_schema = len(schema.group(1).split(","))
        call = re.search(rf"torch\.ops\.vllm_kvq\.{op}\((.*?)\)\n", caller, re.S)
        assert call, f"cuda.py does not call {op}"
        n_call = len([a for a in re.sub(r"\s+", "", call.group(1)).split(",") if a])
        assert n_schema == n_call, f"{op}: schema has {n_schema} arguments, cuda.py passes {n_call}"


def test_codec_spec_order_matches_binding():
    """cuda.py packs [b0, n0, b1, seg1, meta, w, rotate, scale_mode]; the binding unpacks the same order."""
    text = BINDING.read_text()
    fields = re.findall(r"c\.(\w+) = static_cast<int>\(spec\[(\d)\]\)", text)
    assert [f for f, _ in sorted(fields, key=lambda x: int(x[1]))] == \
        ["b0", "n0", "b1", "seg1", "meta", "w", "rotate", "scale_mode"]
    caller = (ROOT / "vllm_kvq" / "kernels" / "cuda.py").read_text()
    assert "[s.b0, s.n0, s.b1, s.seg1, s.meta, s.w, int(s.rot), s.smode]" in caller

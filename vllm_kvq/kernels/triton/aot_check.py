"""Compile the Triton kernels a format needs for a GPU target on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, not whether they compile: it
accepts non-constexpr globals, Python control flow and shapes the GPU compiler rejects. This module runs the
real launchers with CPU tensors, captures each kernel launch instead of running it, and compiles every
captured variant with Triton's NVIDIA backend for the target. Where a ptxas that reads Triton's PTX is
found, it also reports registers and spills (a spill in these kernels is a performance bug).

    python -m vllm_kvq.kernels.triton.aot_check turboquant3 --head-size 128 --kv-heads 8 --q-heads 32
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_kvq.kv_format import KVFormat

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.uint8: "*u8",
        torch.int32: "*i32", torch.int64: "*i64"}
_OPTIONS = ("num_warps", "num_stages")


@dataclass
class Launch:
    kernel: object  # triton.JITFunction
    args: tuple
    kwargs: dict


@dataclass
class Compiled:
    name: str
    shared: int
    registers: int | None
    spill_bytes: int | None


class _Recorder:
    def __init__(self, kernel, out: list):
        self.kernel, self.out = kernel, out

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.out.append(Launch(self.kernel, args, kwargs))


@contextlib.contextmanager
def _recording(out: list):
    mods = [sys.modules["vllm_kvq.kernels.triton.attention"], sys.modules["vllm_kvq.kernels.triton.store"]]
    saved = []
    for m in mods:
        for name in ("_attn_kernel", "_merge_kernel", "_store_kernel"):
            if hasattr(m, name):
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, _Recorder(getattr(m, name), out))
    try:
        yield
    finally:
        for m, name, k in saved:
            setattr(m, name, k)


def capture(fmt: KVFormat, num_q_heads: int, dtype: torch.dtype = torch.bfloat16) -> list[Launch]:
    """The launches of one store, one split-K decode step, one unsplit decode step and one mixed prefill."""
    import vllm_kvq.kernels.triton as kt

    d, hk = fmt.head_size, fmt.num_kv_heads
    t, blocks = 16, 8
    cache = fmt.allocate(blocks, t)
    out: list[Launch] = []
    with _recording(out):
        kv = torch.zeros(4, hk, d, dtype=dtype)
        kt.store(kv, kv, cache, torch.arange(4), fmt)
        bt = torch.zeros(2, 4, dtype=torch.int32)
        for q_lens, splits in (([1, 1], 2), ([1, 1], 1), ([5, 1], None)):
            qsl = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32)
            q = torch.zeros(sum(q_lens), num_q_heads, d, dtype=dtype)
            kt.paged_attention(q, cache, bt, torch.tensor([40, 9], dtype=torch.int32), qsl, fmt, scale=0.1,
                               num_splits=splits)
    return out


def _signature(launch: Launch) -> tuple[dict, dict, dict]:
    params = list(inspect.signature(launch.kernel.fn).parameters)
    sig, consts = {}, {}
    for name, val in zip(params, launch.args):
        if isinstance(val, torch.Tensor):
            sig[name] = _PTR[val.dtype]
        elif isinstance(val, bool):
            sig[name] = "i1"
        elif isinstance(val, int):
            sig[name] = "i32" if -2**31 <= val < 2**31 else "i64"
        elif isinstance(val, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{launch.kernel.fn.__name__}: cannot type argument {name}={val!r}")
    for name, val in launch.kwargs.items():
        if name in _OPTIONS:
            continue
        sig[name] = "constexpr"
        consts[(params.index(name),)] = val
    options = {k: v for k, v in launch.kwargs.items() if k in _OPTIONS}
    return sig, consts, options


def _ptxas() -> str | None:
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for cand in (os.path.join(base, "ptxas-blackwell"), os.path.join(base, "ptxas"), shutil.which("ptxas")):
        if cand and os.path.isfile(cand):
            return cand
    return None


def _registers(ptx: str, arch: str) -> tuple[int | None, int | None]:
    exe = _ptxas()
    if exe is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([exe, "-v", f"-arch={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.findall(r"(\d+) bytes spill (?:stores|loads)", res.stderr)
    if regs is None:
        return None, None
    return int(regs.group(1)), sum(map(int, spill))


def compile_launches(launches: list[Launch], capability: int = 90) -> list[Compiled]:
    target = GPUTarget("cuda", capability, 32)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    seen, out = set(), []
    for launch in launches:
        sig, consts, options = _signature(launch)
        key = (launch.kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())),
               tuple(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        k = triton.compile(ASTSource(launch.kernel, sig, constexprs=consts), target=target, options=options)
        regs, spill = _registers(k.asm["ptx"], arch)
        out.append(Compiled(launch.kernel.fn.__name__, k.metadata.shared, regs, spill))
    return out


def main(argv: list[str] | None = None) -> int:
    from vllm_kvq.kv_format import kv_format

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="codec or preset name, or a YAML config path")
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--capability", type=int, default=90)
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: this compiles the kernels")
    fmt = kv_format(a.spec, a.head_size, a.kv_heads, layer=a.layer, num_layers=a.num_layers)
    bad = 0
    for c in compile_launches(capture(fmt, a.q_heads), a.capability):
        bad += bool(c.spill_bytes)
        print(f"{c.name:<14} shared={c.shared:>6} B  registers={c.registers}  spills={c.spill_bytes} B")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

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
from triton.compiler.compiler import make_backend

from vllm_kvq.kv_format import KVFormat



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
    tile: dict  # the launch's tile sizes, split count and warps (those of TILE_KEYS it has)

    def describe(self) -> str:
        tile = " ".join(f"{k}={v}" for k, v in self.tile.items())
        return (f"{self.name:<14} {tile:<58} shared={self.shared:>6} B  registers={self.registers}  "
                f"spills={self.spill_bytes} B")


TILE_KEYS = ("BQ", "BM", "BN", "NUM_SPLITS", "num_warps", "num_stages")


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
    """The launches of one store, one split-K decode step, one unsplit decode step, one batch of short queries
    (speculative-decoding verification: decode tiles' split-K with prefill tiles) and one chunked prefill,
    each with the arguments ``ops.paged_attention`` adds for the format (the score bias of position-aware key
    centring; ``exclude_self`` and ``lse`` for ``exact_self``)."""
    import vllm_kvq.kernels.triton as kt

    d, hk = fmt.head_size, fmt.num_kv_heads
    t, blocks = 16, 8
    cache = fmt.allocate(blocks, t)
    out: list[Launch] = []
    with _recording(out):
        kv = torch.zeros(4, hk, d, dtype=dtype)
        kt.store(kv, kv, cache, torch.arange(4), fmt)
        bt = torch.zeros(2, 4, dtype=torch.int32)
        for q_lens, splits in (([1, 1], 2), ([1, 1], 1), ([5, 1], 2), ([37, 1], None)):
            qsl = torch.tensor([0, q_lens[0], sum(q_lens)], dtype=torch.int32)
            q = torch.zeros(sum(q_lens), num_q_heads, d, dtype=dtype)
            extra = {}
            if fmt.key_rope is not None:  # position-aware key centring: the score-bias variant
                extra["key_bias"] = (fmt.key_rope.bias_query(q, 0.1), fmt.key_rope.table(bt.shape[1] * t, "cpu"))
            if fmt.exact_self:
                extra.update(exclude_self=True, lse=torch.empty(q.shape[:2]))
            kt.paged_attention(q, cache, bt, torch.tensor([40, 9], dtype=torch.int32), qsl, fmt, scale=0.1,
                               num_splits=splits, **extra)
    return out


def _signature(launch: Launch, backend) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attributes, options) exactly as the JIT would compile this launch on a GPU:
    Triton's own argument binder specializes integers equal to 1 into constants and marks 16-divisible
    integers and 16-aligned pointers, which changes address arithmetic and so the register count."""
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, sig, consts, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return sig, consts, attrs, options.__dict__


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
    backend = make_backend(target)
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    seen, out = set(), []
    for launch in launches:
        sig, consts, attrs, options = _signature(launch, backend)
        key = (launch.kernel.fn.__name__, repr(sorted(sig.items())), repr(sorted(consts.items())),
               repr(sorted(attrs.items())), repr(sorted(options.items())))
        if key in seen:
            continue
        seen.add(key)
        k = triton.compile(ASTSource(launch.kernel, sig, consts, attrs), target=target, options=options)
        regs, spill = _registers(k.asm["ptx"], arch)
        tile = {key: launch.kwargs[key] for key in TILE_KEYS if key in launch.kwargs}
        out.append(Compiled(launch.kernel.fn.__name__, k.metadata.shared, regs, spill, tile))
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
    ap.add_argument("--exact-self", action="store_true",
                    help="compile the exact_self variants (exclude_self, lse), as a format with exact_self runs")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="query and K/V dtype of the captured launches")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: this compiles the kernels")
    fmt = kv_format(a.spec, a.head_size, a.kv_heads, layer=a.layer, num_layers=a.num_layers)
    if a.exact_self:
        fmt.exact_self = True
    bad = 0
    for c in compile_launches(capture(fmt, a.q_heads, getattr(torch, a.dtype)), a.capability):
        bad += bool(c.spill_bytes)
        print(c.describe())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

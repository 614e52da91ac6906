"""Steps of scripts/gpu_check.sh that need Python: a CUDA-graph capture and replay of a decode step (and a
store) through ``vllm_kvq.ops``, outside vLLM, and one small store + decode for compute-sanitizer.

    python scripts/gpu_check_steps.py env        # versions, device, tools; fails when a needed package is missing
    python scripts/gpu_check_steps.py graph      # capture, replay with new queries/lengths, compare to eager
    python scripts/gpu_check_steps.py sanitize   # one small store and decode per implementation and format
    python scripts/gpu_check_steps.py formats    # store + decode of a calibrated, a sink and a FibQuant format
                                                 # per implementation against the reference
    ... --smoke                                  # CPU: Triton interpreter, tiny shapes, no graph (checks the script)

Exits non-zero with a message when a check fails.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys


def _device(smoke: bool):
    import torch

    if torch.cuda.is_available() and not smoke:
        return torch.device("cuda")
    if not smoke:
        sys.exit("no CUDA device (use --smoke on a CPU machine)")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def _case(device, *, batch: int, max_ctx: int, hk: int = 2, group: int = 4, d: int = 64, block: int = 16,
          codec: str = "turboquant4", seed: int = 0):
    """A filled paged cache whose block table is as wide as ``max_ctx`` (vLLM sizes it from max_model_len)."""
    import torch

    from vllm_kvq import codecs, ops
    from vllm_kvq.kv_format import KVFormat

    g = torch.Generator(device="cpu").manual_seed(seed)
    c = codecs.get(codec, head_dim=d)
    fmt = KVFormat(d, [c] * hk, [c] * hk, name=codec)
    width = math.ceil(max_ctx / block)
    table = torch.randperm(batch * width, generator=g).to(torch.int32).reshape(batch, width).to(device)
    cache = fmt.allocate(batch * width, block, device=device)
    n = batch * width * block
    kv = torch.randn(n, hk, d, generator=g).to(device=device, dtype=torch.bfloat16)
    impl = None if device.type == "cuda" else "triton"
    ops.store(kv, kv, cache, torch.arange(n, device=device), fmt, impl=impl)
    q = torch.randn(batch, hk * group, d, generator=g).to(device=device, dtype=torch.bfloat16)
    seq_lens = torch.randint(1, max_ctx + 1, (batch,), generator=g).to(device=device, dtype=torch.int32)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    return fmt, cache, table, q, seq_lens, qsl, impl


def graph(smoke: bool) -> None:
    import torch

    from vllm_kvq import ops

    device = _device(smoke)
    batch, max_ctx = (2, 48) if smoke else (8, 4096)
    fmt, cache, table, q, seq_lens, qsl, impl = _case(device, batch=batch, max_ctx=max_ctx)
    scale = fmt.head_size ** -0.5
    # vLLM's metadata carries max_seq_len as a host int, and a captured graph keeps what it was captured with
    # while replays see longer contexts; so the captured call passes none, as the adapter does while capturing
    # (vllm_kvq/vllm/backend.py: replay_safe_max_seq_len). Captured at short contexts, replayed at long ones.
    seq_lens.fill_(max(1, max_ctx // 8))
    attend = lambda: ops.paged_attention(q, cache, table, seq_lens, qsl, fmt, scale=scale, impl=impl,  # noqa: E731
                                         max_seq_len=None)
    eager_attend = lambda: ops.paged_attention(q, cache, table, seq_lens, qsl, fmt, scale=scale,  # noqa: E731
                                               impl=impl, max_seq_len=int(seq_lens.max()))
    # Store: vLLM captures it too when the KV update is not a splitting op (breakable CUDA graphs).
    k_new = torch.randn(batch, fmt.num_kv_heads, fmt.head_size, device=device, dtype=torch.bfloat16)
    slots = torch.arange(batch, device=device, dtype=torch.int64) * 3
    store = lambda: ops.store(k_new, k_new, cache, slots, fmt, impl=impl)  # noqa: E731
    attend()  # eager warm-up, as vLLM runs before capture: compiles, builds the cached codec tables
    store()
    if device.type == "cuda":
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            attend()
            store()
        torch.cuda.current_stream().wait_stream(side)
        g_attn, g_store = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_attn):
            out_graph = attend()
        with torch.cuda.graph(g_store):
            store()
        replay_attn, replay_store = g_attn.replay, g_store.replay
    else:  # no graphs on CPU: the smoke run checks the script's own logic with plain calls
        out_graph = attend()
        replay_attn = lambda: out_graph.copy_(attend())  # noqa: E731
        replay_store = store
    gen = torch.Generator(device="cpu").manual_seed(1)
    for trial in range(3):
        q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype))
        seq_lens.copy_(torch.randint(1, max_ctx + 1, seq_lens.shape, generator=gen).to(seq_lens.dtype))
        k_new.copy_(torch.randn(k_new.shape, generator=gen).to(k_new.dtype))
        slots.copy_(torch.randperm(cache.shape[0] * cache.shape[2], generator=gen)[:batch].to(slots.dtype))
        replay_attn()
        eager = eager_attend()
        if not torch.equal(out_graph, eager):
            sys.exit(f"graph replay {trial}: attention differs from eager by {(out_graph - eager).abs().max():.3g}")
        ref = ops.paged_attention(q, cache, table, seq_lens, qsl, fmt, scale=scale, impl="reference")
        err = ((out_graph.float() - ref.float()).norm() / ref.float().norm()).item()
        if not err < 2e-2:
            sys.exit(f"graph replay {trial}: relative error {err:.3g} against the reference")
        before = cache.clone()
        replay_store()
        graph_bytes = cache.clone()
        cache.copy_(before)
        store()
        if not torch.equal(graph_bytes, cache):
            sys.exit(f"graph replay {trial}: store wrote other bytes than eager")
    print(f"graph: decode batch {batch}, block table for {max_ctx} tokens, 3 replays equal to eager "
          f"(attention and store); relative error vs reference {err:.2e} [{device.type}]")


def _formats(d: int = 64, hk: int = 2, block: int = 16) -> dict:
    """The formats beyond plain TurboQuant the kernels serve: calibrated state (key shift and channel scale,
    value shift), sink records, FibQuant at 2 bits."""
    import torch

    from vllm_kvq import codecs
    from vllm_kvq.kv_format import KVFormat

    g = torch.Generator().manual_seed(3)
    tq3, fib2 = codecs.get("turboquant3", head_dim=d), codecs.get("fibquant2", head_dim=d)
    return {
        "turboquant3+calibration": KVFormat(d, [tq3] * hk, [tq3] * hk, name="turboquant3+calibration",
                                            k_shift=torch.randn(hk, d, generator=g) * 2,
                                            v_shift=torch.randn(hk, d, generator=g),
                                            k_scale=torch.rand(hk, d, generator=g) + 0.5),
        "turboquant3+sinks4": KVFormat(d, [tq3] * hk, [tq3] * hk, name="turboquant3+sinks4", sink_tokens=4,
                                       block_size=block),
        "fibquant2": KVFormat(d, [fib2] * hk, [fib2] * hk, name="fibquant2"),
    }


def _impls(device, fmt, group: int) -> list[str]:
    """The fast implementations to check on this device: Triton, and on a GPU the CUDA extension, which
    must take the format (a decline fails the check: these are the formats it claims)."""
    from vllm_kvq import ops

    if device.type != "cuda":
        return ["triton"]
    plan = ops.plan(fmt, device, "paged_attention", True, group)
    if plan.get("cuda") is not None:
        sys.exit(f"the CUDA extension declines {fmt.name}: {plan['cuda']}")
    return ["cuda", "triton"]


def sanitize(smoke: bool) -> None:
    import torch

    from vllm_kvq import ops

    device = _device(smoke)
    fmt0, cache0, table, q, seq_lens, qsl, impl = _case(device, batch=2, max_ctx=48)
    group = q.shape[1] // fmt0.num_kv_heads
    for fmt in (fmt0, *_formats().values()):
        cache = fmt.allocate(cache0.shape[0], cache0.shape[2], device=device)
        n = cache.shape[0] * cache.shape[2]
        kv = torch.randn(n, fmt.num_kv_heads, fmt.head_size).to(device=device, dtype=torch.bfloat16)
        ops.store(kv, kv, cache, torch.arange(n, device=device), fmt, impl="reference")
        for name in _impls(device, fmt, group):
            k = torch.randn(3, fmt.num_kv_heads, fmt.head_size, device=device, dtype=torch.bfloat16)
            ops.store(k, k, cache, torch.tensor([5, -1, 40], device=device), fmt, impl=name)
            out = ops.paged_attention(q, cache, table, seq_lens, qsl, fmt, scale=0.125, impl=name)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if not torch.isfinite(out.float()).all():
                sys.exit(f"sanitize: {name} decode of {fmt.name} gave non-finite output")
            print(f"sanitize: {name} store (with a -1 padding slot) and decode of {fmt.name} ran [{device.type}]")


def formats(smoke: bool) -> None:
    """Each fast implementation against the reference for the calibrated, sink and FibQuant formats: store
    bytes (at most 1 % differ: rounding ties flip codes, sink records round to bf16) and decode (relative
    error of the output below 2e-2 with split-K, the bf16 rule of thumb)."""
    import torch

    from vllm_kvq import ops

    device = _device(smoke)
    batch, max_ctx, block = (2, 40, 16) if smoke else (8, 2048, 16)
    g = torch.Generator().manual_seed(5)
    for fmt in _formats(block=block).values():
        hk, d = fmt.num_kv_heads, fmt.head_size
        group = 4
        width = math.ceil(max_ctx / block)
        table = torch.randperm(batch * width, generator=g).to(torch.int32).reshape(batch, width).to(device)
        n = batch * width * block
        k = torch.randn(n, hk, d, generator=g).to(device=device, dtype=torch.bfloat16)
        v = torch.randn(n, hk, d, generator=g).to(device=device, dtype=torch.bfloat16)
        slots = torch.arange(n, device=device)
        want = fmt.allocate(batch * width, block, device=device)
        ops.store(k, v, want, slots, fmt, impl="reference")
        q = torch.randn(batch, hk * group, d, generator=g).to(device=device, dtype=torch.bfloat16)
        seq_lens = torch.randint(1, max_ctx + 1, (batch,), generator=g).to(device=device, dtype=torch.int32)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
        ref = ops.paged_attention(q, want, table, seq_lens, qsl, fmt, scale=d ** -0.5, impl="reference").float()
        for name in _impls(device, fmt, group):
            got = fmt.allocate(batch * width, block, device=device)
            ops.store(k, v, got, slots, fmt, impl=name)
            differ = (got != want).float().mean().item()
            if differ > 0.01:
                sys.exit(f"formats: {name} store of {fmt.name}: {differ:.2%} of the bytes differ from the reference")
            out = ops.paged_attention(q, want, table, seq_lens, qsl, fmt, scale=d ** -0.5, impl=name,
                                      max_seq_len=int(seq_lens.max())).float()
            err = ((out - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                sys.exit(f"formats: {name} decode of {fmt.name}: relative error {err:.3g} against the reference")
            print(f"formats: {name} {fmt.name}: store bytes differing {differ:.3%}, decode relative error "
                  f"{err:.2e} [{device.type}]")


def env(smoke: bool) -> None:
    """What the report needs to name the machine; fails when a package the checks import is missing."""
    import importlib.util
    import platform
    import shutil
    import subprocess

    import torch

    print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
    print("triton", importlib.import_module("triton").__version__ if importlib.util.find_spec("triton") else "missing")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("device: no CUDA device" + (" (smoke mode)" if smoke else ""))
    for tool in ("nvcc", "compute-sanitizer"):
        path = shutil.which(tool)
        print(f"{tool}: {path or 'not found'}")
        if tool == "nvcc" and path:
            print(subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1])
    missing = [m for m in ("triton", "yaml", "pydantic", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"missing Python packages {missing}: carry their wheels and pass --wheels DIR")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["env", "graph", "sanitize", "formats"])
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args(argv)
    if a.smoke:  # before anything imports the kernels: Triton reads it when a kernel is decorated
        os.environ.setdefault("TRITON_INTERPRET", "1")
    {"env": env, "graph": graph, "sanitize": sanitize, "formats": formats}[a.step](a.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())

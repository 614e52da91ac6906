"""Decode attention over packed KV caches at real model shapes, against peers measured in the same run.

    python benchmarks/bench_decode.py                       # Llama-3.1-8B and SmolLM2 shapes, tq4 + tq3
    python benchmarks/bench_decode.py --model llama --codecs turboquant3 --shapes 64x32768
    python benchmarks/bench_decode.py --smoke               # tiny shapes; runs on CPU under the interpreter

Per (model, batch x context) row: time (median, CUDA events, L2 flushed before each call), bytes the kernel
must read (packed cache slots of every context token and KV head, plus queries), achieved bandwidth and its
share of the GPU's HBM peak, and the speed ratio against torch SDPA over a contiguous bf16 cache of the
same shape (>1 = faster than bf16). Peers: torch SDPA bf16 (always), FlashInfer paged decode bf16 and fp8
(when ``flashinfer`` imports). ``--vllm-dir`` lists upstream vLLM's TurboQuant Triton files found in an
unpacked vLLM wheel (never committed here); wiring them as a timed peer needs their call signature, which
this script does not assume.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from pathlib import Path

import torch

MODELS = {"llama": (32, 8, 128), "smollm2": (9, 3, 64)}  # (query heads, KV heads, head size)
SHAPES = [(1, 4096), (8, 8192), (16, 16384), (32, 8192), (64, 4096), (32, 32768), (64, 32768)]
SMOKE_SHAPES = [(2, 48)]

# HBM peak by device-name substring, bytes/s (vendor figures).
PEAK_BYTES_PER_S = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12}


def parse_common(ap: argparse.ArgumentParser, argv=None):
    """Add the options every benchmark takes, parse, set up the device. Returns (args, device), device None
    when there is nothing to run (no GPU and no --smoke)."""
    ap.add_argument("--model", choices=[*MODELS, "all"], default="all")
    ap.add_argument("--codecs", default="turboquant4,turboquant3")
    ap.add_argument("--impl", choices=["auto", "triton", "cuda"], default="auto")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--peak-gbps", type=float, default=None, help="HBM peak, if the device name is not known")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one rep: checks the script (CPU ok)")
    a = ap.parse_args(argv)
    device = setup_device()
    if device.type != "cuda" and not a.smoke:
        print("no CUDA device: run with --smoke to check the script under the Triton interpreter")
        return a, None
    return a, device


def setup_device() -> torch.device:
    """CUDA when present; otherwise the Triton interpreter (a smoke run of the script, not a measurement)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return torch.device("cpu")


def peak_bandwidth(device: torch.device, override_gbps: float | None) -> float | None:
    if override_gbps:
        return override_gbps * 1e9
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BYTES_PER_S.items() if k in name), None)


class Timer:
    """Median seconds per call: CUDA events around each call with L2 flushed before it (a 4K-token context
    fits in an H100's 50 MB L2 and would flatter every kernel). On CPU, wall time of a few calls."""

    def __init__(self, device: torch.device, reps: int = 20, warmup: int = 3, flush_mb: int = 256):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.flush = torch.empty(flush_mb << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn) -> float:
        for _ in range(self.warmup if self.device.type == "cuda" else 1):
            fn()
        times = []
        if self.device.type != "cuda":
            import time
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)


def fmt_row(cols, widths) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cols, widths))


def _paged_inputs(batch: int, ctx: int, hk: int, block: int, device, max_model_len: int | None = None):
    """A block table per sequence; ``max_model_len`` widens it as vLLM does (its width comes from the
    longest allowed context, not this batch's), with the unused columns pointing at block 0."""
    blocks_per_seq = math.ceil(ctx / block)
    perm = torch.randperm(batch * blocks_per_seq, device=device).to(torch.int32)
    table = perm.reshape(batch, blocks_per_seq)
    width = math.ceil(max_model_len / block) if max_model_len else blocks_per_seq
    if width > blocks_per_seq:
        table = torch.cat([table, table.new_zeros(batch, width - blocks_per_seq)], dim=1)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device)
    return table, seq_lens, qsl, batch * blocks_per_seq


def fill_cache(fmt, cache, device, chunk: int = 1 << 16):
    """Real codes (random K/V stored by the kernels), so scales are finite and codes realistic."""
    from vllm_kvq import ops

    n = cache.shape[0] * cache.shape[2]
    g = torch.Generator(device=device).manual_seed(0)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        kv = torch.randn(m, fmt.num_kv_heads, fmt.head_size, device=device, generator=g, dtype=torch.bfloat16)
        ops.store(kv, kv, cache, torch.arange(s, s + m, device=device), fmt, impl=None if device.type == "cuda" else "triton")


def sdpa_bf16(batch, ctx, hq, hk, d, device):
    q = torch.randn(batch, hq, 1, d, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, hk, ctx, d, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    return fn, 2 * k.numel() * 2 + 2 * q.numel() * 2


def flashinfer_paged(batch, ctx, hq, hk, d, device, kv_dtype):
    """FlashInfer's paged decode over an NHD cache of 16-token pages; None when FlashInfer is absent."""
    try:
        import flashinfer
    except ImportError:
        return None
    page = 16
    pages = math.ceil(ctx / page)
    cache = torch.randn(batch * pages, 2, page, hk, d, device=device, dtype=torch.bfloat16).to(kv_dtype)
    indptr = torch.arange(0, batch * pages + 1, pages, dtype=torch.int32, device=device)
    indices = torch.randperm(batch * pages, device=device).to(torch.int32)
    last = torch.full((batch,), ctx - (pages - 1) * page, dtype=torch.int32, device=device)
    ws = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    w.plan(indptr, indices, last, hq, hk, d, page, q_data_type=torch.bfloat16, kv_data_type=kv_dtype)
    q = torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16)
    return (lambda: w.run(q, cache)), batch * ctx * hk * d * 2 * cache.element_size() + 2 * q.numel() * 2


def list_upstream_turboquant(vllm_dir: str) -> list[str]:
    root = Path(vllm_dir)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                  if "turboquant" in p.name.lower() or "turboquant" in p.read_text(errors="ignore")[:20000].lower()
                  and "triton.jit" in p.read_text(errors="ignore"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="comma list of BATCHxCONTEXT, e.g. 1x4096,64x32768")
    ap.add_argument("--vllm-dir", default=None, help="an unpacked vLLM wheel: list its TurboQuant Triton files")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="block tables as wide as this context (vLLM's width; e.g. 131072), not the batch's")
    a, device = parse_common(ap, argv)
    if device is None:
        return 0
    from vllm_kvq import codecs, ops
    from vllm_kvq.kv_format import KVFormat

    shapes = SMOKE_SHAPES if a.smoke else (
        [tuple(map(int, s.split("x"))) for s in a.shapes.split(",")] if a.shapes else SHAPES)
    models = list(MODELS) if a.model == "all" else [a.model]
    peak = peak_bandwidth(device, a.peak_gbps)
    timer = Timer(device, reps=1 if a.smoke else a.reps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"device: {name}; HBM peak: {peak / 1e12:.2f} TB/s" if peak else f"device: {name}; HBM peak unknown")
    if a.vllm_dir:
        found = list_upstream_turboquant(a.vllm_dir)
        print("upstream vLLM TurboQuant Triton files (not timed: no adapter):", ", ".join(found) or "none found")
    widths = [12, 12, 12, 10, 10, 8, 8, 9, 9, 1]
    for model in models:
        hq, hk, d = MODELS[model]
        print(f"\n{model}: {hq} query / {hk} KV heads, head size {d}")
        print(fmt_row(["kernel", "batch x ctx", "time us", "MB read", "GB/s", "% peak", "x bf16", "fi-bf16",
                       "fi-fp8", ""], widths))
        for batch, ctx in shapes:
            base_fn, base_bytes = sdpa_bf16(batch, ctx, hq, hk, d, device)
            t_bf16 = timer(base_fn)
            peers = {}
            for label, dt in (("fi-bf16", torch.bfloat16), ("fi-fp8", torch.float8_e4m3fn)):
                try:
                    p = flashinfer_paged(batch, ctx, hq, hk, d, device, dt) if device.type == "cuda" else None
                    peers[label] = timer(p[0]) if p else None
                except Exception as e:  # a peer that fails must not stop the run; say why
                    print(f"  {label} skipped: {type(e).__name__}: {e}")
                    peers[label] = None

            def report(kernel, t, nbytes):
                bw = nbytes / t
                share = f"{100 * bw / peak:.0f}" if peak else "-"
                fi = [f"{pt / t:.2f}" if pt else "-" for pt in (peers["fi-bf16"], peers["fi-fp8"])]
                print(fmt_row([kernel, f"{batch}x{ctx}", f"{t * 1e6:.1f}", f"{nbytes / 1e6:.1f}", f"{bw / 1e9:.0f}",
                               share, f"{t_bf16 / t:.2f}", *fi, ""], widths))

            report("sdpa-bf16", t_bf16, base_bytes)
            del base_fn
            for cname in a.codecs.split(","):
                c = codecs.get(cname, head_dim=d)
                fmt = KVFormat(d, [c] * hk, [c] * hk, name=cname)
                table, seq_lens, qsl, nblocks = _paged_inputs(batch, ctx, hk, a.block_size, device,
                                                              None if a.smoke else a.max_model_len)
                cache = fmt.allocate(nblocks, a.block_size, device=device)
                fill_cache(fmt, cache, device)
                q = torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16)
                impl = None if a.impl == "auto" else a.impl
                fn = lambda: ops.paged_attention(q, cache, table, seq_lens, qsl, fmt, scale=d ** -0.5,  # noqa: E731
                                                 impl=impl if device.type == "cuda" else "triton")
                nbytes = batch * ctx * hk * fmt.slot_bytes + 2 * q.numel() * 2
                report(cname, timer(fn), nbytes)
                del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quantize-on-write (ops.store) at real model shapes, against peers measured in the same run.

    python benchmarks/bench_store.py                     # Llama-3.1-8B and SmolLM2 shapes, tq4 + tq3
    python benchmarks/bench_store.py --smoke             # tiny shapes; runs on CPU under the interpreter

Per row: time, bytes moved (bf16 K and V read + packed slots written), bandwidth and share of HBM peak, and
the ratio against a bf16 paged-cache write (vLLM's reshape_and_cache done with one indexed copy) and an fp8
cast-and-write, both of the same tokens.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench_decode import MODELS, Timer, fmt_row, parse_common, peak_bandwidth

TOKENS = [1, 64, 512, 4096, 16384, 65536]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default=None, help="comma list of token counts per call")
    a, device = parse_common(ap, argv)
    if device is None:
        return 0
    from vllm_kvq import codecs, ops
    from vllm_kvq.kv_format import KVFormat

    tokens = [20] if a.smoke else ([int(t) for t in a.tokens.split(",")] if a.tokens else TOKENS)
    models = list(MODELS) if a.model == "all" else [a.model]
    peak = peak_bandwidth(device, a.peak_gbps)
    timer = Timer(device, reps=1 if a.smoke else a.reps)
    widths = [12, 8, 10, 10, 8, 8, 8, 8]
    for model in models:
        _, hk, d = MODELS[model]
        print(f"\n{model}: {hk} KV heads, head size {d}")
        print(fmt_row(["kernel", "tokens", "time us", "MB moved", "GB/s", "% peak", "x bf16", "x fp8"], widths))
        for n in tokens:
            blocks = max(1, 2 * n // a.block_size + 1)
            slots = torch.randperm(blocks * a.block_size, device=device)[:n]
            k = torch.randn(n, hk, d, device=device, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            flat = torch.zeros(blocks * a.block_size, 2, hk, d, device=device, dtype=torch.bfloat16)
            t_bf16 = timer(lambda: flat.index_copy_(0, slots, torch.stack((k, v), 1)))
            flat8 = torch.zeros(blocks * a.block_size, 2, hk, d, device=device, dtype=torch.uint8)  # fp8 bits
            t_fp8 = timer(lambda: flat8.index_copy_(
                0, slots, torch.stack((k, v), 1).to(torch.float8_e4m3fn).view(torch.uint8)))

            def report(kernel, t, nbytes):
                bw = nbytes / t
                share = f"{100 * bw / peak:.0f}" if peak else "-"
                print(fmt_row([kernel, n, f"{t * 1e6:.1f}", f"{nbytes / 1e6:.2f}", f"{bw / 1e9:.0f}", share,
                               f"{t_bf16 / t:.2f}", f"{t_fp8 / t:.2f}"], widths))

            report("bf16 write", t_bf16, 2 * k.numel() * 2 * 2)
            report("fp8 write", t_fp8, 2 * k.numel() * (2 + 1))
            for cname in a.codecs.split(","):
                c = codecs.get(cname, head_dim=d)
                fmt = KVFormat(d, [c] * hk, [c] * hk, name=cname)
                cache = fmt.allocate(blocks, a.block_size, device=device)
                impl = (None if a.impl == "auto" else a.impl) if device.type == "cuda" else "triton"
                t = timer(lambda: ops.store(k, v, cache, slots, fmt, impl=impl))
                report(cname, t, 2 * k.numel() * 2 + n * hk * fmt.slot_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

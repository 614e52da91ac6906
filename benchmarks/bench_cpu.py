"""CPU benchmarks of the native kernels (csrc/cpu), against peers measured in the same run.

    python benchmarks/bench_cpu.py kernel                  # decode attention, SmolLM2 and Llama-3.1-8B shapes
    python benchmarks/bench_cpu.py kernel --shapes 1x4096 --codecs turboquant3
    python benchmarks/bench_cpu.py kernel --key-rope --threads 1   # cost of position-aware key centring
    python benchmarks/bench_cpu.py fib                     # FibQuant decode (table / tile paths) vs turboquant2
    python benchmarks/bench_cpu.py prefill --threads 1     # one layer's prefill (store + attention) vs bf16
    python benchmarks/bench_cpu.py e2e MODEL_DIR           # vLLM-CPU decode step and prefill per dtype
    python benchmarks/bench_cpu.py serve MODEL_DIR         # `vllm bench serve` per dtype
    python benchmarks/bench_cpu.py offline MODEL_DIR       # serving-like offline run per dtype, rounds alternated
    python benchmarks/bench_cpu.py offline MODEL_DIR --no-amx   # the same with vLLM's and oneDNN's AMX off

kernel: per (model, batch x context): our decode attention over the packed paged cache, vLLM-CPU's own bf16
paged attention (``torch.ops._C.cpu_attention_with_kv_cache``, what its CPU_ATTN backend calls) over a bf16
cache of the same shape, and a plain read of as many bytes as our kernel must read (the machine's memory
bandwidth for that working set). Columns: milliseconds (median), our time / bf16 time, the bytes our kernel
reads per second and that rate as a share of the plain read's.

kernel --key-rope: per (model, batch x context, codec): our decode attention over one cache read as the plain
format and as the same format with position-aware key centring (the per-(row, key position) score bias,
its bias query computed in the call as ops.paged_attention does, and precomputed: the kernels' own cost), run
interleaved; medians and their ratios to the plain format.

fib: per (model, batch x context): decode attention over turboquant2 and over FibQuant codecs read two ways,
through per-query codeword tables and value histograms (``FIB_LUT_FROM = 0``) and through decoded float tiles
(the default, ``FIB_LUT_FROM = None``), as milliseconds and as ratios to turboquant2 in the same run.

prefill: one layer's prefill of N tokens in one chunk (store, then causal attention over the cache), ours per
codec through the default path (the fused kernel) and through the opt-in dense path (``DENSE_PREFILL_FROM``:
decode to float, torch SDPA), against vLLM-CPU's bf16 store + attention (``cpu_attn_reshape_and_cache`` +
``cpu_attention_with_kv_cache``) over a bf16 cache of the same shape; the variants run interleaved, one
repetition of each in turn, and the table gives each one's median milliseconds and its ratio to bf16.

e2e: one vLLM engine per dtype (one process each, one after another): per batch x context, the prefill time
(the whole batch in one step) and the mean decode step time over 32 steps, from vLLM's per-request timestamps.
serve: starts ``vllm serve`` per dtype and runs vLLM's load client on random 512-in / 64-out prompts.
offline: the serve workload without HTTP (``LLM.generate`` of N random 512-token prompts, 64 tokens out each,
``max_num_seqs`` 8, eager), one engine per dtype in one child process, dtypes alternated for ``--rounds``
rounds; per dtype the median output tokens per second and its ratio to bf16 (``auto``). ``--no-amx`` tells
vLLM's CPU attention the CPU has no AMX and holds oneDNN to AVX512-BF16 (an AMX machine then stands in for a
CPU without AMX, such as AMD Zen 4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

MODELS = {"smollm2": (9, 3, 64), "llama": (32, 8, 128)}  # (query heads, KV heads, head size)
SHAPES = [(1, 4096), (1, 8192), (4, 8192), (8, 4096), (16, 8192)]
BLOCK = 128  # vLLM-CPU's default block size


def _median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _vllm_ops():
    """(vllm._custom_ops, its ISA picker), or None where vLLM-CPU's attention ops are unavailable."""
    try:
        import vllm._custom_ops as vops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError as e:
        print(f"(vLLM-CPU's attention op is unavailable: {e})")
        return None
    return vops, _get_attn_isa


def _vllm_attention_call(vops, isa, q, key_cache, value_cache, bt, lens, qsl, hk):
    """A callable running vLLM-CPU's causal bf16 attention (what CPU_ATTN calls) over this paged cache."""
    out = torch.empty_like(q)
    d = q.shape[-1]
    if isa == "amx":  # the OS hands out AMX tiles only on request (in an engine oneDNN has asked already)
        torch.cpu._init_amx()
    sched = vops.cpu_attn_get_scheduler_metadata(
        num_reqs=lens.numel(), num_heads=q.shape[1], num_kv_heads=hk, head_dim=d, seq_lens=lens,
        dtype=torch.bfloat16, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=True)

    def run():
        vops.cpu_attention_with_kv_cache(
            query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl, seq_lens=lens,
            scale=d ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1, block_table=bt, softcap=0.0,
            scheduler_metadata=sched, s_aux=None)

    return run


def _vllm_bf16_attention(hq, hk, d, batch, ctx, gen):
    """A callable running vLLM-CPU's bf16 decode attention over a paged cache of this shape, or None."""
    ops = _vllm_ops()
    if ops is None:
        return None
    vops, get_isa = ops
    per_seq = -(-ctx // BLOCK)  # the last block partly filled when BLOCK does not divide ctx (e.g. 3000)
    nb = batch * per_seq
    kv = torch.randn(nb, hk, 2 * BLOCK, d, generator=gen).to(torch.bfloat16)
    key_cache, value_cache = kv.chunk(2, dim=2)
    bt = torch.arange(nb, dtype=torch.int32).reshape(batch, per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    q = torch.randn(batch, hq, d, generator=gen).to(torch.bfloat16)
    return _vllm_attention_call(vops, get_isa(torch.bfloat16, BLOCK, d, "auto"), q, key_cache, value_cache, bt,
                                lens, qsl, hk)


def kernel(a) -> None:
    from vllm_kvq import codecs
    from vllm_kvq.kernels import cpu as kc
    from vllm_kvq.kv_format import KVFormat

    if not kc.available():
        sys.exit("vllm_kvq._C_cpu is not built (pip install -e . or scripts/setup_env.sh builds it)")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.key_rope:
        return _kernel_key_rope(a)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}, our ISA {kc.best_isa()}, block size {BLOCK}")
    print(f"{'model':8} {'shape':>9} {'codec':12} {'ours ms':>8} {'bf16 ms':>8} {'ours/bf16':>9} {'read ms':>8} "
          f"{'ours GB/s':>9} {'% of read':>9}")
    for model in ([a.model] if a.model != "all" else list(MODELS)):
        hq, hk, d = MODELS[model]
        for batch, ctx in a.shapes:
            # ours and the peer run interleaved, one repetition of each in turn (the machine's load drifts)
            fns = {}
            peer = _vllm_bf16_attention(hq, hk, d, batch, ctx, gen)
            if peer:
                fns["bf16"] = peer
            nb, bt, lens, qsl, q = _decode_batch(batch, ctx, hq, d, gen)
            for name in a.codecs:
                c = codecs.get(name, head_dim=d)
                fmt = KVFormat(d, [c] * hk, [c] * hk, name=name)
                cache = _filled_cache(fmt, hk, d, nb, gen)
                fns[name] = lambda cache=cache, fmt=fmt: kc.paged_attention(q, cache, bt, lens, qsl, fmt, scale=d ** -0.5)
            med = _interleaved_medians(fns, a.reps)
            bf16_s = med.get("bf16", float("nan"))
            for name in a.codecs:
                ours_s = med[name]
                nbytes = batch * ctx * hk * codecs.get(name, head_dim=d).nbytes * 2
                buf = torch.ones(nbytes // 4, dtype=torch.float32)
                read_s = _median_s(lambda: buf.sum(), a.reps)
                del buf
                print(f"{model:8} {batch:>3}x{ctx:<5} {name:12} {ours_s * 1e3:8.3f} {bf16_s * 1e3:8.3f} "
                      f"{ours_s / bf16_s:9.2f} {read_s * 1e3:8.3f} {nbytes / ours_s / 1e9:9.1f} "
                      f"{100 * read_s / ours_s:8.0f}%")
            del fns


def _key_rope_fmt(codec, hk: int, d: int):
    """``codec`` for every head with position-aware key centring: a pre-RoPE key mean, RoPE base 1e5 over every
    channel (the kernels' work does not depend on the numbers)."""
    from vllm_kvq import calibration
    from vllm_kvq.kv_format import KVFormat

    freq, _ = calibration.rope_frequencies(SimpleNamespace(rope_theta=1e5), d)
    mu = torch.randn(hk, d, generator=torch.Generator().manual_seed(1))
    return KVFormat(d, [codec] * hk, [codec] * hk, name=f"{codec.name}+rope", k_shift=mu, k_rope_freq=freq)


def _kernel_key_rope(a) -> None:
    from vllm_kvq import codecs
    from vllm_kvq.kernels import cpu as kc
    from vllm_kvq.kv_format import KVFormat

    gen = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}, our ISA {kc.best_isa()}, block size {BLOCK}, {a.reps} reps interleaved")
    print(f"{'model':8} {'shape':>9} {'codec':12} {'plain ms':>9} {'rope ms':>9} {'rope/plain':>10} "
          f"{'kernel ms':>9} {'kernel/plain':>12}")
    for model in ([a.model] if a.model != "all" else list(MODELS)):
        hq, hk, d = MODELS[model]
        for batch, ctx in a.shapes:
            nb, bt, lens, qsl, q = _decode_batch(batch, ctx, hq, d, gen)
            for name in a.codecs:
                c = codecs.get(name, head_dim=d)
                plain = KVFormat(d, [c] * hk, [c] * hk, name=name)
                rope = _key_rope_fmt(c, hk, d)
                cache = _filled_cache(plain, hk, d, nb, gen)  # same slot layout: one cache serves both
                scale = d ** -0.5
                table = rope.key_rope.table(bt.shape[1] * BLOCK, "cpu")
                kb = (rope.key_rope.bias_query(q, scale), table)
                med = _interleaved_medians({
                    "plain": lambda: kc.paged_attention(q, cache, bt, lens, qsl, plain, scale=scale),
                    "rope": lambda: kc.paged_attention(q, cache, bt, lens, qsl, rope, scale=scale,
                                                       key_bias=(rope.key_rope.bias_query(q, scale), table)),
                    "kernel": lambda: kc.paged_attention(q, cache, bt, lens, qsl, rope, scale=scale, key_bias=kb),
                }, a.reps)
                del cache
                print(f"{model:8} {batch:>3}x{ctx:<5} {name:12} {med['plain'] * 1e3:9.3f} {med['rope'] * 1e3:9.3f} "
                      f"{med['rope'] / med['plain']:10.3f} {med['kernel'] * 1e3:9.3f} {med['kernel'] / med['plain']:12.3f}")


def _interleaved_medians(fns: dict, reps: int) -> dict:
    """Median seconds per callable, the callables run in turn each repetition (the machine's load drifts)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _vllm_bf16_prefill(hq, hk, d, n, gen):
    """A callable storing n tokens' bf16 K/V with vLLM-CPU's own op and attending them causally, or None."""
    ops = _vllm_ops()
    if ops is None:
        return None
    vops, get_isa = ops
    nb = (n + BLOCK - 1) // BLOCK
    kv = torch.zeros(nb, hk, 2 * BLOCK, d, dtype=torch.bfloat16)
    key_cache, value_cache = kv.chunk(2, dim=2)
    bt = torch.arange(nb, dtype=torch.int32).reshape(1, nb)
    lens, qsl = torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32)
    q = torch.randn(n, hq, d, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(n, hk, d, generator=gen).to(torch.bfloat16) for _ in range(2))
    slots = torch.arange(n, dtype=torch.int64)
    isa = get_isa(torch.bfloat16, BLOCK, d, "auto")
    attend = _vllm_attention_call(vops, isa, q, key_cache, value_cache, bt, lens, qsl, hk)

    def run():
        vops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        attend()

    return run


def prefill(a) -> None:
    from vllm_kvq import codecs
    from vllm_kvq.kernels import cpu as kc
    from vllm_kvq.kv_format import KVFormat

    if not kc.available():
        sys.exit("vllm_kvq._C_cpu is not built (pip install -e . or scripts/setup_env.sh builds it)")
    if a.threads:
        torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}, our ISA {kc.best_isa()}, block size {BLOCK}, {a.reps} reps")
    print(f"{'model':8} {'tokens':>6} {'what':24} {'ms':>8} {'x bf16':>7}")
    for model in ([a.model] if a.model != "all" else list(MODELS)):
        hq, hk, d = MODELS[model]
        for n in a.tokens:
            fns = {}
            peer = _vllm_bf16_prefill(hq, hk, d, n, gen)
            if peer:
                fns["bf16 (vLLM-CPU)"] = peer
            bt = torch.arange((n + BLOCK - 1) // BLOCK, dtype=torch.int32).reshape(1, -1)
            lens, qsl = torch.tensor([n], dtype=torch.int32), torch.tensor([0, n], dtype=torch.int32)
            q = torch.randn(n, hq, d, generator=gen).to(torch.bfloat16)
            k, v = (torch.randn(n, hk, d, generator=gen).to(torch.bfloat16) for _ in range(2))
            for name in a.codecs:
                c = codecs.get(name, head_dim=d)
                fmt = KVFormat(d, [c] * hk, [c] * hk, name=name)
                cache = fmt.allocate(bt.shape[1], BLOCK)

                def run(fmt=fmt, cache=cache, dense=None, rope=None):
                    kc.store(k, v, cache, torch.arange(n), fmt)
                    before, kc.DENSE_PREFILL_FROM = kc.DENSE_PREFILL_FROM, dense
                    kb = None if rope is None else (rope.key_rope.bias_query(q, d ** -0.5),
                                                    rope.key_rope.table(bt.shape[1] * BLOCK, "cpu"))
                    try:
                        kc.paged_attention(q, cache, bt, lens, qsl, rope or fmt, scale=d ** -0.5, key_bias=kb)
                    finally:
                        kc.DENSE_PREFILL_FROM = before

                fns[f"{name} fused"] = run
                if a.key_rope:  # the same store and cache, attention with the key-centring bias
                    fns[f"{name} fused +rope"] = lambda run=run, r=_key_rope_fmt(c, hk, d): run(rope=r)
                if a.dense:
                    fns[f"{name} dense SDPA"] = lambda run=run: run(dense=2)
            med = _interleaved_medians(fns, a.reps)
            base = med.get("bf16 (vLLM-CPU)", float("nan"))
            for what, sec in med.items():
                print(f"{model:8} {n:>6} {what:24} {sec * 1e3:8.1f} {sec / base:7.2f}")


def _decode_batch(batch: int, ctx: int, hq: int, d: int, gen):
    """(blocks, block table, seq lens, query start locations, bf16 queries) of a decode step over contiguous
    blocks."""
    per_seq = -(-ctx // BLOCK)
    nb = batch * per_seq
    bt = torch.arange(nb, dtype=torch.int32).reshape(batch, per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    return nb, bt, lens, qsl, torch.randn(batch, hq, d, generator=gen).to(torch.bfloat16)


def _filled_cache(fmt, hk, d, nb, gen):
    from vllm_kvq.kernels import cpu as kc

    cache = fmt.allocate(nb, BLOCK)
    n = nb * BLOCK
    for i in range(0, n, 65536):  # fill through the store kernel, in pieces
        m = min(65536, n - i)
        kc.store(torch.randn(m, hk, d, generator=gen).to(torch.bfloat16),
                 torch.randn(m, hk, d, generator=gen).to(torch.bfloat16), cache, torch.arange(i, i + m), fmt)
    return cache


def fib(a) -> None:
    from vllm_kvq import codecs
    from vllm_kvq.kernels import cpu as kc
    from vllm_kvq.kv_format import KVFormat

    if not kc.available():
        sys.exit("vllm_kvq._C_cpu is not built (pip install -e . or scripts/setup_env.sh builds it)")
    if a.threads:
        torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {torch.get_num_threads()}, our ISA {kc.best_isa()}, block size {BLOCK}")
    print(f"{'model':8} {'shape':>9} {'codec':14} {'path':6} {'ms':>8} {'x tq2':>6}")
    lut_default = kc.FIB_LUT_FROM
    for model in ([a.model] if a.model != "all" else list(MODELS)):
        hq, hk, d = MODELS[model]
        for batch, ctx in a.shapes:
            nb, bt, lens, qsl, q = _decode_batch(batch, ctx, hq, d, gen)
            base = None
            for name in ["turboquant2", *a.codecs]:
                c = codecs.get(name, head_dim=d)
                fmt = KVFormat(d, [c] * hk, [c] * hk, name=name)
                cache = _filled_cache(fmt, hk, d, nb, gen)
                paths = [("tiles", None)] if name == "turboquant2" else [("tables", 0), ("tiles", None)]
                for path, lut in paths:
                    kc.FIB_LUT_FROM = lut
                    try:
                        t = _median_s(lambda: kc.paged_attention(q, cache, bt, lens, qsl, fmt, scale=d ** -0.5),
                                      a.reps)
                    finally:
                        kc.FIB_LUT_FROM = lut_default
                    base = t if base is None else base
                    print(f"{model:8} {batch:>3}x{ctx:<5} {name:14} {path:6} {t * 1e3:8.3f} {t / base:6.2f}")
                del cache


# --------------------------------------------------------------------------------------------- e2e


def _e2e_child(model_dir: str, dtype: str, cases: list[tuple[int, int]], steps: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max(ctx for _, ctx in cases) + steps + 16
    # The whole batch prefills in one step, so every later step is a pure decode step.
    llm = LLM(model=model_dir, kv_cache_dtype=dtype, enforce_eager=True, dtype="bfloat16", max_model_len=max_len,
              enable_prefix_caching=False, seed=0, kv_cache_memory_bytes=3 << 30, max_num_seqs=16,
              max_num_batched_tokens=max(8192, max(b * c for b, c in cases)), disable_log_stats=False)
    rng = torch.Generator().manual_seed(0)
    vocab = llm.get_tokenizer().vocab_size
    out = {}
    for batch, ctx in cases:
        prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, vocab - 100, (ctx,), generator=rng).tolist())
                   for _ in range(batch)]
        res = llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True), use_tqdm=False)
        m = [r.metrics for r in res]
        prefill = max(x.first_token_ts for x in m) - min(x.scheduled_ts for x in m)
        step = statistics.mean((x.last_token_ts - x.first_token_ts) / (x.num_generation_tokens - 1) for x in m)
        out[f"{batch}x{ctx}"] = {"prefill_s": prefill, "step_ms": 1e3 * step}
    return out


def e2e(a) -> None:
    cases = a.shapes
    results = {}
    for dtype in a.dtypes:
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, __file__, "_e2e_child", a.model_dir, dtype, json.dumps(cases)],
                              capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            print(f"{dtype}: failed\n{proc.stderr[-2000:]}")
            continue
        results[dtype] = json.loads(lines[-1])
    base = results.get("auto")
    print(f"{'dtype':14} {'shape':>9} {'prefill s':>9} {'x bf16':>7} {'step ms':>8} {'x bf16':>7}")
    for dtype, r in results.items():
        for shape, v in r.items():
            b = base[shape] if base else None
            print(f"{dtype:14} {shape:>9} {v['prefill_s']:9.2f} {v['prefill_s'] / b['prefill_s'] if b else float('nan'):7.2f} "
                  f"{v['step_ms']:8.1f} {v['step_ms'] / b['step_ms'] if b else float('nan'):7.2f}")


# ------------------------------------------------------------------------------------------- serve


def serve(a) -> None:
    import urllib.request

    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    rows = {}
    for dtype in a.dtypes:
        log = open(f"/tmp/bench_cpu_serve_{dtype}.log", "w")
        srv = subprocess.Popen([vllm, "serve", a.model_dir, "--served-model-name", "m", "--port", str(a.port),
                                "--kv-cache-dtype", dtype, "--max-model-len", "2048", "--dtype", "bfloat16",
                                # an explicit KV budget (the same for every dtype) skips the CPU backend's
                                # memory-fraction check, which fails on a shared machine
                                "--kv-cache-memory-bytes", str(a.kv_bytes)],
                               stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{a.port}/v1/models", timeout=2)
                    break
                except OSError:
                    if srv.poll() is not None:
                        raise RuntimeError(f"{dtype}: server exited, see {log.name}")
                    time.sleep(2)
            res = f"/tmp/bench_cpu_serve_{dtype}.json"
            subprocess.run([vllm, "bench", "serve", "--backend", "openai", "--base-url", f"http://127.0.0.1:{a.port}",
                            "--model", "m", "--tokenizer", a.model_dir, "--dataset-name", "random",
                            "--random-input-len", "512", "--random-output-len", "64", "--num-prompts", str(a.prompts),
                            "--max-concurrency", "8", "--save-result", "--result-filename", res, "--ignore-eos"],
                           check=True, capture_output=True, text=True)
            rows[dtype] = json.load(open(res))
        finally:
            srv.terminate()
            srv.wait(60)
    base = rows.get("auto")
    print(f"{'dtype':14} {'out tok/s':>9} {'x bf16':>7} {'TPOT ms':>8} {'TTFT ms':>8}")
    for dtype, r in rows.items():
        ratio = r["output_throughput"] / base["output_throughput"] if base else float("nan")
        print(f"{dtype:14} {r['output_throughput']:9.1f} {ratio:7.2f} {r['mean_tpot_ms']:8.1f} {r['mean_ttft_ms']:8.1f}")


def _offline_child(cfg: dict) -> dict:
    if cfg["no_amx"]:  # before vLLM picks its attention ISA (ONEDNN_MAX_CPU_ISA comes from the parent's env)
        torch.cpu._is_amx_tile_supported = lambda: False
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    n, p_len, o_len = cfg["prompts"], cfg["input"], cfg["output"]
    sp = SamplingParams(max_tokens=o_len, min_tokens=o_len, ignore_eos=True, temperature=0)
    out: dict[str, list[float]] = {d: [] for d in cfg["dtypes"]}
    for r in range(cfg["rounds"]):
        for dtype in cfg["dtypes"]:
            rng = torch.Generator().manual_seed(r)  # the same prompts for every dtype of a round
            llm = LLM(model=cfg["model_dir"], kv_cache_dtype=dtype, enforce_eager=True, dtype="bfloat16",
                      kv_cache_memory_bytes=cfg["kv_bytes"], max_num_seqs=8, max_model_len=p_len + o_len + 16, seed=0)
            vocab = llm.get_tokenizer().vocab_size

            def fresh():
                return [TokensPrompt(prompt_token_ids=torch.randint(100, vocab - 100, (p_len,), generator=rng).tolist())
                        for _ in range(n)]

            llm.generate(fresh(), sp, use_tqdm=False)  # warm-up: the first full run is slower for every dtype
            # Timed on prompts the warm-up did not see: repeating them would time prefix-cache hits, whose share
            # depends on the block size (512-token prompts hit 384 tokens at 128-token blocks, 256 at 256).
            prompts = fresh()
            t0 = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            out[dtype].append(n * o_len / (time.perf_counter() - t0))
            del llm
    return out


def offline(a) -> None:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    if a.no_amx:
        env["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"
    cfg = {"model_dir": a.model_dir, "dtypes": a.dtypes, "prompts": a.prompts, "input": a.input_len,
           "output": a.output_len, "rounds": a.rounds, "kv_bytes": a.kv_bytes, "no_amx": a.no_amx}
    proc = subprocess.run([sys.executable, __file__, "_offline_child", json.dumps(cfg)], capture_output=True, text=True,
                          env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise SystemExit(f"offline run failed\n{proc.stderr[-3000:]}")
    res = json.loads(lines[-1])
    base = statistics.median(res["auto"]) if "auto" in res else None
    print(f"{a.prompts} prompts x {a.input_len} in / {a.output_len} out, 8 concurrent, {a.rounds} rounds"
          f"{' (AMX off)' if a.no_amx else ''}")
    print(f"{'dtype':14} {'out tok/s':>9} {'x bf16':>7}  per round")
    for dtype, r in res.items():
        m = statistics.median(r)
        print(f"{dtype:14} {m:9.1f} {m / base if base else float('nan'):7.2f}  {' '.join(f'{x:.1f}' for x in r)}")


def _shape(s: str) -> tuple[int, int]:
    b, c = s.lower().split("x")
    return int(b), int(c)


def main(argv=None) -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_offline_child":
        print(json.dumps(_offline_child(json.loads(sys.argv[2]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_e2e_child":
        print(json.dumps(_e2e_child(sys.argv[2], sys.argv[3], [tuple(c) for c in json.loads(sys.argv[4])], 33)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernel")
    k.add_argument("--model", choices=[*MODELS, "all"], default="all")
    k.add_argument("--codecs", type=lambda s: s.split(","), default=["turboquant4", "turboquant3"])
    k.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")], default=SHAPES)
    k.add_argument("--reps", type=int, default=10)
    k.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    k.add_argument("--key-rope", action="store_true",
                   help="time each codec plain and with position-aware key centring (interleaved) instead")
    f = sub.add_parser("fib")
    f.add_argument("--model", choices=[*MODELS, "all"], default="all")
    f.add_argument("--codecs", type=lambda s: s.split(","), default=["fibquant2", "fibquant2.5"])
    f.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")], default=[(1, 4096), (8, 4096)])
    f.add_argument("--reps", type=int, default=10)
    f.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    pf = sub.add_parser("prefill")
    pf.add_argument("--model", choices=[*MODELS, "all"], default="smollm2")
    pf.add_argument("--codecs", type=lambda s: s.split(","), default=["turboquant4", "turboquant3"])
    pf.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[3000])
    pf.add_argument("--reps", type=int, default=7)
    pf.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    pf.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the opt-in dense (SDPA) path")
    pf.add_argument("--key-rope", action="store_true", help="also time the fused path with position-aware key centring")
    for name in ("e2e", "serve"):
        p = sub.add_parser(name)
        p.add_argument("model_dir")
        p.add_argument("--dtypes", type=lambda s: s.split(","), default=["auto", "fp8", "turboquant4", "turboquant3"])
        if name == "e2e":
            p.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")],
                           default=[(1, 3000), (1, 7000), (8, 4000)])
        else:
            p.add_argument("--port", type=int, default=8102)
            p.add_argument("--prompts", type=int, default=48)
            p.add_argument("--kv-bytes", type=int, default=2 << 30, help="KV-cache bytes of every server")
    o = sub.add_parser("offline")
    o.add_argument("model_dir")
    o.add_argument("--dtypes", type=lambda s: s.split(","), default=["auto", "turboquant4", "turboquant3"])
    o.add_argument("--prompts", type=int, default=48)
    o.add_argument("--input-len", type=int, default=512)
    o.add_argument("--output-len", type=int, default=64)
    o.add_argument("--rounds", type=int, default=2)
    o.add_argument("--kv-bytes", type=int, default=2 << 30, help="KV-cache bytes of every engine")
    o.add_argument("--no-amx", action="store_true",
                   help="vLLM's CPU attention and oneDNN without AMX (a stand-in for CPUs without it)")
    a = ap.parse_args(argv)
    {"kernel": kernel, "fib": fib, "prefill": prefill, "e2e": e2e, "serve": serve, "offline": offline}[a.what](a)


if __name__ == "__main__":
    main()

"""Runs real vLLM (in this process, V1 engine without multiprocessing) for the tests and prints JSON.

    python tests/vllm/probe.py JOBS.json  ->  last stdout line: {"results": [...]}

A job: {"model": path, "dtype": kv_cache_dtype, "llm": {extra LLM kwargs}, "prompts": [[token ids] | "text"],
"max_tokens": int, "prompt_logprobs": bool, "logprobs": int, "repeat": int}. Each job reports vLLM's own
block count and block size, and per prompt (per repeat) the generated token ids, their logprobs and the
prompt tokens' logprobs. Jobs run one after another in one process, so vLLM is imported once.
"""

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _prompt_lp(out):
    if out.prompt_logprobs is None:
        return None
    lps = []
    for tok, d in zip(out.prompt_token_ids, out.prompt_logprobs):
        lps.append(None if d is None else float(d[tok].logprob))
    return lps


def _kvq_impls():
    """Which implementations the plugin's ops dispatched to in this job, e.g. ["paged_attention:cpu"]."""
    from vllm_kvq import ops

    return ops.used()


def run_job(job):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_kvq import ops

    ops._used.clear()  # kvq_impls: this job's dispatch only

    kwargs = dict(model=job["model"], kv_cache_dtype=job["dtype"], enforce_eager=True, dtype="bfloat16",
                  max_model_len=job.get("max_model_len", 1024), seed=0, kv_cache_memory_bytes=job.get("kv_bytes", 1 << 26))
    kwargs.update(job.get("llm", {}))
    llm = LLM(**kwargs)
    try:
        cc = llm.llm_engine.vllm_config.cache_config
        sp = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0,
                            prompt_logprobs=0 if job.get("prompt_logprobs") else None,
                            logprobs=job.get("logprobs", 1))
        prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in job["prompts"]]
        runs = []
        for _ in range(job.get("repeat", 1)):
            outs = llm.generate(prompts, sp, use_tqdm=False)
            runs.append([{
                "prompt_token_ids": list(o.prompt_token_ids),
                "token_ids": list(o.outputs[0].token_ids),
                "text": o.outputs[0].text,
                "logprobs": [float(lp[t].logprob) for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)],
                "prompt_logprobs": _prompt_lp(o),
                "num_cached_tokens": int(o.num_cached_tokens or 0),
            } for o in outs])
        sc = llm.llm_engine.vllm_config.scheduler_config
        return {"num_blocks": cc.num_gpu_blocks, "block_size": cc.block_size, "runs": runs,
                "max_num_batched_tokens": sc.max_num_batched_tokens, "kvq_impls": _kvq_impls()}
    finally:
        del llm
        gc.collect()


def main():
    jobs = json.load(open(sys.argv[1]))
    results = []
    for job in jobs:
        try:
            results.append(run_job(job))
        except Exception as e:  # reported to the test, which decides
            results.append({"error": f"{type(e).__name__}: {e}"})
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()

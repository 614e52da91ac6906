"""Greedy-continuation agreement: does a quantized cache generate what the bf16 cache generates?

    vllm-kvq eval greedy --base-url URL --text shakespeare:hamlet --prompts 4 --prompt-len 768 --gen 256 \\
        --out q.json [--reference bf16.json]

``--prompts`` windows of ``--prompt-len`` tokens, evenly spaced over the text, are each continued greedily
for ``--gen`` tokens (temperature 0, EOS ignored, one batched request). Against a reference run on the same
prompts (the bf16 cache) it reports, per prompt, the *first divergence*: the index of the first generated
token that differs (``gen`` when none does); and two rates over all generated positions:

- ``prefix_agreement``: the share of positions before the first divergence (mean first divergence / gen);
- ``agreement``: the share of positions where the two continuations hold the same token, counted after
  divergence too (they often resynchronise on repetitive text; an upper bound of what "agreeing" means).

Unlike prompt-logprob perplexity this reads the cache during decode, token after token, so it also catches
damage that only decode (or the accumulation of generated K/V) shows.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from vllm_kvq.eval import server as _server
from vllm_kvq.eval.data import load_text


def prompt_starts(n_tokens: int, prompts: int, prompt_len: int) -> list[int]:
    """Start of each prompt window, evenly spaced so the last one ends at the end of the text."""
    if prompts < 1 or prompt_len < 1:
        raise ValueError(f"need at least one prompt of at least one token, got {prompts} x {prompt_len}")
    if n_tokens < prompt_len:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one prompt of {prompt_len}")
    span = n_tokens - prompt_len
    return [0] * prompts if prompts == 1 else [i * span // (prompts - 1) for i in range(prompts)]


def generate(base_url: str, model: str, prompts: list[list[int]], gen: int) -> list[list[int]]:
    """Greedy continuations (token ids) of token-id prompts, ``gen`` tokens each (EOS ignored)."""
    resp = _server.completions(base_url, {"model": model, "prompt": prompts, "max_tokens": gen, "temperature": 0.0,
                                          "ignore_eos": True, "return_token_ids": True})
    out = [None] * len(prompts)
    for ch in resp["choices"]:
        if ch.get("token_ids") is None:
            raise RuntimeError("the server returns no token_ids (vLLM's return_token_ids): cannot compare tokens")
        out[ch["index"]] = list(ch["token_ids"])
    return out


def run_greedy(base_url: str, text: str, *, prompts: int = 4, prompt_len: int = 768, gen: int = 256,
               model: str | None = None) -> dict:
    model = _server.served_model(base_url, model)
    ids = _server.tokenize(base_url, model, load_text(text))
    starts = prompt_starts(len(ids), prompts, prompt_len)
    t0 = time.monotonic()
    print(f"greedy: {prompts} prompts x {prompt_len} tokens, {gen} generated each", file=sys.stderr)
    outputs = generate(base_url, model, [ids[s:s + prompt_len] for s in starts], gen)
    return {"model": model, "text": text, "prompts": prompts, "prompt_len": prompt_len, "gen": gen,
            "starts": starts, "outputs": outputs, "elapsed_s": time.monotonic() - t0}


def first_divergence(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def agreement(ref: dict, cand: dict) -> dict:
    """Agreement of ``cand``'s continuations with ``ref``'s (both from ``run_greedy`` on the same prompts)."""
    if ref.get("starts") != cand.get("starts") or ref.get("prompt_len") != cand.get("prompt_len"):
        raise ValueError("the two greedy runs used different prompts: run both with the same text, "
                         "--prompts and --prompt-len")
    firsts, same, total = [], 0, 0
    for a, b in zip(ref["outputs"], cand["outputs"]):
        n = min(len(a), len(b))
        firsts.append(first_divergence(a, b))
        same += sum(x == y for x, y in zip(a[:n], b[:n]))
        total += n
    return {"agreement": same / total if total else float("nan"),
            "prefix_agreement": sum(firsts) / total if total else float("nan"),
            "first_divergence": firsts, "first_divergence_median": statistics.median(firsts) if firsts else float("nan"),
            "gen": min(ref["gen"], cand["gen"])}


def add_arguments(p) -> None:
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--text", default="shakespeare:hamlet", help="a text file or shakespeare:PLAY (default hamlet)")
    p.add_argument("--prompts", type=int, default=4, help="prompt windows (default 4)")
    p.add_argument("--prompt-len", type=int, default=768, help="tokens per prompt (default 768)")
    p.add_argument("--gen", type=int, default=256, help="tokens generated per prompt (default 256)")
    p.add_argument("--reference", default=None, help="a JSON from a run on the bf16 cache: report agreement")
    p.add_argument("--out", default=None, help="write the JSON result here (default: stdout)")


def run(args) -> int:
    res = run_greedy(args.base_url, args.text, prompts=args.prompts, prompt_len=args.prompt_len, gen=args.gen,
                     model=args.model)
    summary = f"greedy: {args.prompts} x {args.gen} tokens"
    if args.reference:
        with open(args.reference) as f:
            res["vs_reference"] = agreement(json.load(f), res)
        vs = res["vs_reference"]
        summary += (f"; vs reference: agreement {vs['agreement']:.3f}, prefix {vs['prefix_agreement']:.3f}, "
                    f"first divergence {vs['first_divergence']}")
    text = json.dumps(res, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text if not args.out else f"{summary} -> {args.out}")
    return 0

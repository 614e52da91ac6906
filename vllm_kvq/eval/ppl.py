"""Perplexity through a running server: sliding windows of token ids, scored by vLLM's prompt logprobs.

    vllm-kvq eval ppl --base-url http://127.0.0.1:8000 --text shakespeare:hamlet --context 2048

The text is tokenized by the server (``/tokenize``), cut into windows of ``context`` tokens that advance by
``stride``; each window is one ``/v1/completions`` request with a token-id prompt, ``max_tokens=1`` and
``prompt_logprobs=0`` (the logprob of every prompt token given the ones before it). A token is scored once,
in the first window where it is not in the overlap, so every scored token but the very first sees at least
``context - stride`` tokens of context.

With ``--top-k K`` every scored position also records the K most likely tokens and their log-probs (the
same request: ``prompt_logprobs=K``; vLLM caps K at its ``--max-logprobs``, 20 by default), from which the
KL divergence against a reference run (``--reference bf16.json``, or the sweep's ``auto`` entry) is
estimated over the reference's top K plus a rest bin (``vllm_kvq.eval.kl``: a slight underestimate).

Prompt logprobs measure a quantized cache only if prefill attention reads the quantized K/V: a backend that
attends the fresh bf16 K/V during prefill shows no change at any bit width.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field

from vllm_kvq.eval import server as _server
from vllm_kvq.eval.data import load_text


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the prompt
    end: int  # one past the last
    score_from: int  # first token scored in this window (begin < score_from <= end)


def sliding_windows(n_tokens: int, context: int, stride: int | None = None,
                    max_windows: int | None = None) -> list[Window]:
    """Windows over ``n_tokens`` tokens; every token from index 1 on is scored exactly once (until
    ``max_windows`` cuts the list)."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    stride = stride or context // 2
    if not 0 < stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens, got {n_tokens}")
    out, scored_to = [], 1
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + context, n_tokens)
        out.append(Window(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n_tokens or (max_windows is not None and len(out) >= max_windows):
            break
    return out


@dataclass
class PPLResult:
    model: str
    text: str
    context: int
    stride: int
    windows: int
    tokens_scored: int
    mean_nll: float
    ppl: float
    elapsed_s: float
    window_nll: list[float] = field(default_factory=list)  # mean NLL of each window
    token_nll: list[float] = field(default_factory=list)  # every scored token, in order (for paired deltas)
    top_k: int = 0
    token_topk: list[list[list]] = field(default_factory=list)  # per scored token: [[token id, log-prob], ...]

    def to_json(self, with_tokens: bool = True) -> dict:
        d = asdict(self)
        if not with_tokens:
            d.pop("token_nll")
            d.pop("token_topk")
        return d


def topk_dicts(result: dict) -> list[dict[int, float]]:
    """A PPL result's (JSON form) per-token top-k as {token id: log-prob} dicts."""
    return [{int(t): float(lp) for t, lp in row} for row in result.get("token_topk") or []]


def kl_against(ref: dict, cand: dict) -> dict | None:
    """Mean KL(reference || candidate) and top-1 agreement over the scored tokens of two PPL results (JSON
    form) that recorded top-k; None when either did not."""
    from vllm_kvq.eval.kl import kl_from_entries

    r, c = topk_dicts(ref), topk_dicts(cand)
    if not r or not c:
        return None
    k = min(ref["top_k"], cand["top_k"])
    per_token = kl_from_entries(r, c, k)
    top1 = [max(a, key=a.get) == max(b, key=b.get) for a, b in zip(r, c)]
    return {"kl": sum(per_token) / len(per_token), "top1_agreement": sum(top1) / len(top1), "top_k": k,
            "tokens": len(per_token)}


def prompt_logprobs(base_url: str, model: str, ids: list[int], top_k: int = 0):
    """Logprob of each prompt token given the previous ones (None for the first). With ``top_k`` > 0 also
    returns, per position, the ``top_k`` most likely tokens as {token id: log-prob} (None for the first)."""
    resp = _server.completions(base_url, {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                                          "prompt_logprobs": top_k})
    plp = resp["choices"][0].get("prompt_logprobs")
    if plp is None:  # servers without vLLM's prompt_logprobs extension: the OpenAI echo form
        if top_k:
            raise RuntimeError("the server returns no prompt_logprobs: top-k (KL) needs vLLM's extension")
        resp = _server.completions(base_url, {"model": model, "prompt": ids, "max_tokens": 0, "echo": True,
                                              "logprobs": 0, "temperature": 0.0})
        return list(resp["choices"][0]["logprobs"]["token_logprobs"][:len(ids)])
    if len(plp) != len(ids):
        raise RuntimeError(f"server returned {len(plp)} prompt logprobs for {len(ids)} prompt tokens")
    out: list[float | None] = [None]
    tops: list[dict[int, float] | None] = [None]
    for tok, entry in zip(ids[1:], plp[1:]):
        if entry is None or str(tok) not in entry:
            raise RuntimeError(f"no prompt logprob for token {tok} in {entry!r}")
        out.append(float(entry[str(tok)]["logprob"]))
        if top_k:
            # the entry holds the top k plus the prompt token when it ranks lower: keep ranks 1..k
            tops.append({int(t): float(e["logprob"]) for t, e in entry.items() if e.get("rank", 1) <= top_k})
    return (out, tops) if top_k else out


def perplexity(base_url: str, token_ids: list[int], *, context: int, stride: int | None = None,
               max_windows: int | None = None, model: str | None = None, text_name: str = "",
               progress: bool = True, top_k: int = 0) -> PPLResult:
    from tqdm import tqdm

    model = _server.served_model(base_url, model)
    wins = sliding_windows(len(token_ids), context, stride, max_windows)
    t0 = time.monotonic()
    token_nll, window_nll, token_topk = [], [], []
    bar = tqdm(wins, desc=f"ppl ctx={context}", unit="win", file=sys.stderr, disable=not progress)
    for w in bar:
        lps = prompt_logprobs(base_url, model, token_ids[w.begin:w.end], top_k)
        if top_k:
            lps, tops = lps
            token_topk += [sorted(([t, lp] for t, lp in d.items()), key=lambda x: -x[1])
                           for d in tops[w.score_from - w.begin:]]
        nll = [-lp for lp in lps[w.score_from - w.begin:]]
        token_nll += nll
        window_nll.append(sum(nll) / len(nll))
        bar.set_postfix(ppl=f"{math.exp(sum(token_nll) / len(token_nll)):.3f}")
    mean = sum(token_nll) / len(token_nll)
    return PPLResult(model=model, text=text_name, context=context, stride=stride or context // 2,
                     windows=len(wins), tokens_scored=len(token_nll), mean_nll=mean, ppl=math.exp(mean),
                     elapsed_s=time.monotonic() - t0, window_nll=window_nll, token_nll=token_nll, top_k=top_k,
                     token_topk=token_topk)


def run_ppl(base_url: str, text: str, *, context: int, stride: int | None = None, max_windows: int | None = None,
            model: str | None = None, progress: bool = True, top_k: int = 0) -> PPLResult:
    """Tokenize ``text`` (a path or ``shakespeare:PLAY``) on the server and measure perplexity."""
    model = _server.served_model(base_url, model)
    ids = _server.tokenize(base_url, model, load_text(text))
    if max_windows is not None:  # the windows only need the first max_windows * stride + context tokens
        ids = ids[:max_windows * (stride or context // 2) + context]
    return perplexity(base_url, ids, context=context, stride=stride, max_windows=max_windows, model=model,
                      text_name=text, progress=progress, top_k=top_k)


def add_arguments(p) -> None:
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: the server's only model)")
    p.add_argument("--text", default="shakespeare:hamlet", help="a text file or shakespeare:PLAY (default hamlet)")
    p.add_argument("--context", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--stride", type=int, default=None, help="tokens a window advances (default context/2)")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    p.add_argument("--out", default=None, help="write the JSON result here (default: stdout)")
    p.add_argument("--token-nll", action="store_true",
                   help="include every token's NLL (and top-k) in the JSON, as --reference needs")
    p.add_argument("--top-k", type=int, default=0,
                   help="record each position's top-k next tokens (for KL; at most the server's --max-logprobs)")
    p.add_argument("--reference", default=None,
                   help="a JSON from a run on the bf16 cache (--token-nll --top-k K): report ΔPPL and KL against it")


def run(args) -> int:
    ref = None
    if args.reference:
        with open(args.reference) as f:
            ref = json.load(f)
        if not ref.get("token_nll"):
            raise SystemExit(f"--reference {args.reference} has no per-token NLLs: make it with --token-nll")
    res = run_ppl(args.base_url, args.text, context=args.context, stride=args.stride,
                  max_windows=args.max_windows, model=args.model, top_k=args.top_k)
    out = res.to_json(with_tokens=args.token_nll)
    if ref is not None:
        from vllm_kvq.eval.report import paired_delta

        delta, se = paired_delta(ref["token_nll"], res.token_nll)
        out["vs_reference"] = {"reference": args.reference, "ppl_delta": delta, "ppl_delta_se": se,
                               **(kl_against(ref, res.to_json()) or {})}
    text = json.dumps(out, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    summary = f"ppl {res.ppl:.4f} over {res.tokens_scored} tokens"
    if ref is not None:
        vs = out["vs_reference"]
        summary += f"; vs reference {vs['ppl_delta'] * 100:+.2f}% (± {vs['ppl_delta_se'] * 100:.2f})"
        if "kl" in vs:
            summary += f", KL {vs['kl']:.4f} (top-{vs['top_k']}), top-1 agreement {vs['top1_agreement']:.3f}"
    print(text if not args.out else f"{summary} -> {args.out}")
    return 0

"""Perplexity through a running server: sliding windows of token ids, scored by vLLM's prompt logprobs.

    vllm-kvq eval ppl --base-url http://127.0.0.1:8000 --text shakespeare:hamlet --context 2048

The text is tokenized by the server (``/tokenize``), cut into windows of ``context`` tokens that advance by
``stride``; each window is one ``/v1/completions`` request with a token-id prompt, ``max_tokens=1`` and
``prompt_logprobs=0`` (the logprob of every prompt token given the ones before it). A token is scored once,
in the first window where it is not in the overlap, so every scored token but the very first sees at least
``context - stride`` tokens of context.

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

    def to_json(self, with_tokens: bool = True) -> dict:
        d = asdict(self)
        if not with_tokens:
            d.pop("token_nll")
        return d


def prompt_logprobs(base_url: str, model: str, ids: list[int]) -> list[float | None]:
    """Logprob of each prompt token given the previous ones (None for the first)."""
    resp = _server.completions(base_url, {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                                          "prompt_logprobs": 0})
    plp = resp["choices"][0].get("prompt_logprobs")
    if plp is None:  # servers without vLLM's prompt_logprobs extension: the OpenAI echo form
        resp = _server.completions(base_url, {"model": model, "prompt": ids, "max_tokens": 0, "echo": True,
                                              "logprobs": 0, "temperature": 0.0})
        return list(resp["choices"][0]["logprobs"]["token_logprobs"][:len(ids)])
    if len(plp) != len(ids):
        raise RuntimeError(f"server returned {len(plp)} prompt logprobs for {len(ids)} prompt tokens")
    out: list[float | None] = [None]
    for tok, entry in zip(ids[1:], plp[1:]):
        if entry is None or str(tok) not in entry:
            raise RuntimeError(f"no prompt logprob for token {tok} in {entry!r}")
        out.append(float(entry[str(tok)]["logprob"]))
    return out


def perplexity(base_url: str, token_ids: list[int], *, context: int, stride: int | None = None,
               max_windows: int | None = None, model: str | None = None, text_name: str = "",
               progress: bool = True) -> PPLResult:
    from tqdm import tqdm

    model = _server.served_model(base_url, model)
    wins = sliding_windows(len(token_ids), context, stride, max_windows)
    t0 = time.monotonic()
    token_nll, window_nll = [], []
    bar = tqdm(wins, desc=f"ppl ctx={context}", unit="win", file=sys.stderr, disable=not progress)
    for w in bar:
        lps = prompt_logprobs(base_url, model, token_ids[w.begin:w.end])
        nll = [-lp for lp in lps[w.score_from - w.begin:]]
        token_nll += nll
        window_nll.append(sum(nll) / len(nll))
        bar.set_postfix(ppl=f"{math.exp(sum(token_nll) / len(token_nll)):.3f}")
    mean = sum(token_nll) / len(token_nll)
    return PPLResult(model=model, text=text_name, context=context, stride=stride or context // 2,
                     windows=len(wins), tokens_scored=len(token_nll), mean_nll=mean, ppl=math.exp(mean),
                     elapsed_s=time.monotonic() - t0, window_nll=window_nll, token_nll=token_nll)


def run_ppl(base_url: str, text: str, *, context: int, stride: int | None = None, max_windows: int | None = None,
            model: str | None = None, progress: bool = True) -> PPLResult:
    """Tokenize ``text`` (a path or ``shakespeare:PLAY``) on the server and measure perplexity."""
    model = _server.served_model(base_url, model)
    ids = _server.tokenize(base_url, model, load_text(text))
    if max_windows is not None:  # the windows only need the first max_windows * stride + context tokens
        ids = ids[:max_windows * (stride or context // 2) + context]
    return perplexity(base_url, ids, context=context, stride=stride, max_windows=max_windows, model=model,
                      text_name=text, progress=progress)


def add_arguments(p) -> None:
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="served model name (default: the server's only model)")
    p.add_argument("--text", default="shakespeare:hamlet", help="a text file or shakespeare:PLAY (default hamlet)")
    p.add_argument("--context", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--stride", type=int, default=None, help="tokens a window advances (default context/2)")
    p.add_argument("--max-windows", type=int, default=None, help="stop after this many windows")
    p.add_argument("--out", default=None, help="write the JSON result here (default: stdout)")
    p.add_argument("--token-nll", action="store_true", help="include every token's NLL in the JSON")


def run(args) -> int:
    res = run_ppl(args.base_url, args.text, context=args.context, stride=args.stride,
                  max_windows=args.max_windows, model=args.model)
    text = json.dumps(res.to_json(with_tokens=args.token_nll), indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text if not args.out else f"ppl {res.ppl:.4f} over {res.tokens_scored} tokens -> {args.out}")
    return 0

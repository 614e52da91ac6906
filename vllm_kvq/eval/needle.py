"""Needle (passkey) retrieval through greedy generation.

    vllm-kvq eval needle --base-url http://127.0.0.1:8000 --lengths 1k,2k,4k,8k

A five-digit pass key is hidden at a relative depth of a haystack; the prompt ends by asking for it and the
model continues greedily. A trial is correct when the first number in the continuation is the key. The
default haystack is the classic passkey filler (Mohtashami & Jaggi, 2023); ``--haystack shakespeare:PLAY``
hides it in a play instead, which is harder for small models.

Unlike prompt-logprob perplexity, this reads the cache during decode, after the whole prompt was written to
it, so it measures the quantized cache on every path.

With ``--key-nll`` each prompt is also sent once more with the key appended after the question and
``prompt_logprobs``: the key's summed NLL (teacher-forced) is a continuous measure of the same retrieval, which
a paired comparison against the bf16 cache can resolve where 10-20 yes/no answers cannot (docs/quality.md,
"The needle measured continuously"). It doubles the requests (prompt-logprob requests skip the prefix cache).
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass

from vllm_kvq.eval import server as _server
from vllm_kvq.eval.data import load_text

INSTRUCTION = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the pass key.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def parse_lengths(spec: str) -> list[int]:
    """``"1k,2k,4k,1500"`` -> [1024, 2048, 4096, 1500]."""
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)(k?)", part)
        if not m:
            raise ValueError(f"bad length {part!r}: use numbers of tokens like 1500 or 4k")
        out.append(int(float(m.group(1)) * (1024 if m.group(2) else 1)))
    if not out:
        raise ValueError("no lengths given")
    return out


def haystack_units(haystack: str) -> list[str]:
    """Pieces the haystack is built from: the filler sentence block, or the non-empty lines of a text."""
    if haystack == "repeat":
        return [FILLER]
    lines = [ln.strip() for ln in load_text(haystack).splitlines()]
    return [ln + "\n" for ln in lines if ln]


@dataclass(frozen=True)
class NeedlePrompt:
    text: str
    key: str
    target_tokens: int
    depth: float


def build_prompt(units: list[str], n_units: int, depth: float, key: str, target_tokens: int) -> NeedlePrompt:
    """Instruction + ``n_units`` haystack units (cycled) with the needle before unit round(depth * n_units)
    + question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    hay = [units[i % len(units)] for i in range(n_units)]
    at = round(depth * n_units)
    body = "".join(hay[:at]) + NEEDLE.format(key=key) + "".join(hay[at:])
    return NeedlePrompt(INSTRUCTION + body + QUESTION, key, target_tokens, depth)


def score(output: str, key: str) -> bool:
    """Correct when the first number in the continuation is the key."""
    m = re.search(r"\d+", output)
    return m is not None and m.group(0) == key


def fit_units(count_tokens, units: list[str], target: int, key: str = "12345") -> int:
    """How many haystack units make a prompt of about ``target`` tokens (never over it).
    ``count_tokens(text) -> int``; a few calls (secant steps on the measured length)."""
    lo_n, lo_t = 0, count_tokens(build_prompt(units, 0, 0.5, key, target).text)
    if lo_t > target:
        raise ValueError(f"target length {target} is shorter than the bare prompt ({lo_t} tokens)")
    probe = min(len(units) * 4, 64) if len(units) > 1 else 8
    per_unit = (count_tokens(build_prompt(units, probe, 0.5, key, target).text) - lo_t) / probe
    n = int((target - lo_t) / per_unit)  # an estimate; the haystack's pieces differ in length
    for _ in range(6):
        t = count_tokens(build_prompt(units, n, 0.5, key, target).text)
        if t <= target and target - t <= max(per_unit, 8):
            return n
        n = max(0, n + int((target - t) / per_unit) - (1 if t > target else 0))
    while n > 0 and count_tokens(build_prompt(units, n, 0.5, key, target).text) > target:
        n -= 1
    return n


@dataclass
class Trial:
    length: int
    tokens: int
    depth: float
    key: str
    output: str
    correct: bool
    key_nll: float | None = None  # with key_nll: the key's summed NLL after the question, teacher-forced


def key_nll(base_url: str, model: str, text: str, key: str) -> float:
    """Summed NLL of the key's tokens appended (after a space) to the prompt ``text``, from the server's prompt
    logprobs; the prompt's own tokens must be a prefix of the tokens with the key."""
    from vllm_kvq.eval.ppl import prompt_logprobs

    head = _server.tokenize(base_url, model, text)
    full = _server.tokenize(base_url, model, text + " " + key)
    if full[:len(head)] != head or len(full) == len(head):
        raise RuntimeError("the key's tokens do not extend the prompt's: the tokenizer merges across them")
    return -sum(prompt_logprobs(base_url, model, full)[len(head):])


def run_needle(base_url: str, lengths: list[int], *, depths=DEFAULT_DEPTHS, trials: int = 1,
               haystack: str = "repeat", model: str | None = None, seed: int = 0, max_tokens: int = 12,
               progress: bool = True, with_key_nll: bool = False) -> dict:
    from tqdm import tqdm

    model = _server.served_model(base_url, model)
    units = haystack_units(haystack)

    def count(text: str) -> int:
        return len(_server.tokenize(base_url, model, text))

    rng = random.Random(seed)
    t0 = time.monotonic()
    limit = _server.max_model_len(base_url, model)
    plan = []
    for length in lengths:
        # "8k" on an 8192-token model: the prompt and the generated tokens must fit together
        n = fit_units(count, units, min(length, limit - max_tokens) if limit else length)
        for depth in depths:
            for _ in range(trials):
                plan.append(build_prompt(units, n, depth, str(rng.randint(10000, 99999)), length))
    out: list[Trial] = []
    bar = tqdm(plan, desc="needle", unit="prompt", file=sys.stderr, disable=not progress)
    for p in bar:
        resp = _server.completions(base_url, {"model": model, "prompt": p.text, "max_tokens": max_tokens,
                                              "temperature": 0.0})
        text = resp["choices"][0]["text"]
        nll = key_nll(base_url, model, p.text, p.key) if with_key_nll else None
        out.append(Trial(p.target_tokens, resp["usage"]["prompt_tokens"], p.depth, p.key, text, score(text, p.key),
                         nll))
        bar.set_postfix(acc=f"{sum(t.correct for t in out) / len(out):.2f}")
    return summarize(out, model=model, haystack=haystack, elapsed_s=time.monotonic() - t0)


def summarize(trials: list[Trial], **meta) -> dict:
    def acc(ts):
        return sum(t.correct for t in ts) / len(ts) if ts else float("nan")

    lengths = sorted({t.length for t in trials})
    depths = sorted({t.depth for t in trials})
    extra = {}
    if trials and all(t.key_nll is not None for t in trials):
        extra["key_nll_by_length"] = {str(n): sum(t.key_nll for t in trials if t.length == n) /
                                      sum(t.length == n for t in trials) for n in lengths}
    return {**meta, **extra,
            "accuracy": acc(trials),
            "accuracy_by_length": {str(n): acc([t for t in trials if t.length == n]) for n in lengths},
            "accuracy_by_length_depth": {str(n): {f"{d:g}": acc([t for t in trials if t.length == n and t.depth == d])
                                                  for d in depths} for n in lengths},
            "trials": [asdict(t) for t in trials]}


def add_arguments(p) -> None:
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--lengths", default="1k,2k,4k,8k", help="prompt lengths in tokens (default 1k,2k,4k,8k)")
    p.add_argument("--depths", default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
                   help="relative needle depths (default 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--trials", type=int, default=1, help="keys per (length, depth)")
    p.add_argument("--haystack", default="repeat", help="'repeat' (passkey filler) or shakespeare:PLAY or a file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--key-nll", action="store_true",
                   help="also score the key teacher-forced after the question (its summed NLL; one more request each)")
    p.add_argument("--out", default=None, help="write the JSON result here (default: stdout)")


def run(args) -> int:
    res = run_needle(args.base_url, parse_lengths(args.lengths), depths=[float(d) for d in args.depths.split(",")],
                     trials=args.trials, haystack=args.haystack, model=args.model, seed=args.seed,
                     with_key_nll=args.key_nll)
    text = json.dumps(res, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
        nll = f", key NLL {res['key_nll_by_length']}" if "key_nll_by_length" in res else ""
        print(f"needle accuracy {res['accuracy']:.3f} {res['accuracy_by_length']}{nll} -> {args.out}")
    else:
        print(text)
    return 0

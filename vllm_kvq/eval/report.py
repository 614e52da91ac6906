"""Turn sweep results into a Markdown table, a goal check and a memory-fidelity frontier plot.

A result is one dict per served cache (what ``sweep.evaluate`` returns):

    {"label": "turboquant3", "dtype": "turboquant3", "bytes_per_token": 5040, "error": None,
     "kv_cache_tokens": 23296, "ppl": {"ppl": ..., "token_nll": [...], ...},
     "needle": {"accuracy": ..., "accuracy_by_length": {"1024": ...}},
     "greedy": {"starts": [...], "outputs": [[token ids], ...], ...},
     "lmeval": {"headline": {"kvq_shakespeare_mc": ...}}}

The reference for deltas is the ``auto`` (bf16) entry. Perplexity deltas are paired per token: both runs
score the same tokens, so the standard error of the mean NLL difference is small even when PPL itself is
noisy across windows (tokens are correlated, so treat it as a lower bound). With per-token top-k in both
runs the KL divergence of next-token distributions (top-k + rest bin, ``eval.kl``) and top-1 agreement are
derived too, and greedy continuations are compared token by token (``eval.greedy.agreement``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# The quality issues' targets: (capacity vs the bf16 cache in vLLM KV tokens at least, ΔPPL at most). A tier is
# met when some entry of at least that capacity stays within its ΔPPL; the FibQuant tier is the last one.
TIER_GOALS = ((3.7, 0.015), (4.5, 0.04), (5.8, 0.12), (7.0, 0.25))
# Tiers whose best entry must also retrieve the needle as well as bf16 does, at every measured length.
NEEDLE_TIERS = (3.7, 4.5)
REFERENCE = "auto"


def paired_delta(ref_nll: list[float], nll: list[float]) -> tuple[float, float]:
    """(relative PPL change, its standard error) from per-token NLLs of the same tokens."""
    n = min(len(ref_nll), len(nll))
    if n == 0:
        return float("nan"), float("nan")
    if len(ref_nll) != len(nll):
        raise ValueError(f"runs scored different tokens ({len(ref_nll)} vs {len(nll)}): cannot pair them")
    d = [b - a for a, b in zip(ref_nll, nll)]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    se = math.sqrt(var / n)
    return math.expm1(mean), math.exp(mean) * se


def _ref(results: list[dict]) -> dict | None:
    for r in results:
        if r["label"] == REFERENCE and not r.get("error"):
            return r
    return None


def derived(results: list[dict]) -> list[dict]:
    """Adds compression (bytes), capacity (vLLM's KV tokens against the reference's, else the bytes ratio), ppl
    delta (and SE), KL and greedy agreement to each result (copies). Rows already derived (``combine``) pass
    through unchanged."""
    if results and all(r.get("derived") for r in results):
        return results
    ref = _ref(results)
    out = []
    for r in results:
        r = dict(r, derived=True)
        if ref and r.get("bytes_per_token"):
            r["compression"] = ref["bytes_per_token"] / r["bytes_per_token"]
        if ref and r.get("kv_cache_tokens") and ref.get("kv_cache_tokens"):
            r["capacity"] = r["kv_cache_tokens"] / ref["kv_cache_tokens"]
        elif r.get("compression"):
            r["capacity"] = r["compression"]
        ppl, rppl = r.get("ppl"), (ref or {}).get("ppl")
        if ppl and rppl and ppl.get("token_nll") and rppl.get("token_nll"):
            r["ppl_delta"], r["ppl_delta_se"] = paired_delta(rppl["token_nll"], ppl["token_nll"])
        elif ppl and rppl:
            r["ppl_delta"], r["ppl_delta_se"] = ppl["ppl"] / rppl["ppl"] - 1, float("nan")
        if ppl and rppl and r is not ref:
            from vllm_kvq.eval.ppl import kl_against

            vs = kl_against(rppl, ppl)
            if vs:
                r["kl"], r["top1_agreement"], r["kl_top_k"] = vs["kl"], vs["top1_agreement"], vs["top_k"]
        g, rg = r.get("greedy"), (ref or {}).get("greedy")
        if g and rg and r is not ref:
            from vllm_kvq.eval.greedy import agreement

            r["greedy_vs_ref"] = agreement(rg, g)
        out.append(r)
    return out


def _f(x, fmt: str, missing: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return format(x, fmt)


def markdown_table(results: list[dict]) -> str:
    rows = derived(results)
    lengths = sorted({int(n) for r in rows for n in ((r.get("needle") or {}).get("accuracy_by_length") or {})})
    tasks = sorted({t for r in rows for t in ((r.get("lmeval") or {}).get("headline") or {})})
    top_k = next((r["kl_top_k"] for r in rows if r.get("kl_top_k")), None)
    has_greedy = any(r.get("greedy_vs_ref") for r in rows)
    gen = next((r["greedy_vs_ref"]["gen"] for r in rows if r.get("greedy_vs_ref")), None)
    head = (["cache", "bytes/token", "compression", "KV tokens", "capacity", "PPL", "ΔPPL vs auto"]
            + ([f"KL (top-{top_k})", "top-1 agree"] if top_k else [])
            + ([f"greedy agree (prefix)", f"first divergence / {gen}"] if has_greedy else [])
            + [f"needle {n // 1024}k" if n % 1024 == 0 else f"needle {n}" for n in lengths]
            + [_task_label(t) for t in tasks] + ["note"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        ppl, needle, lm = r.get("ppl") or {}, r.get("needle") or {}, (r.get("lmeval") or {}).get("headline") or {}
        delta = r.get("ppl_delta")
        dtext = "-" if delta is None or math.isnan(delta) else (
            f"{delta * 100:+.2f}%" + (f" ± {r['ppl_delta_se'] * 100:.2f}" if not math.isnan(r.get("ppl_delta_se", math.nan)) else ""))
        if r["label"] == REFERENCE and ppl:
            dtext = "(reference)"
        note = r.get("error") or r.get("note") or ""
        note = note.replace("|", "/").replace("\n", " ")
        if len(note) > 160:
            note = note[:157] + "..."
        cells = [f"`{r['label']}`", _f(r.get("bytes_per_token"), "d"), _f(r.get("compression"), ".2f") + "x"
                 if r.get("compression") else "-", _f(r.get("kv_cache_tokens"), ",d"),
                 _f(r.get("capacity"), ".2f") + "x" if r.get("capacity") else "-", _f(ppl.get("ppl"), ".3f"), dtext]
        ref_row = r["label"] == REFERENCE
        if top_k:
            cells += ["0" if ref_row else _f(r.get("kl"), ".4f"), "1" if ref_row else _f(r.get("top1_agreement"), ".3f")]
        if has_greedy:
            g = r.get("greedy_vs_ref")
            if ref_row:
                cells += ["1", "-"]
            elif g:
                cells += [f"{g['agreement']:.3f} ({g['prefix_agreement']:.3f})",
                          f"median {g['first_divergence_median']:g}: " + ", ".join(map(str, g["first_divergence"]))]
            else:
                cells += ["-", "-"]
        cells += [_f((needle.get("accuracy_by_length") or {}).get(str(n)), ".2f") for n in lengths]
        cells += [_f(lm.get(t), ".4f") for t in tasks]
        cells.append(note)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _task_label(task: str) -> str:
    from vllm_kvq.eval.lmeval import HEADLINE

    metric = HEADLINE.get(task, ("score",))[0]
    return f"{task.removeprefix('kvq_')} {metric}"


def goal_check(results: list[dict]) -> list[str]:
    """One line per capacity tier (TIER_GOALS): the entry of at least that capacity with the least ΔPPL, met or
    MISSED; then, for NEEDLE_TIERS, whether that entry retrieves the needle as well as bf16."""
    rows = derived(results)
    ref = next((r for r in rows if r["label"] == REFERENCE and not r.get("error")), None)
    measured = [r for r in rows if r is not ref and not r.get("error") and r.get("capacity")
                and r.get("ppl_delta") is not None and not math.isnan(r["ppl_delta"])]
    out, best_of = [], {}
    for tier, goal in TIER_GOALS:
        head = f"- ≥ {tier:g}x capacity, ΔPPL ≤ {goal:+.1%}:"
        fits = [r for r in measured if r["capacity"] >= tier]
        if not fits:
            failed = [r["label"] for r in rows if r.get("error")]
            out.append(f"{head} not measured (no entry of that capacity"
                       + (f"; failed: {', '.join(failed)})" if failed else ")"))
            continue
        best = best_of[tier] = min(fits, key=lambda r: r["ppl_delta"])
        verdict = "met" if best["ppl_delta"] <= goal else "MISSED"
        out.append(f"{head} **{verdict}**, best `{best['label']}` ({best['capacity']:.2f}x) "
                   f"{best['ppl_delta'] * 100:+.2f}% (± {best.get('ppl_delta_se', math.nan) * 100:.2f})")
    for tier in NEEDLE_TIERS:
        r = best_of.get(tier)
        head = f"- ≥ {tier:g}x capacity, needle = bf16"
        if r is None or not r.get("needle") or not ref or not ref.get("needle"):
            out.append(f"{head}: not measured" + (f" for `{r['label']}`" if r else ""))
            continue
        a, b = r["needle"]["accuracy_by_length"], ref["needle"]["accuracy_by_length"]
        # "equal to bf16" means no length where the quantized cache retrieves less; more is reported as such
        worse = [n for n in b if a.get(n, -1.0) < b[n]]
        better = [n for n in b if a.get(n, -1.0) > b[n]]
        verdict = "MISSED" if worse else "met" + (f" (better than bf16 at {', '.join(better)} tokens)" if better else "")
        out.append(f"{head}: **{verdict}**, `{r['label']}` {_acc_text(a)} vs auto {_acc_text(b)}")
    return out


def _acc_text(by_length: dict) -> str:
    return ", ".join(f"{int(n) // 1024 if int(n) % 1024 == 0 else n}{'k' if int(n) % 1024 == 0 else ''}: {v:.2f}"
                     for n, v in by_length.items())


def plot_frontier(results: list[dict], path, title: str = "KV cache: memory vs fidelity") -> None:
    """Fidelity vs capacity (vLLM KV tokens against the bf16 cache's, else the bytes ratio): relative PPL change
    with the tier goals, KL vs bf16, greedy agreement, needle accuracy (panels without data are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in derived(results) if not r.get("error") and r.get("capacity")]
    # (y label, value of a row or None, log scale)
    panels = [("ΔPPL vs bf16 cache (%)  [red: tier goals]",
               lambda r: None if r.get("ppl_delta") is None or math.isnan(r["ppl_delta"]) else r["ppl_delta"] * 100,
               False),
              ("KL vs bf16 cache (nats/token, top-k)", lambda r: r.get("kl"), True),
              ("greedy prefix agreement vs bf16", lambda r: (r.get("greedy_vs_ref") or {}).get("prefix_agreement"),
               False),
              ("needle accuracy (all lengths, depths)", lambda r: (r.get("needle") or {}).get("accuracy"), False)]
    panels = [p for p in panels if any(p[1](r) is not None for r in rows)] or panels[:1]
    cols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.5 * nrows), squeeze=False)
    xs = sorted({round(r["capacity"], 2) for r in rows})
    for ax, (ylabel, value, log) in zip(axes.flat, panels):
        for r in rows:
            y = value(r)
            if y is None or (log and y <= 0):
                continue
            x = r["capacity"]
            if ylabel.startswith("ΔPPL"):
                ax.errorbar(x, y, yerr=(r.get("ppl_delta_se") or 0) * 100, fmt="o", capsize=3)
            else:
                ax.plot(x, y, "o")
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if ylabel.startswith("ΔPPL"):
            edges = [t for t, _ in TIER_GOALS] + [max(xs + [TIER_GOALS[-1][0]]) * 1.1]
            for (tier, goal), end in zip(TIER_GOALS, edges[1:]):
                ax.hlines(goal * 100, tier, end, color="red", lw=1.5)
            ax.axhline(0, color="gray", lw=0.8)
        if log:
            ax.set_yscale("log")
        if "agreement" in ylabel or "accuracy" in ylabel:
            ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("capacity: KV tokens vs the bf16 cache (x)")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:.2f}" for x in xs], fontsize=6, rotation=90)  # the measured capacities
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def load_dir(path) -> list[dict]:
    """The ``<label>.json`` results a sweep wrote under ``path``."""
    found = []
    for f in sorted(Path(path).glob("*.json")):
        r = json.loads(f.read_text())
        if isinstance(r, dict) and "label" in r and "dtype" in r:
            found.append(r)
    if not found:
        raise ValueError(f"{path}: no sweep results (<label>.json files written by `vllm-kvq eval sweep`)")
    return found


def combine(sweeps: list[list[dict]], names: list[str]) -> list[dict]:
    """Rows of several sweeps in one list, each derived against its own ``auto`` entry (so runs measured on
    different days pair their tokens correctly). The first sweep's ``auto`` row stays; a later one is dropped
    when it scored the same tokens with the same NLLs, else kept under ``auto [name]``. A later label equal to
    an earlier one gets `` [name]``."""
    out, seen = [], {}
    for results, name in zip(sweeps, names):
        if _ref(results) is None:
            raise ValueError(f"{name}: no `auto` entry to measure against (run the sweep with --dtypes auto,...)")
        for r in derived(results):
            label = r["label"]
            if label in seen:
                if label == REFERENCE and (seen[label].get("ppl") or {}).get("token_nll") == (r.get("ppl") or {}).get(
                        "token_nll"):
                    continue
                r = dict(r, label=f"{label} [{name}]")
            seen.setdefault(r["label"], r)
            out.append(r)
    return out


def add_arguments(p) -> None:
    p.add_argument("dirs", nargs="+", help="sweep output dirs (their <label>.json files)")
    p.add_argument("--out-dir", default="kvq-report", help="where report.md and frontier.png go")
    p.add_argument("--title", default="KV cache: capacity vs fidelity")


def run(args) -> int:
    names = [Path(d).name for d in args.dirs]
    rows = combine([load_dir(d) for d in args.dirs], names)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_frontier(rows, out / "frontier.png", title=args.title)
    md = [f"# {args.title}", "", "Sweeps: " + ", ".join(f"`{d}`" for d in args.dirs)
          + " (each ΔPPL, KL and capacity against its own `auto` entry).", "", markdown_table(rows), "",
          "Goals:", "", *goal_check(rows), "", "![frontier](frontier.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0

"""KL divergence of next-token distributions against a reference run, from top-k log-probabilities.

A server returns only the k most likely tokens per position (vLLM: ``prompt_logprobs=k``, at most its
``--max-logprobs``, 20 by default), so the full-vocabulary KL is approximated on a coarser partition: the
reference's top-k tokens, each its own bin, plus one bin for the rest of the vocabulary:

    KL_k(P || Q) = sum_{t in top_k(P)} p_t log(p_t / q_t) + p_rest log(p_rest / q_rest)

With exact q_t this is a lower bound of the full KL (merging bins never increases a KL divergence), and it
converges to it as k grows: the tokens outside a small model's top 20 rarely carry much probability. Through
the server q_t is known only for tokens in the candidate's own top k; a reference token missing there gets
the candidate's k-th log-probability, an upper bound of its true q_t, which again errs low. The simulator
(``vllm_kvq.fake_quant.score``) uses the same formula with exact q_t.
"""

from __future__ import annotations

import math

import torch

# floor on the rest bins' probability, so an all-mass-in-top-k row costs nothing rather than nan
_EPS = 1e-12


def bucket_kl(ref_lp: torch.Tensor,  # (M, K) reference log-probs of its top-K tokens
              cand_lp: torch.Tensor  # (M, K) candidate log-probs of the same tokens
              ) -> torch.Tensor:
    """(M,) KL(reference || candidate) over the K tokens plus a rest bin, in nats, never negative."""
    ref_lp, cand_lp = ref_lp.double(), cand_lp.double()
    p, q = ref_lp.exp(), cand_lp.exp()
    head = (p * (ref_lp - cand_lp)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp(min=_EPS)
    q_rest = (1 - q.sum(-1)).clamp(min=_EPS)
    return (head + p_rest * (p_rest.log() - q_rest.log())).clamp(min=0).float()


def kl_from_entries(ref: list[dict[int, float]], cand: list[dict[int, float]], k: int) -> list[float]:
    """Per-position KL from server top-k dicts ({token id: log-prob}, one per scored position)."""
    if len(ref) != len(cand):
        raise ValueError(f"runs scored different positions ({len(ref)} vs {len(cand)}): cannot pair them")
    ref_rows, cand_rows = [], []
    for r, c in zip(ref, cand):
        top = sorted(r.items(), key=lambda kv: -kv[1])[:k]
        vals = sorted(c.values(), reverse=True)[:k]  # c may also hold the prompt token, ranked below k
        floor = vals[-1] if vals else -math.inf  # a token outside c's top k is at most this likely
        ref_rows.append([lp for _, lp in top])
        cand_rows.append([c.get(t, floor) for t, _ in top])
    width = min(len(x) for x in ref_rows) if ref_rows else 0
    if width == 0:
        return [float("nan")] * len(ref)
    return bucket_kl(torch.tensor([x[:width] for x in ref_rows]),
                     torch.tensor([x[:width] for x in cand_rows])).tolist()

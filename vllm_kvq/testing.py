"""Test references and batch builders, shared by the tests and the kernels' tests (STYLE habit 1).

Everything here is plain PyTorch in float32 and deliberately simple (one sequence at a time, dense
softmax): it is the yardstick the paged ops are measured against, not something to make fast.

    batch = random_paged_batch(seq_lens=[5, 17], query_lens=[5, 1], block_size=16)
    ref = paged_reference(q, k_ctx, v_ctx, batch, scale)      # dense attention, per sequence
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def attention_probs(q: torch.Tensor,  # (N, Hq, D)
                    k: torch.Tensor,  # (L, Hk, D)
                    q_pos: torch.Tensor,  # (N,) position of each query in the sequence of k
                    scale: float) -> torch.Tensor:
    """Causal softmax weights of one sequence in float32 -> (Hq, N, L).

    Query head h reads KV head ``h // (Hq // Hk)`` (vLLM's grouping). Key j is visible to query i when
    ``j <= q_pos[i]``; a query that sees no key (``q_pos < 0``) gets all-zero weights.
    """
    hq, hk = q.shape[1], k.shape[1]
    if hq % hk:
        raise ValueError(f"Hq={hq} is not a multiple of Hk={hk}")
    kf = k.float().repeat_interleave(hq // hk, dim=1)  # (L, Hq, D)
    scores = torch.einsum("nhd,lhd->hnl", q.float(), kf) * scale
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos.to(q.device)[:, None]  # (N, L)
    scores = scores.masked_fill(~visible[None], -torch.inf)
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows give NaN: make them zero


def dense_attention(q: torch.Tensor,  # (N, Hq, D)
                    k: torch.Tensor,  # (L, Hk, D)
                    v: torch.Tensor,  # (L, Hk, D)
                    q_pos: torch.Tensor,  # (N,) position of each query in the sequence of k/v
                    scale: float) -> torch.Tensor:
    """Causal GQA attention of one sequence in float32 -> (N, Hq, D); masking as in ``attention_probs``."""
    p = attention_probs(q, k, q_pos, scale)
    vf = v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return torch.einsum("hnl,lhd->nhd", p, vf)


@dataclass
class PagedBatch:
    """One step of a paged engine: S sequences, each with ``query_lens[i]`` new tokens at the end of a
    context of ``seq_lens[i]`` tokens (prefill: q == seq, chunked prefill: 1 < q < seq, decode: q == 1).

    Blocks are handed out in a random order so a sequence's blocks are not contiguous in the cache.
    """

    seq_lens: torch.Tensor  # (S,) int32, context length including the new tokens
    query_lens: list[int]
    query_start_loc: torch.Tensor  # (S + 1,) int32
    block_table: torch.Tensor  # (S, max_blocks) int32; unused entries are 0 (vLLM pads with 0)
    block_size: int
    num_blocks: int
    ctx_slots: torch.Tensor  # (sum(seq_lens),) int64: slot of every context token, sequences concatenated
    ctx_start: list[int]  # offset of each sequence in ctx_slots (length S + 1)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def query_positions(self) -> torch.Tensor:
        """(N,) position of each new token in its sequence."""
        parts = [torch.arange(int(s) - q, int(s)) for s, q in zip(self.seq_lens.tolist(), self.query_lens)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def new_token_slots(self) -> torch.Tensor:
        """(N,) slot of each new token: what an engine passes to ``store`` in this step."""
        parts = [self.ctx_slots[e - q:e] for e, q in zip(self.ctx_start[1:], self.query_lens)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def block_offsets(self) -> torch.Tensor:
        """(sum(seq_lens),) offset of every context token within its block (sequences concatenated)."""
        parts = [torch.arange(int(s)) % self.block_size for s in self.seq_lens.tolist()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def new_token_index(self) -> torch.Tensor:
        """(N,) index of each new token into the concatenated context (rows of k_ctx)."""
        parts = [torch.arange(e - q, e) for e, q in zip(self.ctx_start[1:], self.query_lens)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def random_paged_batch(seq_lens: list[int], query_lens: list[int], block_size: int, *,
                       extra_blocks: int = 3, generator: torch.Generator | None = None) -> PagedBatch:
    """A batch with shuffled block assignment and ``extra_blocks`` blocks no sequence owns."""
    if len(seq_lens) != len(query_lens) or any(not 0 <= q <= s for s, q in zip(seq_lens, query_lens)):
        raise ValueError(f"need 0 <= query_lens[i] <= seq_lens[i]; got {query_lens} and {seq_lens}")
    per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=generator)
    max_blocks = max(per_seq, default=0) + 1  # one spare column, as engines over-allocate the table
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    slots, starts, used = [], [0], 0
    for i, (s, nb) in enumerate(zip(seq_lens, per_seq)):
        blocks = perm[used:used + nb]
        used += nb
        table[i, :nb] = blocks.to(torch.int32)
        pos = torch.arange(s)
        slots.append(blocks[pos // block_size].long() * block_size + pos % block_size)
        starts.append(starts[-1] + s)
    qsl = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return PagedBatch(
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), query_lens=list(query_lens), query_start_loc=qsl,
        block_table=table, block_size=block_size, num_blocks=num_blocks,
        ctx_slots=torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long), ctx_start=starts)


def _sequences(batch: "PagedBatch"):
    """Per sequence with new tokens: (its query rows, its context rows in the concatenated K/V, the new
    tokens' positions)."""
    qsl = batch.query_start_loc.tolist()
    for i, s in enumerate(batch.seq_lens.tolist()):
        q0, q1 = qsl[i], qsl[i + 1]
        if q1 > q0:
            c0 = batch.ctx_start[i]
            yield slice(q0, q1), slice(c0, c0 + s), torch.arange(s - (q1 - q0), s)


def paged_reference(query: torch.Tensor,  # (N, Hq, D) new tokens, in batch order
                    k_ctx: torch.Tensor,  # (sum(seq_lens), Hk, D) every context token, sequences concatenated
                    v_ctx: torch.Tensor,  # (sum(seq_lens), Hk, D)
                    batch: PagedBatch, scale: float) -> torch.Tensor:
    """What ``ops.paged_attention`` must return for ``batch``, from dense K/V -> (N, Hq, D) float32."""
    out = torch.zeros(query.shape, dtype=torch.float32)
    for rows, ctx, pos in _sequences(batch):
        out[rows] = dense_attention(query[rows], k_ctx[ctx], v_ctx[ctx], pos, scale)
    return out


def paged_probs_sq(query: torch.Tensor, k_ctx: torch.Tensor, batch: PagedBatch, scale: float) -> torch.Tensor:
    """(N, Hq) sum_j p_ij^2 of each query row: the effective 1 / (number of keys attended), which sets how
    much independent per-token codec errors average out in the attention output."""
    out = torch.zeros(query.shape[:2], dtype=torch.float32)
    for rows, ctx, pos in _sequences(batch):
        out[rows] = attention_probs(query[rows], k_ctx[ctx], pos, scale).pow(2).sum(-1).T
    return out


def roundtrip(fmt, k: torch.Tensor, v: torch.Tensor,
              block_offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (L, Hk, D) -> what the format's cache gives back, per head (float32): the codecs' quantize +
    dequantize, except, for a format with sinks, rows whose ``block_offsets`` (L,) are below
    ``fmt.sink_tokens``: those are the bf16 records (rotated, rounded, rotated back, state undone)."""
    from vllm_kvq import fake_quant

    kh, vh = torch.empty(k.shape), torch.empty(v.shape)
    sink = None
    if getattr(fmt, "sink_tokens", 0):
        if block_offsets is None:
            raise ValueError(f"format {fmt.name!r} keeps sink records: pass block_offsets")
        sink = block_offsets < fmt.sink_tokens
    for h in range(fmt.num_kv_heads):
        for x, out, c in ((k, kh, fmt.keys[h]), (v, vh, fmt.values[h])):
            out[:, h] = c.dequantize(c.quantize(x[:, h]))
            if sink is not None and bool(sink.any()):
                out[sink, h] = fake_quant.sink_roundtrip(c, x[sink, h])
    return kh, vh


def relative_mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """E ||x - x_hat||^2 / ||x||^2 over rows of (N, D): the distortion the codec targets quote."""
    x, x_hat = x.double(), x_hat.double()
    return float(((x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1)).mean())


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the whole tensor (the attention-output error of FACTS section 7)."""
    return float((out.double() - ref.double()).norm() / ref.double().norm())


__all__ = ["attention_probs", "dense_attention", "PagedBatch", "random_paged_batch", "paged_reference",
           "paged_probs_sq", "roundtrip", "relative_mse", "relative_error"]

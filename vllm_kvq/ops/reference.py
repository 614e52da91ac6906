"""Reference paged ops in vectorized PyTorch: they define what every kernel must compute.

Shapes (one-letter sizes mean the same everywhere):
  N new tokens, S sequences, Hq query heads, Hk KV heads, D head size, B blocks, T tokens per block,
  C slot bytes. The cache is any strided view of shape (B, Hk, T, C), uint8.

Attention works in each codec's rotated domain: the query is rotated once per head group, scores come
from the rotated-domain codes, values are summed there and the output is rotated back once. The context
is read in chunks of blocks with an online softmax, so no dense copy of a whole context is ever built.

Codecs bound to per-head state (``VectorCodec.bind``) store ``(x - shift) / scale``; attention multiplies
the query by the key codec's ``scale`` before rotating it, never adds a key shift back (it moves all of a
query's scores equally) and adds the value codec's ``shift`` to each output row (weights sum to one): the
codec's ``store_transform`` / ``query_transform`` / ``output_transform`` hooks, per head.
"""

from __future__ import annotations

import math

import torch

from vllm_kvq.kv_format import KVFormat

# Context tokens per chunk of the online softmax (a multiple of any block size we use).
CHUNK_TOKENS = 2048


def store(key: torch.Tensor,  # (N, Hk, D)
          value: torch.Tensor,  # (N, Hk, D)
          cache: torch.Tensor,  # (B, Hk, T, C) uint8, any strides
          slot_mapping: torch.Tensor,  # (N,) int; slot = block * T + offset; -1 = padding, skipped
          fmt: KVFormat) -> None:
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    if key.shape[0] == 0:
        return
    n = key.shape[0]
    t = cache.shape[2]
    slot_mapping = slot_mapping.to(device=cache.device, dtype=torch.long)
    blk, off = slot_mapping // t, slot_mapping % t
    for g in fmt.groups:
        heads = torch.tensor(g.heads, device=cache.device)
        gh = len(g.heads)
        k, v = key[:, heads], value[:, heads]  # (N, gh, D)
        k = _per_head(k, g.keys, "store_transform")
        v = _per_head(v, g.values, "store_transform")
        k_codes = g.key.encode(k.reshape(n * gh, -1)).reshape(n, gh, -1)
        v_codes = g.value.encode(v.reshape(n * gh, -1)).reshape(n, gh, -1)
        slot = torch.zeros(n, gh, fmt.slot_bytes, dtype=torch.uint8, device=cache.device)
        kb = g.key.nbytes
        slot[..., :kb] = k_codes
        slot[..., kb:kb + g.value.nbytes] = v_codes
        if fmt.sink_tokens:  # the sink area belongs to the block: keep the bytes other tokens wrote there
            area = slice(fmt.sink_offset, fmt.sink_offset + fmt.sink_bytes)
            slot[..., area] = cache[blk[:, None], heads[None, :], off[:, None], area]
        cache[blk[:, None], heads[None, :], off[:, None]] = slot
        if fmt.sink_tokens:
            _store_sinks(cache, blk, off, heads, g, k, v, fmt)


def _sink_bytes_index(fmt: KVFormat, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot (S, R), byte (S, R)) within a block of each byte of each sink record (see ``kv_format``)."""
    o = torch.arange(fmt.sink_tokens * fmt.sink_record_bytes, device=device).reshape(fmt.sink_tokens, -1)
    return o // fmt.sink_bytes, fmt.sink_offset + o % fmt.sink_bytes


def _store_sinks(cache, blk, off, heads, g, k, v, fmt: KVFormat) -> None:
    """Records of the tokens at block offsets < sink_tokens: bf16 of the rotated, state-transformed K and V."""
    sel = off < fmt.sink_tokens
    if not bool(sel.any()):
        return
    blk, off, k, v = blk[sel], off[sel], k[sel], v[sel]
    m, gh, d = k.shape
    rk = g.key.rotate(k.reshape(m * gh, d)).to(torch.bfloat16).reshape(m, gh, d)
    rv = g.value.rotate(v.reshape(m * gh, d)).to(torch.bfloat16).reshape(m, gh, d)
    rec = torch.cat((rk, rv), -1).contiguous().view(torch.uint8)  # (m, gh, 4D)
    slot_i, byte_i = _sink_bytes_index(fmt, cache.device)
    cache[blk[:, None, None], heads[None, :, None], slot_i[off][:, None], byte_i[off][:, None]] = rec


def _load_sinks(slots: torch.Tensor,  # (S, gh, nb * T, C) whole blocks
                fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) sink records of every block, each (S, gh, nb, sink_tokens, D) float32 (rotated domain)."""
    s, gh, L, c = slots.shape
    t = fmt.block_size
    area = slots.reshape(s, gh, L // t, t, c)[..., fmt.sink_offset:fmt.sink_offset + fmt.sink_bytes]
    rec = area.reshape(s, gh, L // t, -1)[..., : fmt.sink_tokens * fmt.sink_record_bytes]
    rec = rec.contiguous().view(torch.bfloat16).float().reshape(s, gh, L // t, fmt.sink_tokens, 2, fmt.head_size)
    return rec[..., 0, :], rec[..., 1, :]


def _per_head(x: torch.Tensor,  # (..., gh, D)
              cs: tuple, hook: str) -> torch.Tensor:
    """Apply each head's codec hook to its slice; one call when no codec of the group carries state."""
    if not cs[0].state_names:
        return getattr(cs[0], hook)(x)
    return torch.stack([getattr(c, hook)(x[..., i, :]) for i, c in enumerate(cs)], dim=-2)


def _gather_slots(cache, block_table, start_block, n_blocks, heads):
    """(S, gh, n_blocks*T, C) slots of the given heads for blocks [start_block, start_block + n_blocks)."""
    bt = block_table[:, start_block:start_block + n_blocks].long().clamp(min=0)  # (S, nb)
    s, nb = bt.shape
    # (S, nb, gh, T, C): a gather over blocks then heads keeps any cache strides valid.
    slots = cache[bt][:, :, heads]
    return slots.permute(0, 2, 1, 3, 4).reshape(s, len(heads), nb * cache.shape[2], cache.shape[3])


def _attend(q: torch.Tensor,  # (S, Lq, Hq, D) float32, padded queries
            q_pos: torch.Tensor,  # (S, Lq) position of each query in its sequence; -1 = padding
            kv_len: torch.Tensor,  # (S,) context length
            cache: torch.Tensor, block_table: torch.Tensor, fmt: KVFormat, scale: float,
            key_bias: tuple[torch.Tensor, torch.Tensor] | None = None,  # ((S, Lq, Hq, D), (P, D))
            exclude_self: bool = False,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (S, Lq, Hq, D), log-sum-exp of each row's scores (S, Lq, Hq); -inf where a row has no keys)."""
    s, lq, hq, d = q.shape
    hk = fmt.num_kv_heads
    group = hq // hk
    t = cache.shape[2]
    out = torch.zeros(s, lq, hq, d, dtype=torch.float32, device=q.device)
    lse = torch.full((s, lq, hq), -math.inf, dtype=torch.float32, device=q.device)
    max_len = int(kv_len.max())
    chunk_blocks = max(1, CHUNK_TOKENS // t)
    for g in fmt.groups:
        heads = torch.tensor(g.heads, device=q.device)
        gh = len(g.heads)
        qh = q.reshape(s, lq, hk, group, d)[:, :, heads]  # (S, Lq, gh, G, D)
        bq = None if key_bias is None else key_bias[0].reshape(s, lq, hk, group, d)[:, :, heads]
        qh = _per_head(qh.transpose(-2, -3), g.keys, "query_transform").transpose(-2, -3)
        q_rot = g.key.rotate(qh.reshape(-1, d)).reshape(s, lq, gh, group, d) * scale
        m = torch.full((s, lq, gh, group), -math.inf, device=q.device)
        l = torch.zeros(s, lq, gh, group, device=q.device)
        acc = torch.zeros(s, lq, gh, group, d, device=q.device)
        kb, vb = g.key.nbytes, g.value.nbytes
        for b0 in range(0, (max_len + t - 1) // t, chunk_blocks):
            nb = min(chunk_blocks, (max_len + t - 1) // t - b0)
            slots = _gather_slots(cache, block_table, b0, nb, heads)  # (S, gh, L, C)
            L = slots.shape[2]
            flat = slots.reshape(-1, slots.shape[-1])
            k = g.key.decode_rotated(flat[:, :kb].contiguous()).reshape(s, gh, L, d)
            v = g.value.decode_rotated(flat[:, kb:kb + vb].contiguous()).reshape(s, gh, L, d)
            if fmt.sink_tokens:  # each block's first tokens from its bf16 records
                ks, vs = _load_sinks(slots, fmt)
                k.view(s, gh, nb, t, d)[:, :, :, :fmt.sink_tokens] = ks
                v.view(s, gh, nb, t, d)[:, :, :, :fmt.sink_tokens] = vs
            pos = torch.arange(b0 * t, b0 * t + L, device=q.device)
            scores = torch.einsum("sqhgd,shld->sqhgl", q_rot, k)
            if bq is not None:  # position-aware key centring: q . (the key mean at each key's position)
                rows = key_bias[1][pos.clamp(max=key_bias[1].shape[0] - 1)]
                scores = scores + torch.einsum("sqhgd,ld->sqhgl", bq, rows)
            visible = pos[None, None, :] < q_pos[:, :, None] if exclude_self else pos[None, None, :] <= q_pos[:, :, None]
            ok = visible & (pos[None, None, :] < kv_len[:, None, None])
            scores = scores.masked_fill(~ok[:, :, None, None, :], -math.inf)
            m_new = torch.maximum(m, scores.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(scores - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("sqhgl,shld->sqhgd", p, v)
            m = m_new
        o_rot = acc / l.clamp(min=1e-30)[..., None]
        o = g.value.unrotate(o_rot.reshape(-1, d)).reshape(s, lq, gh, group, d)
        o = _per_head(o.transpose(-2, -3), g.values, "output_transform").transpose(-2, -3)
        empty = l == 0  # a row with no keys (exclude_self at position 0): output 0, lse -inf
        out.view(s, lq, hk, group, d)[:, :, heads] = o.masked_fill(empty[..., None], 0.0)
        lse.view(s, lq, hk, group)[:, :, heads] = torch.where(empty, -math.inf, m + torch.log(l.clamp(min=1e-30)))
    return out, lse


def paged_attention(query: torch.Tensor,  # (N, Hq, D)
                    cache: torch.Tensor,  # (B, Hk, T, C) uint8
                    block_table: torch.Tensor,  # (S, max_blocks) int
                    seq_lens: torch.Tensor,  # (S,) context length including this step's tokens
                    query_start_loc: torch.Tensor,  # (S + 1,) int, cumulative query lengths
                    fmt: KVFormat, *, scale: float, max_seq_len: int | None = None,
                    key_bias: tuple[torch.Tensor, torch.Tensor] | None = None, exclude_self: bool = False,
                    lse: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole (packed) context -> (N, Hq, D).
    ``max_seq_len`` is a hint for the kernels' work split; the reference reads ``seq_lens``. ``key_bias``
    ((N, Hq, D), (P, D)): add ``key_bias[0][row] . key_bias[1][p]`` to the score of the key at position p
    (position-aware key centring, ``vllm_kvq.key_centre``).

    ``exclude_self``: a row at position p attends to positions j < p only (its own key and value are merged in
    exactly by ``vllm_kvq.ops``); a row with no keys gets output 0. ``lse`` (N, Hq) float32: filled with each
    row's natural-log log-sum-exp of the scores it attended (scale * q . k in the codec domain plus the key
    bias), -inf for rows with no keys."""
    n, hq, d = query.shape
    out = torch.zeros(n, hq, d, dtype=query.dtype, device=query.device)
    if lse is not None:
        if lse.shape != (n, hq) or lse.dtype != torch.float32:
            raise ValueError(f"lse: expected float32 ({n}, {hq}), got {lse.dtype} {tuple(lse.shape)}")
        lse.fill_(-math.inf)
    if n == 0 or seq_lens.numel() == 0:
        return out
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [qsl[i + 1] - qsl[i] for i in range(len(lens))]
    qf = query.float()
    bq, table = key_bias if key_bias is not None else (None, None)
    decode = [i for i, ql in enumerate(q_lens) if ql == 1]
    if decode:
        idx = torch.tensor(decode, device=query.device)
        rows = torch.tensor([qsl[i] for i in decode], device=query.device)
        kv = seq_lens.to(query.device)[idx].long()
        kb = None if bq is None else (bq[rows][:, None], table)
        o, ls = _attend(qf[rows][:, None], (kv - 1)[:, None], kv, cache, block_table[idx], fmt, scale, kb,
                        exclude_self)
        out[rows] = o[:, 0].to(query.dtype)
        if lse is not None:
            lse[rows] = ls[:, 0]
    for i, ql in enumerate(q_lens):
        if ql <= 1:
            continue
        kv = torch.tensor([lens[i]], device=query.device)
        pos = torch.arange(lens[i] - ql, lens[i], device=query.device)[None]
        kb = None if bq is None else (bq[qsl[i]:qsl[i + 1]][None], table)
        o, ls = _attend(qf[qsl[i]:qsl[i + 1]][None], pos, kv, cache, block_table[i:i + 1], fmt, scale, kb,
                        exclude_self)
        out[qsl[i]:qsl[i + 1]] = o[0].to(query.dtype)
        if lse is not None:
            lse[qsl[i]:qsl[i + 1]] = ls[0]
    return out


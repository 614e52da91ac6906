"""Checks the kernel tests share (Triton, CPU): cache layouts, store bytes against the reference (exact, or
differing only on rounding ties the codec names, and in the sink records within a bf16 ulp), and the
low-precision PyTorch run of flash-attention's 2x rule. Device-agnostic: tensors stay where they are."""

from __future__ import annotations

import torch


def cache(fmt, blocks, t, layout, device="cpu"):
    if layout == "contiguous":
        return fmt.allocate(blocks, t, device=device)
    if layout == "token-major":  # (B, T, Hk, C) storage seen as (B, Hk, T, C)
        return torch.zeros(blocks, t, fmt.num_kv_heads, fmt.slot_bytes, dtype=torch.uint8, device=device).permute(0, 2, 1, 3)
    if layout == "byte-stride-2":  # every other byte of a wider buffer: slot bytes are not adjacent
        return torch.zeros(blocks, fmt.num_kv_heads, t, 2 * fmt.slot_bytes, dtype=torch.uint8, device=device)[..., ::2]
    raise ValueError(layout)


def check_rows(codec, x: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> None:
    """got/want (M, nbytes) packed rows of x (M, D), x as the codec encodes it (state applied). Exact where
    the codec has no rounding decision to flip (``boundary_distance`` is None); otherwise codes may differ
    only on a tie, and then in the metadata that depends on them."""
    if torch.equal(got, want):
        return
    bw = codec.boundary_distance(x.double(), want)
    assert bw is not None, f"{codec.name}: {(got != want).sum().item()} bytes differ"
    (cw, dist), (cg, _) = bw, codec.boundary_distance(x.double(), got)
    code_bytes = sum(f.nbytes for f in codec.fields() if f.name.startswith("codes"))
    flip = cg != cw
    assert flip.float().mean() < 0.01, f"{codec.name}: {flip.sum().item()} of {flip.numel()} codes differ"
    assert (dist[flip] < 1e-5).all(), f"{codec.name}: a code differs away from a tie: {dist[flip].max()}"
    if not getattr(codec, "block", 1) > 1:  # scalar codes tie with a neighbouring level; vector codes with any
        assert ((cg - cw).abs() <= 1).all()
    meta = slice(code_bytes, codec.nbytes)
    mg = got[:, meta].contiguous().view(torch.int16).int()
    mw = want[:, meta].contiguous().view(torch.int16).int()
    clean = ~flip.any(1)
    assert ((mg - mw).abs()[clean] <= 1).all(), f"{codec.name}: fp16 metadata off by more than 1 ulp"
    mf = got[:, meta].contiguous().view(torch.float16).float()
    wf = want[:, meta].contiguous().view(torch.float16).float()
    assert torch.allclose(mf[~clean], wf[~clean], rtol=2e-2, atol=1e-3)


def check_cache(fmt, x_k, x_v, slots, got, want):
    """Compare every written slot field by field and every other byte exactly."""
    t = got.shape[2]
    written = torch.zeros(got.shape[0], got.shape[2], dtype=torch.bool, device=got.device)
    keep = slots >= 0
    blk, off = slots[keep] // t, slots[keep] % t
    written[blk, off] = True
    if fmt.sink_tokens:  # the blocks' sink areas: bf16 records, each value within 1 ulp (rotation sums)
        area = slice(fmt.sink_offset, fmt.sink_offset + fmt.sink_bytes)
        ga, wa = got[..., area].contiguous(), want[..., area].contiguous()
        g16 = ga.reshape(ga.shape[0], ga.shape[1], -1)[..., : fmt.sink_tokens * fmt.sink_record_bytes]
        w16 = wa.reshape(wa.shape[0], wa.shape[1], -1)[..., : fmt.sink_tokens * fmt.sink_record_bytes]
        as_int = lambda b: (lambda i: torch.where(i == -32768, 0, i))(b.contiguous().view(torch.int16).int())  # noqa: E731  (-0 == +0)
        diff = (as_int(g16) - as_int(w16)).abs()
        assert diff.max() <= 1, f"sink records differ by {diff.max()} bf16 ulps"
        assert diff.float().mean() < 0.05
        assert torch.equal(ga.reshape(ga.shape[0], ga.shape[1], -1)[..., fmt.sink_tokens * fmt.sink_record_bytes:],
                           wa.reshape(wa.shape[0], wa.shape[1], -1)[..., fmt.sink_tokens * fmt.sink_record_bytes:])
        got, want = got[..., : fmt.sink_offset], want[..., : fmt.sink_offset]
    g_rest, w_rest = got.permute(0, 2, 1, 3)[~written], want.permute(0, 2, 1, 3)[~written]
    assert torch.equal(g_rest, w_rest), "bytes outside the written slots changed"
    for h in range(fmt.num_kv_heads):
        gk, wk = got[blk, h, off].cpu(), want[blk, h, off].cpu()
        kn, vn = fmt.keys[h].nbytes, fmt.values[h].nbytes
        kc, vc = fmt.keys[h], fmt.values[h]
        check_rows(kc, kc.store_transform(x_k[keep, h].cpu()), gk[:, :kn], wk[:, :kn])
        check_rows(vc, vc.store_transform(x_v[keep, h].cpu()), gk[:, kn:kn + vn], wk[:, kn:kn + vn])
        assert torch.equal(gk[:, kn + vn:], wk[:, kn + vn:]), "padding bytes differ"


def lowp_attention(q, k_deq, v_deq, batch, scale, dtype=torch.bfloat16, *, exclude_self=False, lse=None):
    """The low-precision PyTorch run: dense causal attention with every operand and result in ``dtype``.
    ``exclude_self``: each row sees the positions before its own only (a row that sees none gets 0). ``lse``
    (N, Hq) float32: filled with each row's log-sum-exp of its ``dtype`` scores (-inf for a row with none)."""
    out = torch.zeros(q.shape, dtype=dtype)
    if lse is not None:
        lse.fill_(float("-inf"))
    qsl = batch.query_start_loc.tolist()
    g = q.shape[1] // k_deq.shape[1]
    for i, s in enumerate(batch.seq_lens.tolist()):
        q0, q1 = qsl[i], qsl[i + 1]
        if q1 == q0:
            continue
        c0 = batch.ctx_start[i]
        k = k_deq[c0:c0 + s].to(dtype).repeat_interleave(g, 1)
        v = v_deq[c0:c0 + s].to(dtype).repeat_interleave(g, 1)
        sc = torch.einsum("nhd,lhd->hnl", q[q0:q1].to(dtype), k) * scale
        pos = torch.arange(s - (q1 - q0), s) - int(exclude_self)  # the last position each row sees
        sc = sc.masked_fill(torch.arange(s)[None, None, :] > pos[None, :, None], float("-inf"))
        seen = pos >= 0  # (rows,): a row before position 0 sees no key; its softmax would be NaN
        out[q0:q1][seen] = torch.einsum("hnl,lhd->nhd", torch.softmax(sc[:, seen], -1), v)
        if lse is not None:
            lse[q0:q1] = torch.logsumexp(sc.float(), -1).T
    return out

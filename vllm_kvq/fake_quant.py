"""A Hugging Face causal LM whose attention reads fake-quantized K/V: quality of a KV format without vLLM.

Every layer's post-RoPE keys and values (what vLLM caches) go through the package's store -> decode before
attention, for every position including the current one, so prefill attends the quantized cache exactly as
the vLLM backend does (its strict path). Used by ``vllm-kvq calibrate --budget`` (per-layer sensitivity) and
by ``benchmarks/quality_sim.py`` (recipe studies).

    model = load_model(model_dir)                       # attn_implementation="kvq_fake"
    with quantized(model, formats_quantizer(fmts)):     # fmts: one KVFormat per layer
        res = score(model, ids, keep_top=64)            # per-token NLL, top-64 next-token log-probs

The attention is registered in transformers' ``AttentionInterface`` under ``kvq_fake``, so any architecture
that dispatches through it (Llama, Qwen2, Mistral, ...) works without a per-model hook. Batch 1, no padding,
no KV cache (one forward per window): enough for measurement, not for serving.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F

ATTN_NAME = "kvq_fake"

# quantizer(layer, k, v) -> (k_hat, v_hat); k, v (Hk, N, D) float32 as the model produced them
Quantizer = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _State:
    quantizer: Quantizer | None = None
    recent_window: int = 0  # each query reads its last W positions (itself included) at bf16
    errors: dict[int, list[float]] | None = None  # layer -> attention-output relative error per forward
    # layer -> [sum over positions of q^2 (Hq, D) float64, positions]; queries from position query_skip on
    query_energy: dict[int, list] | None = None
    query_skip: int = 0


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """What a bf16 model hands the cache."""
    return x.to(torch.bfloat16).float()


def _attend(q, k, v, scaling, groups):
    k = k.repeat_interleave(groups, dim=0)
    v = v.repeat_interleave(groups, dim=0)
    # (1, H, N, D): torch takes its fused (flash) kernel for 4-D inputs only; 3-D ones run the math path,
    # which builds the (H, N, N) scores (8x slower at 4K tokens on a CPU)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scaling)[0]


def _attend_window(q, k, v, kq, vq, scaling, groups, window):
    """Causal attention where positions within ``window`` of the query read (k, v) and older ones (kq, vq):
    a bf16 window of recent tokens over a quantized cache (KIVI, OSCAR). On a CPU: one fused causal attention
    over the quantized keys whose window terms are exchanged afterwards through its log-sum-exp (a masked
    attention runs torch's unfused path there, ~10x slower at 4K); elsewhere ``_attend_window_masked``."""
    rep = lambda t: t.repeat_interleave(groups, dim=0)  # noqa: E731
    if q.device.type == "cpu":  # causal attention over the quantized keys, then the window's quantized terms
        # swapped for the exact ones through the softmax's log-sum-exp: O(N W D) on top of one fused attention
        kq, vq, k, v = rep(kq), rep(vq), rep(k), rep(v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[None], kq[None], vq[None], 0.0, True,
                                                                             scale=scaling)
        out, lse = out[0], lse[0, :, :, None]
        num, den = out.clone(), torch.ones_like(lse)
        for o in range(min(window, q.shape[1])):  # the key o positions back (rows o.. have one)
            qo = q[:, o:]
            a = torch.exp((qo * kq[:, :kq.shape[1] - o]).sum(-1, keepdim=True) * scaling - lse[:, o:])
            b = torch.exp((qo * k[:, :k.shape[1] - o]).sum(-1, keepdim=True) * scaling - lse[:, o:])
            num[:, o:] += b * v[:, :v.shape[1] - o] - a * vq[:, :vq.shape[1] - o]
            den[:, o:] += b - a
        return num / den
    return _attend_window_masked(q, k, v, kq, vq, scaling, groups, window)


def _attend_window_masked(q, k, v, kq, vq, scaling, groups, window):
    """``_attend_window`` as one attention over the 2N keys [kq; k] with a mask that lets row i read kq_j for
    j <= i - window and k_j for i - window < j <= i (no (H, N, N) score tensors where the fused kernels take
    a mask)."""
    rep = lambda t: t.repeat_interleave(groups, dim=0)  # noqa: E731
    n = q.shape[1]
    i = torch.arange(n, device=q.device)
    dist = i[:, None] - i[None, :]
    recent = (dist >= 0) & (dist < window)
    mask = torch.cat([dist >= window, recent], dim=1)  # (N, 2N): True = attend
    return F.scaled_dot_product_attention(q[None], rep(torch.cat([kq, k], 1))[None], rep(torch.cat([vq, v], 1))[None],
                                          attn_mask=mask, scale=scaling)[0]


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query (1, Hq, N, D), key/value (1, Hk, N, D) -> ((1, N, Hq, D), None)."""
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError(f"kvq_fake attention takes batch 1 without a KV cache; got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)} (call the model with use_cache=False)")
    layer, groups = module.layer_idx, module.num_key_value_groups
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = query[0].float(), key[0].float(), value[0].float()
    if _State.query_energy is not None and q.shape[1] > _State.query_skip:
        acc = _State.query_energy.setdefault(layer, [0.0, 0])
        acc[0] = acc[0] + q[:, _State.query_skip:].double().pow(2).sum(1)
        acc[1] += q.shape[1] - _State.query_skip
    kb, vb = bf16_round(k), bf16_round(v)
    kq, vq = (kb, vb) if _State.quantizer is None else _State.quantizer(layer, kb, vb)
    if _State.recent_window and _State.quantizer is not None:
        out = _attend_window(q, kb, vb, kq, vq, scaling, groups, _State.recent_window)
    else:
        out = _attend(q, kq, vq, scaling, groups)
    if _State.errors is not None:
        ref = _attend(q, kb, vb, scaling, groups)
        err = (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-30)).item()
        _State.errors.setdefault(layer, []).append(err)
    return out.to(query.dtype).transpose(0, 1).unsqueeze(0).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, attention)


def load_model(model_dir, dtype=torch.float32):
    """(tokenizer, model) with the fake-quant attention; float32 by default (CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=ATTN_NAME)
    model.eval()
    return tok, model


@contextlib.contextmanager
def quantized(model, quantizer: Quantizer | None, *, record_errors: bool = False, recent_window: int = 0):
    """Runs the block with ``quantizer`` on every layer's K/V (None: the bf16 cache). Yields the per-layer
    attention-error dict when ``record_errors`` (filled as forwards run). ``recent_window`` W > 0: each query
    reads the W most recent positions (itself included) unquantized, as a cache with a bf16 window would."""
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        raise ValueError(f"model uses attention {model.config._attn_implementation!r}; load it with "
                         f"fake_quant.load_model (attn_implementation={ATTN_NAME!r})")
    if recent_window < 0:
        raise ValueError(f"recent_window must be >= 0, got {recent_window}")
    prev = (_State.quantizer, _State.errors, _State.recent_window)
    _State.quantizer, _State.errors = quantizer, ({} if record_errors else None)
    _State.recent_window = recent_window
    try:
        yield _State.errors
    finally:
        _State.quantizer, _State.errors, _State.recent_window = prev


@contextlib.contextmanager
def recording_query_energy(model, skip_first: int = 0):
    """Yields a dict that holds, once the block ends, {layer: (Hq, D) float64}: the mean square of every
    query head's channels from position ``skip_first`` on, as attention consumes them (after RoPE and any
    query norm), over the block's forwards of ``model`` (a HF causal LM; inside the block it attends through
    this module's attention, with no quantizer unless one is set: the same attention as eager)."""
    register()
    prev = (_State.query_energy, _State.query_skip, model.config._attn_implementation)
    acc: dict[int, list] = {}
    _State.query_energy, _State.query_skip = acc, skip_first
    model.config._attn_implementation = ATTN_NAME
    out: dict[int, torch.Tensor] = {}
    try:
        yield out
    finally:
        _State.query_energy, _State.query_skip = prev[:2]
        model.config._attn_implementation = prev[2]
        out.update({layer: total / n for layer, (total, n) in acc.items() if n})


def roundtrip(fmt, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v (Hk, N, D) -> what attention sees after ``ops.reference.store`` into a cache of ``fmt`` and decode
    (the N tokens are positions 0..N-1 of one sequence: position-aware key centring turns its mean by them).

    The bytes are the package's own (the reference store defines them). A calibrated format's key shift is
    added back: attention ignores it (it moves all of a query's scores equally), and adding it keeps the
    result comparable with the input. A format with sinks gives the positions whose block offset (at
    ``fmt.block_size``) is below ``fmt.sink_tokens`` back from their bf16 records, as the paged attention reads
    them."""
    from vllm_kvq.ops import reference

    hk, n, d = k.shape
    sinks = getattr(fmt, "sink_tokens", 0)
    store_fmt = fmt
    if sinks:  # the codes of every token; the sink rows are replaced by their records below
        from vllm_kvq.kv_format import KVFormat

        store_fmt = KVFormat(fmt.head_size, fmt.keys, fmt.values, name=fmt.name)
    cache = store_fmt.allocate(n, 1, device=k.device)  # one token per block: slot i is token i
    # Position-aware key centring: the tokens are positions 0..n-1 of one sequence.
    centre = fmt.key_rope.centre(torch.arange(n, device=k.device)).transpose(0, 1) if fmt.key_rope else None
    ks = k if centre is None else k - centre
    reference.store(ks.transpose(0, 1), v.transpose(0, 1), cache, torch.arange(n, device=k.device), store_fmt)
    slots = cache[:, :, 0]  # (N, Hk, C)
    k_hat = torch.empty(hk, n, d, device=k.device)
    v_hat = torch.empty(hk, n, d, device=k.device)
    for g in fmt.groups:
        heads = list(g.heads)
        kb, vb = g.key.nbytes, g.value.nbytes
        s = slots[:, heads].reshape(n * len(heads), -1)
        k_hat[heads] = g.key.decode(s[:, :kb].contiguous()).reshape(n, len(heads), d).transpose(0, 1)
        v_hat[heads] = g.value.decode(s[:, kb:kb + vb].contiguous()).reshape(n, len(heads), d).transpose(0, 1)
    if fmt.k_scale is not None:
        k_hat = k_hat * fmt.k_scale[:, None]
    if fmt.k_shift is not None:
        k_hat = k_hat + fmt.k_shift[:, None]
    if centre is not None:
        k_hat = k_hat + centre
    if fmt.v_shift is not None:
        v_hat = v_hat + fmt.v_shift[:, None]
    if sinks:
        sink = torch.arange(n, device=k.device) % fmt.block_size < sinks
        for h in range(hk):
            k_hat[h, sink] = sink_roundtrip(fmt.keys[h], ks[h, sink])
            v_hat[h, sink] = sink_roundtrip(fmt.values[h], v[h, sink])
        if centre is not None:
            k_hat[:, sink] += centre[:, sink]
    return k_hat, v_hat


def sink_roundtrip(codec, x: torch.Tensor) -> torch.Tensor:
    """(M, D) rows -> what a sink record gives back: the codec's state transform and rotation, bf16 rounding,
    and back (``kv_format``: sink records hold bf16 rotated K and V)."""
    y = codec.unrotate(codec.rotate(codec.store_transform(x.float())).to(torch.bfloat16).float())
    if codec.scale is not None:
        y = y * codec.scale
    return y + (codec.shift if codec.shift is not None else 0)


def formats_quantizer(fmts: list, *, only: set[int] | None = None) -> Quantizer:
    """Quantizer storing layer i through ``fmts[i]`` (a KVFormat); layers outside ``only`` stay bf16."""
    def q(layer, k, v):
        if only is not None and layer not in only:
            return k, v
        return roundtrip(fmts[layer], k, v)
    return q


@torch.no_grad()
def score(model, ids: list[int], *, score_from: int = 1, keep_top: int | None = None,
          ref_top: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """One forward over ``ids``; tokens from ``score_from`` on are scored (M of them).

    Returns {"nll": (M,) per-token NLL; with ``keep_top=K``: "top": (token ids (M, K), log-probs (M, K)) of the
    K most likely next tokens; with ``ref_top`` (a reference run's "top"): "kl": (M,) KL(reference || this)
    over the reference's top K tokens plus one bucket for the rest of the vocabulary (``eval.kl.bucket_kl``,
    the same estimator the server path uses, here with this run's exact log-probs), "top1": (M,) bool, whether
    this run's most likely token is the reference's}."""
    from vllm_kvq.eval.kl import bucket_kl

    x = torch.tensor([ids])
    h = model.model(x, use_cache=False).last_hidden_state[0]
    first = score_from - 1  # the hidden state at position i predicts token i + 1
    logp = torch.log_softmax(model.lm_head(h[first:-1]).float(), dim=-1)
    tgt = x[0, first + 1:]
    out = {"nll": -logp.gather(1, tgt[:, None])[:, 0]}
    if keep_top:
        lp, idx = logp.topk(keep_top, dim=-1)
        out["top"] = (idx, lp)
    if ref_top is not None:
        idx, ref_lp = ref_top
        out["kl"] = bucket_kl(ref_lp, logp.gather(1, idx))
        out["top1"] = idx[:, 0] == logp.argmax(-1)
    return out

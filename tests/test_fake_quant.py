"""The fake-quantized transformers forward (calibrate --budget and the simulator use it) and the top-k KL."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_kvq import codecs, fake_quant
from vllm_kvq.eval import kl, models
from vllm_kvq.kv_format import KVFormat
from vllm_kvq.ops import reference


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = models.make_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=3)
    return fake_quant.load_model(path)


def _ids(tok, n=96):
    return tok(models.TINY_TEXT)["input_ids"][:n]


@pytest.mark.parametrize("kind", ["plain", "calibrated", "calibrated-sink", "rope-sink"])
def test_roundtrip_is_what_reference_attention_reads(kind, gen):
    from vllm_kvq import ops
    from tests.test_key_centre import _freq

    hk, hq, n, d = 2, 6, 45, 64
    c = codecs.get("turboquant3", head_dim=d)
    cal = dict(k_shift=torch.randn(hk, d, generator=gen), v_shift=torch.randn(hk, d, generator=gen),
               k_scale=torch.rand(hk, d, generator=gen) + 0.5) if kind != "plain" else {}
    if kind == "rope-sink":
        cal["k_rope_freq"] = _freq(d)
    sink = dict(sink_tokens=1, block_size=16) if kind.endswith("sink") else {}
    fmt = KVFormat(d, [c] * hk, [c] * hk, **cal, **sink)
    q = torch.randn(n, hq, d, generator=gen)
    k, v = torch.randn(n, hk, d, generator=gen) * 3, torch.randn(n, hk, d, generator=gen)
    k[::16] *= 5  # block starts far off: the sink records matter
    cache = fmt.allocate(3, 16)
    ops.store(k, v, cache, torch.arange(n), fmt, impl="reference", positions=torch.arange(n))
    want = ops.paged_attention(q, cache, torch.arange(3)[None], torch.tensor([n]), torch.tensor([0, n]), fmt,
                               scale=d ** -0.5, impl="reference")
    kq, vq = fake_quant.roundtrip(fmt, k.transpose(0, 1), v.transpose(0, 1))
    got = fake_quant._attend(q.transpose(0, 1), kq, vq, d ** -0.5, hq // hk).transpose(0, 1)
    assert (got - want).abs().max() < 1e-4
    assert (kq - k.transpose(0, 1)).abs().max() > 0.01  # the codec is in the path
    if sink:  # the sink rows are near-exact (bf16: 8 significant bits, here 2-3e-3 of the largest key), the others
        # are not (3-bit codes: 0.07-0.08 of it)
        err_sink = (kq[:, ::16] - k[::16].transpose(0, 1)).abs().max() / k[::16].abs().max()
        err_rest = (kq - k.transpose(0, 1)).abs().amax((0, 2))[torch.arange(n) % 16 != 0].max() / k.abs().max()
        assert err_sink < 8e-3 < 0.03 < err_rest


def test_bf16_cache_matches_the_plain_model(tiny):
    tok, model = tiny
    ids = _ids(tok)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids[:-1]]), use_cache=False).logits[0].float(), -1)
    with fake_quant.quantized(model, None):
        res = fake_quant.score(model, ids, keep_top=8)
    # the model runs in float32 while the simulated cache rounds K/V to bf16: close, not identical
    nll = -want.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert (res["nll"] - nll).abs().max() < 0.05
    assert res["top"][0].shape == (len(ids) - 1, 8)


def test_quantized_forward_moves_logprobs_and_kl_grows_with_fewer_bits(tiny):
    tok, model = tiny
    ids = _ids(tok)
    with fake_quant.quantized(model, None):
        ref = fake_quant.score(model, ids, keep_top=32)
    kls = {}
    for bits in (4, 2):
        c = codecs.get(f"turboquant{bits}", head_dim=64)
        fmts = [KVFormat(64, [c] * 2, [c] * 2)] * 2
        with fake_quant.quantized(model, fake_quant.formats_quantizer(fmts), record_errors=True) as errors:
            r = fake_quant.score(model, ids, ref_top=ref["top"])
        kls[bits] = r["kl"].mean().item()
        assert sorted(errors) == [0, 1] and all(e > 0 for es in errors.values() for e in es)
    assert 0 < kls[4] < kls[2]
    # only layer 1 quantized: less damage than both
    with fake_quant.quantized(model, fake_quant.formats_quantizer(fmts, only={1})):
        one = fake_quant.score(model, ids, ref_top=ref["top"])["kl"].mean().item()
    assert 0 < one < kls[2]


def test_recent_window_reads_bf16_for_recent_positions(tiny):
    tok, model = tiny
    ids = _ids(tok)
    c = codecs.get("turboquant2", head_dim=64)
    q = fake_quant.formats_quantizer([KVFormat(64, [c] * 2, [c] * 2)] * 2)
    with fake_quant.quantized(model, None):
        ref = fake_quant.score(model, ids, keep_top=32)
    kl = {}
    for w in (0, 8, len(ids)):
        with fake_quant.quantized(model, q, recent_window=w):
            kl[w] = fake_quant.score(model, ids, ref_top=ref["top"])["kl"]
    assert kl[len(ids)].abs().max() < 1e-4  # a window over everything is the bf16 cache
    assert 0 < kl[8].mean() < kl[0].mean()
    assert kl[8][:7].abs().max() < 1e-4  # the first positions see only their window
    with pytest.raises(ValueError, match="recent_window"):
        with fake_quant.quantized(model, q, recent_window=-1):
            pass


@pytest.mark.parametrize("n,window,groups", [(37, 1, 3), (37, 4, 3), (300, 1, 1), (300, 64, 2), (5, 9, 2)])
def test_recent_window_attention_equals_the_dense_definition(n, window, groups, gen):
    """The window attention (CPU: log-sum-exp swap; elsewhere: a masked attention over [quantized; exact] keys)
    against scores written out in full: row i reads
    the exact key and value of positions i - window < j <= i and the quantized ones of j <= i - window."""
    hk, d = 2, 16
    q = torch.randn(hk * groups, n, d, generator=gen)
    k, v, kq, vq = (torch.randn(hk, n, d, generator=gen) for _ in range(4))
    rep = lambda t: t.repeat_interleave(groups, dim=0)  # noqa: E731
    dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    recent = (dist >= 0) & (dist < window)
    s = torch.where(recent, q @ rep(k).transpose(1, 2), q @ rep(kq).transpose(1, 2)) * 0.25
    p = torch.softmax(s.masked_fill(dist < 0, float("-inf")), dim=-1)
    want = (p * recent) @ rep(v) + (p * ~recent) @ rep(vq)
    for attend in (fake_quant._attend_window, fake_quant._attend_window_masked):
        got = attend(q, k, v, kq, vq, 0.25, groups, window)
        assert (got - want).abs().max() < 1e-5, attend.__name__


def test_quantized_requires_the_fake_attention(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(models.make_tiny_llama(tmp_path, seed=1), attn_implementation="eager")
    with pytest.raises(ValueError, match="load it with fake_quant.load_model"):
        with fake_quant.quantized(model, None):
            pass


def test_bucket_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_with_top_k(gen):
    p = torch.log_softmax(torch.randn(50, 40, generator=gen) * 2, -1)
    q = torch.log_softmax(p + 0.3 * torch.randn(50, 40, generator=gen), -1)
    exact = (p.exp() * (p - q)).sum(-1)
    idx = p.argsort(-1, descending=True)
    full = kl.bucket_kl(p.gather(1, idx), q.gather(1, idx))
    assert torch.allclose(full, exact, atol=1e-5)
    for k in (1, 5, 20):
        part = kl.bucket_kl(p.gather(1, idx[:, :k]), q.gather(1, idx[:, :k]))
        assert (part <= exact + 1e-6).all() and part.mean() > 0
    assert kl.bucket_kl(p, p).abs().max() < 1e-6


def test_kl_from_server_entries():
    ref = [{1: math.log(0.6), 2: math.log(0.3), 3: math.log(0.05)}]
    same = kl.kl_from_entries(ref, ref, k=3)
    assert same[0] == pytest.approx(0.0, abs=1e-7)
    # token 2 is missing from the candidate's top 2: it gets the candidate's 2nd log-prob, 0.1
    cand = [{1: math.log(0.5), 4: math.log(0.1), 9: math.log(0.01)}]  # 9: the prompt token, below the top k
    got = kl.kl_from_entries(ref, cand, k=2)[0]
    p, q = [0.6, 0.3], [0.5, 0.1]
    want = sum(a * math.log(a / b) for a, b in zip(p, q)) + 0.1 * math.log(0.1 / 0.4)
    assert got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="different positions"):
        kl.kl_from_entries(ref, ref * 2, k=2)

"""Position-aware key centring (vllm_kvq.key_centre): the key mean follows RoPE positions.

The attention check decodes the cache by hand and adds back the turned mean of every key's chunk before a
dense reference, so it checks that the score bias the ops hand the implementations is exactly q . mean.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_kvq import calibration, codecs, key_centre, ops
from vllm_kvq.calibration import CalibrationStats
from vllm_kvq.kv_format import KVFormat
from vllm_kvq.testing import paged_reference, random_paged_batch

THETA = 1e5


def _freq(d: int = 64, rot: int | None = None) -> torch.Tensor:
    rot = rot or d
    cfg = SimpleNamespace(rope_theta=THETA, partial_rotary_factor=rot / d)
    freq, r = calibration.rope_frequencies(cfg, d)
    assert r == rot
    return freq


def _rope_format(gen, hk=2, d=64, rot=None, codec="turboquant3", smooth=True) -> KVFormat:
    c = codecs.get(codec, head_dim=d)
    return KVFormat(d, [c] * hk, [c] * hk, name="rope-cal", k_shift=torch.randn(hk, d, generator=gen) * 4,
                    v_shift=torch.randn(hk, d, generator=gen),
                    k_scale=torch.rand(hk, d, generator=gen) + 0.5 if smooth else None,
                    k_rope_freq=_freq(d, rot))


@pytest.mark.parametrize("rot", [64, 32], ids=["full-rotary", "partial-rotary"])
def test_bias_query_dot_table_is_query_dot_centre(gen, rot):
    fmt = _rope_format(gen, rot=rot)
    kr = fmt.key_rope
    pos = torch.tensor([0, 5, 16, 17, 300, 4095, 70000])
    q = torch.randn(pos.numel(), 6, 64, generator=gen)
    centre = kr.centre(pos)  # (N, Hk, D)
    bq = kr.bias_query(q, 0.5)
    table = kr.table(70000 + 1, "cpu")
    for i, p in enumerate(pos.tolist()):
        for h in range(6):
            # the unrotated channels' fixed mean adds the same to every score of a query: softmax ignores it
            want = 0.5 * float(q[i, h, :rot] @ centre[i, h // 3, :rot])
            got = float(bq[i, h] @ table[p])
            assert got == pytest.approx(want, rel=1e-4, abs=1e-3)
    # independently: the whole mean RoPE-turned to each key's own position (key_centre.rotate)
    turned = key_centre.rotate(kr.mu[:, None, :].expand(-1, pos.numel(), -1), pos, kr.freq)
    torch.testing.assert_close(centre, turned.transpose(0, 1), rtol=1e-5, atol=1e-5)
    # the mean turns with every position, every pair keeps its mean (the fastest one included)
    assert not torch.allclose(kr.centre(torch.tensor([16]))[0], kr.centre(torch.tensor([17]))[0])
    assert centre[:, :, 0].abs().min() > 0
    # a host-side bound (what ops.store passes) gives the same numbers as reading the positions
    assert torch.equal(kr.centre(pos, 70000 + 500), centre)
    # unrotated channels keep the fixed mean
    if rot < 64:
        assert torch.equal(centre[:, :, rot:], kr.mu[None, :, rot:].expand(pos.numel(), -1, -1))
    # one table per (frequencies, head size, device), shared by every layer's KeyRope
    other = _rope_format(gen, rot=rot, codec="turboquant4").key_rope
    assert other.table(100, "cpu").data_ptr() == table.data_ptr()


def test_rotate_inverts():
    x = torch.randn(3, 50, 64, dtype=torch.float64)
    pos = torch.arange(100, 150)
    f = _freq()
    back = key_centre.rotate(key_centre.rotate(x, pos, f), pos, f, inverse=True)
    torch.testing.assert_close(back, x)


@pytest.mark.parametrize("smooth", [True, False], ids=["smooth", "centre-only"])
def test_reference_attention_equals_dense_on_decoded_kv(gen, smooth):
    d, hk, hq = 64, 2, 6
    fmt = _rope_format(gen, hk, d, smooth=smooth)
    assert fmt.calibrated and fmt.k_shift is None  # the mean is applied per position, not bound to the codecs
    batch = random_paged_batch([70, 16, 40], [70, 1, 7], 16, generator=gen)  # prefill, decode, chunked
    total = int(batch.seq_lens.sum())
    pos = torch.cat([torch.arange(s) for s in batch.seq_lens.tolist()])
    k = torch.randn(total, hk, d, generator=gen) + fmt.key_rope.centre(pos)
    v = torch.randn(total, hk, d, generator=gen) - 2
    cache = fmt.allocate(batch.num_blocks, batch.block_size)
    with pytest.raises(ValueError, match="positions"):
        ops.store(k, v, cache, batch.ctx_slots, fmt)
    ops.store(k, v, cache, batch.ctx_slots, fmt, positions=pos)
    # the stored codes are the codec's bytes of the position-centred, scaled rows
    centre = fmt.key_rope.centre(pos)
    kc = (k[:, 1] - centre[:, 1]) / (fmt.k_scale[1] if smooth else 1)
    c = fmt.keys[1]
    slot = cache[batch.ctx_slots // 16, 1, batch.ctx_slots % 16]
    assert torch.equal(slot[:, :c.nbytes], c.encode(kc))
    q = torch.randn(batch.num_tokens, hq, d, generator=gen)
    scale = 1 / math.sqrt(d)
    out = ops.paged_attention(q, cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt, scale=scale)
    t = cache.shape[2]
    rows = cache[batch.ctx_slots // t, :, batch.ctx_slots % t]
    k_hat = torch.stack([fmt.keys[h].decode(rows[:, h, :c.nbytes].contiguous()) for h in range(hk)], 1)
    v_hat = torch.stack([fmt.values[h].decode(rows[:, h, c.nbytes:2 * c.nbytes].contiguous()) for h in range(hk)], 1)
    if smooth:
        k_hat = k_hat * fmt.k_scale
    ref = paged_reference(q, k_hat + centre, v_hat + fmt.v_shift, batch, scale)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    # without the bias (a fixed mean's reasoning), the output would differ: the bias is not a constant
    wrong = paged_reference(q, k_hat + fmt.key_rope.mu, v_hat + fmt.v_shift, batch, scale)
    assert (wrong - ref).abs().max() > 1e-2


def test_kernels_without_key_bias_decline(gen):
    """Implementations that take ``key_bias`` (Impl.key_rope) accept the format; the others decline."""
    fmt = _rope_format(gen)
    table = ops._table()
    assert ops.plan(fmt, "cpu")["reference"] is None
    for device in ("cpu", "cuda"):
        for name, why in ops.plan(fmt, device).items():
            if name in table and table[name].key_rope:
                assert why is None, (name, why)
            else:
                assert why is not None and ("key centring" in why or "not available" in why), (name, why)


def test_statistics_rope_recovers_the_pre_rope_mean(gen):
    """Keys made from one pre-RoPE mean plus noise: the statistics find that mean, and centring by it leaves
    keys shorter at every position, also far past the calibration span (where a fixed mean fails)."""
    d, n = 64, 4096
    f = _freq()
    mu = torch.randn(1, d, generator=gen) * 3 + 2
    pos = torch.arange(n)
    keys = key_centre.rotate(mu[:, None].expand(1, n, d), pos, f) + 0.3 * torch.randn(1, n, d, generator=gen)
    mu_k, mu_v, s = calibration.statistics_rope(keys[:, 4:1024], keys[:, 4:1024], pos[4:1024], f, 0.5)
    assert (mu_k - mu).abs().max() < 0.1
    assert torch.allclose(s[0, :32], s[0, 32:])  # a pair shares one scale
    kr = key_centre.KeyRope(mu_k, f)
    late = keys[0, 3000:]
    raw = late.pow(2).sum(-1).mean()
    centred = (late - kr.centre(pos[3000:])[:, 0]).pow(2).sum(-1).mean()
    assert centred < 0.2 * raw, (raw, centred)


def test_stats_file_roundtrip_and_validation(tmp_path, gen):
    st = CalibrationStats(torch.randn(2, 2, 64, generator=gen), torch.randn(2, 2, 64, generator=gen),
                          torch.rand(2, 2, 64, generator=gen) + 0.5, (("key_centre", "rope"),), rope_freq=_freq())
    st.save(tmp_path / "c.safetensors")
    back = CalibrationStats.load(tmp_path / "c.safetensors")
    assert torch.equal(back.rope_freq, st.rope_freq) and torch.equal(back.mu_k, st.mu_k)
    from vllm_kvq.kv_format import calibration_kwargs

    fmt = KVFormat(64, [codecs.get("turboquant4", head_dim=64)] * 2, [codecs.get("turboquant4", head_dim=64)] * 2,
                   **calibration_kwargs(back, 1))
    assert fmt.key_rope is not None and torch.equal(fmt.key_rope.mu[:, 40:], back.mu_k[1][:, 40:])
    bad = CalibrationStats(st.mu_k, st.mu_v, st.k_smooth, rope_freq=torch.ones(40))
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="rope_freq"):
        CalibrationStats.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="k_shift"):
        KVFormat(64, [codecs.get("turboquant4", head_dim=64)], [codecs.get("turboquant4", head_dim=64)],
                 k_rope_freq=_freq())

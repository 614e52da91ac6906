"""The register-fused decode of the CPU kernels' SIMD builds (csrc/cpu/decode_fused.h over decode_avx512.h or
decode_avx2.h): decode items over TurboQuant codes of at most 4 bits decode each token's codes in registers for
every query row of its KV head instead of through float tiles.

It must give the general tile path's bits (``FUSED_DECODE = False`` sends the same call through it), so a tile
holding sink tokens can take the general path in the middle of a sequence, and the portable build's numbers (that
build is checked against the reference everywhere else).
``fused_decode`` says which formats take it: the cases below assert they do, so a silent fallback cannot pass
for the fused path, and that the formats it does not cover fall back.
"""

from __future__ import annotations

import pytest
import torch

from tests import codec_cases
from tests.test_cpu_kernels import ISAS
from vllm_kvq import codecs
from vllm_kvq.calibration import rope_frequencies
from vllm_kvq.kernels import cpu as kc
from vllm_kvq.kv_format import KVFormat
from vllm_kvq.testing import random_paged_batch

pytestmark = pytest.mark.skipif(not kc.available(), reason="vllm_kvq._C_cpu is not built")

FUSED_ISAS = [p for p in ISAS if p != "portable"]  # the builds with a fused decode (skipped where the CPU lacks them)
TQ = ["turboquant2", "turboquant2.5", "turboquant3", "turboquant3.5", "turboquant4"]
# the same codec for K and V, then K and V with different bit widths and codebooks (a 4-bit segment beside a
# narrower one, as turboquant3.5 has)
PAIRS = [(c, c) for c in TQ] + [("turboquant4", "turboquant2.5"), ("turboquant3.5", "turboquant3")]
# decodes over several tiles, a partial last tile, one token, one block
SEQ_LENS = [300, 37, 50, 1, 97]


def _fmt(kid: str, vid: str, d: int, hk: int, variant: str) -> KVFormat:
    """``variant``: "plain"; "sinks" (2 sink records per block of 64 tokens: a sequence's tiles alternate between
    the general path, for the tile holding a block's sinks, and the fused one); "key-bias" (position-aware key
    centring with key channel scales and a value shift, sinks too)."""
    ks = [codec_cases.case(kid).build(d, h) for h in range(hk)]
    vs = [codec_cases.case(vid).build(d, h) for h in range(hk)]
    name = f"{kid}/{vid}+{variant}"
    if variant == "plain":
        return KVFormat(d, ks, vs, name=name)
    if variant == "sinks":
        return KVFormat(d, ks, vs, name=name, sink_tokens=2, block_size=64)
    from types import SimpleNamespace

    freq, _ = rope_frequencies(SimpleNamespace(rope_theta=1e5, partial_rotary_factor=1.0), d)
    g = torch.Generator().manual_seed(d + hk)
    return KVFormat(d, ks, vs, name=name, sink_tokens=2, block_size=64, k_shift=torch.randn(hk, d, generator=g) * 3,
                    v_shift=torch.randn(hk, d, generator=g), k_scale=torch.rand(hk, d, generator=g) + 0.5,
                    k_rope_freq=freq)


def _decode_outputs(fmt: KVFormat, hq: int, isa: str, monkeypatch, *, t: int = 64) -> dict:
    """One decode batch over a stored random context: the kernel's outputs {(fused, query dtype, splits)}, and
    the portable build's (float32 queries) under "portable"; under ("tiles", fused, dtype, splits) the context
    tiles each call took through the register-fused decode (the extension's debug count)."""
    gen = torch.Generator().manual_seed(11)
    d, hk = fmt.head_size, fmt.num_kv_heads
    batch = random_paged_batch(SEQ_LENS, [1] * len(SEQ_LENS), t, generator=gen)
    total = int(batch.seq_lens.sum())
    k = torch.randn(total, hk, d, generator=gen)
    k[:, :, :2] *= 4  # outlier channels, as real keys have
    v = torch.randn(total, hk, d, generator=gen)
    if fmt.key_rope is not None:  # the cache holds the keys minus their turned mean (as ops.store writes them)
        k = k - fmt.key_rope.centre(torch.cat([torch.arange(s) for s in SEQ_LENS]))
    cache = fmt.allocate(batch.num_blocks, t)
    kc.store(k, v, cache, batch.ctx_slots, fmt)
    q = torch.randn(batch.num_tokens, hq, d, generator=gen) * 2
    scale = d ** -0.5
    kb = None
    if fmt.key_rope is not None:
        kb = (fmt.key_rope.bias_query(q, scale), fmt.key_rope.table(batch.block_table.shape[1] * t, "cpu"))
    args = (cache, batch.block_table, batch.seq_lens, batch.query_start_loc, fmt)
    before = kc.fused_decode_tiles()
    outs = {"portable": kc.paged_attention(q, *args, scale=scale, isa="portable", key_bias=kb)}
    outs["tiles", "portable"] = kc.fused_decode_tiles() - before
    for fused in (True, False):
        monkeypatch.setattr(kc, "FUSED_DECODE", fused)
        for dtype in (torch.float32, torch.bfloat16):
            for splits in (1, 3):  # 3: split items start and end at tile boundaries inside the context
                before = kc.fused_decode_tiles()
                outs[fused, dtype, splits] = kc.paged_attention(q.to(dtype), *args, scale=scale, num_splits=splits,
                                                                isa=isa, key_bias=kb)
                outs["tiles", fused, dtype, splits] = kc.fused_decode_tiles() - before
    return outs


@pytest.mark.parametrize("isa", FUSED_ISAS)
@pytest.mark.parametrize("variant", ["plain", "sinks", "key-bias"])
@pytest.mark.parametrize("hq,hk", [(2, 2), (4, 2), (6, 2), (16, 2)], ids=["g1", "g2", "g3", "g8"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kid,vid", PAIRS, ids=[k if k == v else f"{k}-{v}" for k, v in PAIRS])
def test_fused_decode_gives_the_general_paths_bits(kid, vid, d, hq, hk, variant, isa, monkeypatch):
    """1, 2, 3 and 8 query heads per KV head (row blocks of 1 to 4 rows, two blocks for 8), head sizes 64 and
    128, whole and split contexts, float32 and bf16 queries, sinks and key centring: the fused path's output
    equals the general path's bit for bit and the portable build's to 1e-4 (float32)."""
    _check_fused(kid, vid, d, hq, hk, variant, isa, monkeypatch)


@pytest.mark.skipif(not kc.has_isa("avx2"), reason="the CPU lacks AVX2")
@pytest.mark.parametrize("variant", ["plain", "key-bias"])
@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 2)], ids=["g2", "g3"])
@pytest.mark.parametrize("d,kid,vid", [(80, "turboquant3.5", "turboquant3.5"), (80, "turboquant4", "turboquant2.5"),
                                       (72, "turboquant3", "turboquant3"), (40, "turboquant2", "turboquant4")])
def test_avx2_fused_decode_off_16_coordinates(d, kid, vid, hq, hk, variant, monkeypatch):
    """Head sizes and fractional-rate segments that are multiples of 8 but not of 16 (AVX2 fuses them, AVX-512
    does not): chunk counts that leave a partial group of chunks, segment boundaries inside a 16-lane group."""
    _check_fused(kid, vid, d, hq, hk, variant, "avx2", monkeypatch)


def _fused_tiles(variant: str, tile: int = 32, block: int = 64) -> int:
    """Tiles of ``tile`` context tokens (the kernels' kTile) per KV head over SEQ_LENS that hold no sink record
    (``_fmt``'s sink variants: 2 per block of ``block`` tokens); split items start and end at tile boundaries."""
    return sum(1 for n in SEQ_LENS for j0 in range(0, n, tile) if variant == "plain" or j0 % block)


def _check_fused(kid, vid, d, hq, hk, variant, isa, monkeypatch):
    fmt = _fmt(kid, vid, d, hk, variant)
    assert kc.fused_decode(fmt, isa) == [True]
    outs = _decode_outputs(fmt, hq, isa, monkeypatch)
    for dtype in (torch.float32, torch.bfloat16):
        for splits in (1, 3):
            fused, general = outs[True, dtype, splits], outs[False, dtype, splits]
            assert torch.equal(fused, general), (dtype, splits, (fused.float() - general.float()).abs().max().item())
            # the fused path really ran, on every tile but the ones holding sink records (2 per 64-token block:
            # the tiles of 32 starting a block), and the knob really turned it off
            assert outs["tiles", True, dtype, splits] == hk * _fused_tiles(variant), (dtype, splits)
            assert outs["tiles", False, dtype, splits] == 0
    assert outs["tiles", "portable"] == 0
    err = (outs[True, torch.float32, 1] - outs["portable"]).abs().max().item()
    assert err <= 1e-4, f"fused decode differs from the portable build by {err}"


@pytest.mark.parametrize("isa", FUSED_ISAS)
@pytest.mark.parametrize("d,kid,vid", [(36, "turboquant3", "turboquant3"),  # a head size off 8
                                       (80, "turboquant4", "uniform4"),  # a value codec that is not TurboQuant
                                       (64, "tq5.5", "tq5.5"),  # codes over 4 bits
                                       (64, "turboquant3", "bf16"), (64, "fibquant2", "turboquant3")])
def test_what_the_fused_decode_does_not_take_falls_back(d, kid, vid, isa, monkeypatch):
    fmt = _fmt(kid, vid, d, 2, "plain")
    assert kc.fused_decode(fmt, isa) == [False]
    outs = _decode_outputs(fmt, 6, isa, monkeypatch)
    assert all(v == 0 for k, v in outs.items() if k[0] == "tiles"), outs
    assert torch.equal(outs[True, torch.bfloat16, 3], outs[False, torch.bfloat16, 3])
    assert (outs[True, torch.float32, 1] - outs["portable"]).abs().max().item() <= 1e-4


def test_which_formats_fuse():
    """Per head group; head sizes and fractional-rate segments must be multiples of 8 (AVX-512: 16, else the
    AVX2 build runs them); the portable build has no fused path."""
    g = lambda n, d=64: codecs.get(n, head_dim=d)  # noqa: E731
    mixed = KVFormat(64, [g("turboquant3"), g("bf16"), g("turboquant4")],
                     [g("turboquant3"), g("bf16"), g("turboquant2.5")], name="mixed")
    assert kc.fused_decode(mixed, "portable") == [False] * 3
    tq = lambda n, d: KVFormat(d, [g(n, d)], [g(n, d)])  # noqa: E731
    assert kc.fused_decode(tq("turboquant3", 20), "portable") == [False]
    if kc.has_isa("avx2"):
        assert kc.fused_decode(mixed, "avx2") == [True, False, True]
        assert kc.fused_decode(tq("turboquant3.5", 80), "avx2") == [True]  # segments of 40 coordinates
        assert kc.fused_decode(tq("turboquant2.5", 36), "avx2") == [False]
        assert kc.fused_decode(tq("turboquant2", 20), "avx2") == [False]
    if kc.has_isa("avx512"):
        assert kc.fused_decode(mixed, "avx512") == [True, False, True]
        # 40-coordinate segments are off the AVX-512 build's 16 lanes: its general path runs them
        assert kc.fused_decode(tq("turboquant3.5", 80), "avx512") == [False]

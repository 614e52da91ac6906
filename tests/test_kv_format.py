"""KV formats: slot sizes (a golden table computed by hand), per-head mixing, padding, the printed layout."""

from __future__ import annotations

import pytest
import torch

from vllm_kvq import codecs, config, kv_format
from vllm_kvq.kv_format import KVFormat, formats_from_config

# Bytes of one (token, KV head), K + V, metadata inline, rounded up to even. By hand, not from the code:
#   turboquant b: ceil(b * D / 8) code bytes + 2 (fp16 scale);  uniform b: b * D / 8 + 4 (fp16 scale, fp16 min);
#   bf16: 2 * D.  E.g. turboquant2.5 at D = 128: 64 coords x 3 bits + 64 x 2 bits = 40 bytes + 2 = 42, x2 = 84.
#   fibquant (block k, L-bit index): ceil(D / k * L / 8) + 2; e.g. fibquant2 (k 4, L 8) at D = 64: 16 + 2 = 18, x2.
GOLDEN_SLOT_BYTES = {
    # name:          D=64  D=128
    "turboquant2":   (36,  68),
    "turboquant2.5": (44,  84),
    "turboquant3":   (52,  100),
    "turboquant3.5": (60,  116),
    "turboquant4":   (68,  132),
    "uniform4":      (72,  136),
    "uniform8":      (136, 264),
    "bf16":          (256, 512),
    "fp16":          (256, 512),
    "fibquant0.75":  (16,  28),   # k 8, L 6
    "fibquant1.5":   (28,  52),   # k 4, L 6
    "fibquant1.75":  (32,  60),   # k 4, L 7
    "fibquant2":     (36,  68),   # k 4, L 8
    "fibquant2.5":   (44,  84),   # k 2, L 5
    "fibquant3":     (52,  100),  # k 2, L 6
}


@pytest.mark.parametrize("name", sorted(GOLDEN_SLOT_BYTES))
@pytest.mark.parametrize("col,head_size", [(0, 64), (1, 128)])
def test_golden_slot_bytes(name, col, head_size):
    fmt = kv_format(name, head_size=head_size, num_kv_heads=8)
    expected = GOLDEN_SLOT_BYTES[name][col]
    assert fmt.slot_bytes == expected
    assert fmt.bytes_per_token() == 8 * expected
    assert fmt.compression() == pytest.approx(4 * head_size / expected)
    assert fmt.allocate(3, 16).shape == (3, 8, 16, expected)


def test_every_preset_codec_is_in_the_golden_table():
    # a new preset codec must get a hand-computed row above
    presets = [n for n in codecs.names() if n not in codecs.family_names()]
    assert sorted(presets) == sorted(GOLDEN_SLOT_BYTES)


def test_odd_codec_sizes_round_the_slot_to_even():
    # D = 80: turboquant2.5 is 40 x 3 + 40 x 2 bits = 25 bytes + 2 = 27 (odd); turboquant3 is 30 + 2 = 32
    k, v = codecs.get("turboquant2.5", head_dim=80), codecs.get("turboquant3", head_dim=80)
    assert (k.nbytes, v.nbytes) == (27, 32)
    fmt = KVFormat(80, [k], [v])
    assert fmt.slot_bytes == 60 and fmt.value_offset(0) == 27


def test_mixed_heads_take_the_largest_slot():
    # head 0: 4-bit keys (66 B) + 3-bit values (50 B) = 116; heads 1-3: 3-bit (50 + 50 = 100)
    t3, t4 = codecs.get("turboquant3", head_dim=128), codecs.get("turboquant4", head_dim=128)
    fmt = KVFormat(128, [t4, t3, t3, t3], [t3, t3, t3, t3])
    assert fmt.slot_bytes == 116 and not fmt.uniform
    assert [g.heads for g in fmt.groups] == [(0,), (1, 2, 3)]
    assert [fmt.value_offset(h) for h in range(4)] == [66, 50, 50, 50]
    # same codec objects in any order group together
    fmt2 = KVFormat(128, [t3, t4, t3, t4], [t3, t3, t3, t3])
    assert [g.heads for g in fmt2.groups] == [(0, 2), (1, 3)]
    # a codec with a different parameter is a different group even under the same preset name
    t3n = codecs.get("turboquant3", head_dim=128, scale_mode="norm")
    assert len(KVFormat(128, [t3, t3n], [t3, t3]).groups) == 2


def test_pad_to():
    fmt = kv_format("turboquant3", head_size=128, num_kv_heads=2, pad_to=132)
    assert fmt.slot_bytes == 132 and fmt.bytes_per_token() == 264
    assert "[ 100: 132] padding" in fmt.describe()
    with pytest.raises(ValueError, match="pad_to=96 is smaller than the 100 bytes"):
        kv_format("turboquant3", head_size=128, num_kv_heads=2, pad_to=96)


def test_describe_mentions_every_field():
    names = [("turboquant2.5", "uniform4"), ("bf16", "turboquant3"), ("turboquant2.5", "uniform4")]
    fmt = KVFormat(64, [codecs.get(k, head_dim=64) for k, _ in names], [codecs.get(v, head_dim=64) for _, v in names],
                   name="demo")
    text = fmt.describe()
    assert str(fmt) == text
    for needle in ("'demo'", "head_size=64", "kv_heads=3", f"slot={fmt.slot_bytes} B", f"{fmt.compression():.2f}x",
                   "heads [0, 2]", "heads [1]", "rotation hadamard", "rotation identity", "padding"):
        assert needle in text, needle
    for g in fmt.groups:
        for label, c in (("K", g.key), ("V", g.value)):
            assert f"{label} {c.name}" in text
            for f in c.fields():
                assert f"{label}.{f.name}" in text and f.what in text
    # byte ranges of a group tile [0, slot): every line's end is the next line's start
    lines = text.split("heads [1]:")[1].split("\n")[1:]
    spans = [tuple(int(x) for x in ln.split("]")[0].strip(" [").split(":")) for ln in lines if ln.strip()]
    assert spans[0][0] == 0 and spans[-1][1] == fmt.slot_bytes
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_kv_format_from_yaml_and_layer(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: m\nkey: turboquant3\nvalue: turboquant3\noverrides:\n  - layers: -1\n    value: bf16\n")
    assert kv_format(p, head_size=64, num_kv_heads=2, layer=3, num_layers=4).slot_bytes == 26 + 128
    assert kv_format(str(p), head_size=64, num_kv_heads=2, layer=0, num_layers=4).slot_bytes == 52
    with pytest.raises(ValueError, match="pass num_layers"):
        kv_format(p, head_size=64, num_kv_heads=2, layer=3)
    with pytest.raises(ValueError, match="layer 4 out of range for 4 layers"):
        kv_format(p, head_size=64, num_kv_heads=2, layer=4, num_layers=4)
    cfg = config.load(p)
    assert kv_format(cfg, head_size=64, num_kv_heads=2, layer=3, num_layers=4).slot_bytes == 154


def test_formats_from_config_uniform_slot():
    cfg = config.load("kvq-mixed-example")
    fmts = formats_from_config(cfg, num_layers=6, num_kv_heads=3, head_size=64)
    # layers 0, 1, -1: 4-bit (68); layer 2: head 0 has 4-bit keys (34 + 26 = 60); others 3-bit (52)
    assert [f.slot_bytes for f in fmts] == [68, 68, 60, 52, 52, 68]
    padded = formats_from_config(cfg, num_layers=6, num_kv_heads=3, head_size=64, uniform_slot=True)
    assert {f.slot_bytes for f in padded} == {68}
    assert [f.groups[0].key.name for f in padded] == [f.groups[0].key.name for f in fmts]


def test_bad_formats_and_caches():
    t3 = codecs.get("turboquant3", head_dim=64)
    with pytest.raises(ValueError, match="one key and one value codec per KV head"):
        KVFormat(64, [t3, t3], [t3])
    with pytest.raises(ValueError, match="has head_dim 64, format has head_size 128"):
        KVFormat(128, [t3], [t3])
    fmt = KVFormat(64, [t3] * 2, [t3] * 2)
    fmt.check_cache(fmt.allocate(2, 16))
    fmt.check_cache(torch.zeros(2, 16, 2, 52, dtype=torch.uint8).transpose(1, 2))  # strides are free
    with pytest.raises(ValueError, match=r"expected \(blocks, 2, tokens, 52\)"):
        fmt.check_cache(torch.zeros(2, 3, 16, 52, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected a uint8 cache"):
        fmt.check_cache(torch.zeros(2, 2, 16, 52))

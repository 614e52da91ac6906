"""benchmarks/quality_sim.py: its grammar maps onto the package's YAML (so a variant it finds can be served),
and its prototypes count their bytes and code what they claim."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vllm_kvq import codecs, config
from vllm_kvq.kv_format import KVFormat, formats_from_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality_sim  # noqa: E402
import sim_protos  # noqa: E402


def _formats(var, calib=None):
    cfg = config.from_dict(var.yaml_dict(calib))
    return formats_from_config(cfg, num_layers=var.n_layers, num_kv_heads=2, head_size=64)


def test_codec_specs_map_to_registered_codecs():
    assert quality_sim.codec_yaml("tq3") == "turboquant3"
    assert quality_sim.codec_yaml("tq2.5:corrected") == {"codec": "turboquant", "bits": 2.5, "scale_mode": "corrected"}
    assert quality_sim.codec_yaml("u4:g32") == {"codec": "uniform", "bits": 4, "group_size": 32}
    assert quality_sim.codec_yaml("uniform8") == "uniform8"
    assert quality_sim.codec_yaml("tq4.5") == {"codec": "turboquant", "bits": 4.5}  # no preset of that name
    with pytest.raises(ValueError, match="unknown codec"):
        quality_sim.codec_yaml("zz9")
    assert quality_sim.is_proto("tqo3:16") and quality_sim.is_proto("ds2:2") and not quality_sim.is_proto("tq3")


def test_variant_is_a_yaml_config_with_per_layer_overrides():
    var = quality_sim.Variant("K=tq4;V=tq3;edge=1:u8;layers=2:tq2/tq3", 5)
    fmts = _formats(var)
    got = [(f.keys[0].name, f.values[0].name) for f in fmts]
    assert got == [("uniform8",) * 2, ("turboquant4", "turboquant3"), ("turboquant2", "turboquant3"),
                   ("turboquant4", "turboquant3"), ("uniform8",) * 2]
    assert not var.protos and var.yaml_dict(None)["key"] == "turboquant4"
    two = quality_sim.Variant("K=tq3;layers=1:u8|0+2:tq2", 3)
    assert [f.keys[0].name for f in _formats(two)] == ["turboquant2", "uniform8", "turboquant2"]
    only = quality_sim.Variant("K=tq3;only=1", 3)
    assert [f.keys[0].name for f in _formats(only)] == ["bf16", "turboquant3", "bf16"]


def test_variant_errors_and_prototype_marking():
    with pytest.raises(ValueError, match="unknown fields"):
        quality_sim.Variant("K=tq3;bogus=1", 2)
    with pytest.raises(ValueError, match="center=kv"):
        quality_sim.Variant("K=tq3;center=k", 2)
    with pytest.raises(ValueError, match="needs center=kv"):
        quality_sim.Variant("K=tq3;smooth=0.5", 2)
    var = quality_sim.Variant("K=tqo3:16;V=tq3;sink=2:u8", 2)
    assert var.protos == ["tqo3:16", "sink=2:u8"]
    assert [f.keys[0].name for f in _formats(var)] == ["bf16", "bf16"]  # stand-ins, replaced at run time


def test_energy_split_bytes_and_it_beats_a_fixed_split_on_outlier_channels(gen):
    hk, d = 2, 64
    scale = torch.ones(d)
    scale[torch.randperm(d, generator=gen)[:8]] = 12.0  # a few strong channels, as post-RoPE keys have
    calib = torch.randn(hk, 2000, d, generator=gen) * scale
    x = torch.randn(hk, 500, d, generator=gen) * scale
    plain = KVFormat(d, [codecs.get("bf16", head_dim=d)] * hk, [codecs.get("bf16", head_dim=d)] * hk)
    split = sim_protos.EnergySplit(d, 3, 16, plain, 0, calib)
    assert split.nbytes == (16 * 4 // 8 + 2) + (48 * 3 // 8 + 2) == 30  # two codes, two fp16 scales
    fixed = codecs.get("turboquant3.5", head_dim=d)
    assert fixed.nbytes == 30
    err = lambda y: ((y - x).norm() / x.norm()).item()  # noqa: E731
    fixed_y = fixed.decode(fixed.encode(x.reshape(-1, d))).reshape(x.shape)
    assert err(split(x)) < err(fixed_y)


def test_dense_sparse_keeps_outliers_exact(gen):
    d = 64
    plain = KVFormat(d, [codecs.get("bf16", head_dim=d)], [codecs.get("bf16", head_dim=d)])
    ds = sim_protos.DenseSparse(d, 3, 2, plain, 1)
    assert ds.nbytes == 26 + 6
    x = torch.randn(1, 50, d, generator=gen)
    x[0, :, 5] = 40.0
    y = ds(x)
    assert torch.allclose(y[0, :, 5], x[0, :, 5])
    with pytest.raises(ValueError, match="expected tqo"):
        sim_protos.make_proto("tqo3", d, plain, 0, x)

"""YAML configs: every shipped file loads, overrides resolve, bad input names key path + value + allowed,
and ``vllm-kvq config show`` prints the resolved table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_kvq import cli, codecs, config
from vllm_kvq.calibration import CalibrationStats
from vllm_kvq.kv_format import formats_from_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))


def test_every_config_file_is_a_preset():
    assert CONFIG_FILES, CONFIG_DIR
    assert sorted(p.stem for p in CONFIG_FILES) == config.preset_names()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_loads_and_resolves(path, tmp_path):
    cfg = config.load(path)
    assert cfg.name == path.stem, "a preset's name is its file name"
    assert cfg.description, "presets are documented"
    assert config.load(path.stem) == cfg  # by name, including names with a dot (turboquant2.5)
    for layers, heads, d in ((30, 3, 64), (4, 8, 128), (3, 1, 80)):
        table = config.resolve(cfg, layers, heads)
        assert len(table) == layers and all(len(row) == heads for row in table)
        model = None
        if cfg.calibration == config.MODEL_CALIBRATION:  # a model `vllm-kvq calibrate` has seen
            model = tmp_path / f"m{layers}-{heads}-{d}"
            config.model_calibration_path(model).parent.mkdir(parents=True)
            CalibrationStats(torch.zeros(layers, heads, d), torch.zeros(layers, heads, d),
                             torch.ones(layers, heads, d)).save(config.model_calibration_path(model))
        fmts = formats_from_config(cfg, num_layers=layers, num_kv_heads=heads, head_size=d, block_size=16,
                                   model=model)
        assert all(f.num_kv_heads == heads and f.head_size == d for f in fmts)
        assert all(f.calibrated for f in fmts) == (cfg.calibration is not None)


def _cfg(overrides, **top):
    return config.from_dict({"key": "turboquant3", "value": "turboquant3", "overrides": overrides, **top})


def _names(cfg, layers, heads):
    return [[(k.codec, v.codec) for k, v in row] for row in config.resolve(cfg, layers, heads)]


def test_overrides_ranges_negative_indices_heads():
    cfg = _cfg([
        {"layers": ["0:2", -1], "key": "bf16", "value": "bf16"},  # a range and a negative index
        {"layers": "2:6:2", "heads": -1, "key": "turboquant4"},  # a stepped range; key only, value kept
        {"layers": -2, "heads": "0:2", "value": "uniform8"},
        {"layers": 0, "heads": [1], "key": "turboquant2"},  # later rules win
    ])
    t = _names(cfg, 6, 3)
    tq3, bf = ("turboquant3", "turboquant3"), ("bf16", "bf16")
    assert t[0] == [bf, ("turboquant2", "bf16"), bf]
    assert t[1] == [bf] * 3
    assert t[2] == [tq3, tq3, ("turboquant4", "turboquant3")]
    assert t[3] == [tq3] * 3
    assert t[4] == [("turboquant3", "uniform8"), ("turboquant3", "uniform8"), ("turboquant4", "turboquant3")]
    assert t[5] == [bf] * 3


def test_codec_mappings_and_seed():
    cfg = config.from_dict({"key": {"codec": "turboquant", "bits": 2.5, "scale_mode": "norm"},
                            "value": {"codec": "uniform", "bits": 4, "group_size": 32, "rotate": True}, "seed": 7})
    fmt = formats_from_config(cfg, num_layers=1, num_kv_heads=2, head_size=128)[0]
    k, v = fmt.keys[0], fmt.values[0]
    assert (k.bits, k.scale_mode, k.seed) == (2.5, "norm", 7)
    assert (v.bits, v.group_size, v.rotation.kind, v.seed) == (4, 32, "hadamard", 7)
    assert str(cfg.key) == "turboquant(bits=2.5, scale_mode=norm)"


def _error(data) -> str:
    with pytest.raises(config.ConfigError) as e:
        cfg = config.from_dict(data)
        config.resolve(cfg, 6, 2)
    return str(e.value)


BASE = {"key": "turboquant3", "value": "turboquant3"}


@pytest.mark.parametrize("data,needles", [
    ({**BASE, "kee": "bf16"}, ["kee:", "unknown key", "'bf16'", "name, description, seed, key, value, overrides"]),
    ({**BASE, "overrides": [{"layer": 0, "key": "bf16"}]},
     ["overrides.0.layer:", "unknown key", "got 0", "layers, heads, key, value"]),
    ({**BASE, "value": "turboquant5"}, ["value:", "unknown codec 'turboquant5'", *codecs.names()]),
    ({**BASE, "key": {"codec": "turboquant", "bits": 9}}, ["key:", "bits must be in 1..8 in steps of 0.5", "9"]),
    ({**BASE, "key": {"codec": "turboquant3", "scale_mode": "max"}}, ["key:", "'max'", "norm, corrected, lsq"]),
    ({**BASE, "key": {"codec": "uniform", "bits": 4, "groups": 2}},
     ["key:", "does not take 'groups'", "bits, group_size, rotate"]),
    ({**BASE, "key": {"codec": "uniform", "bits": 4.0}}, ["key:", "one of 2, 3, 4, 8", "4.0"]),
    ({**BASE, "key": {"codec": "uniform"}}, ["key:", "'uniform'", "bits"]),
    ({**BASE, "key": {"bits": 3}}, ["key:", "needs a 'codec' key", "bits"]),
    ({**BASE, "seed": -1}, ["seed:", "greater than or equal to 0", "-1"]),
    ({**BASE, "seed": "0"}, ["seed:", "valid integer", "'0'"]),
    ({**BASE, "overrides": [{"layers": "1-3", "key": "bf16"}]}, ["overrides.0.layers:", "bad selector '1-3'", "'a:b'"]),
    ({**BASE, "overrides": [{"layers": 1.5, "key": "bf16"}]}, ["overrides.0.layers:", "bad selector 1.5", "int"]),
    ({**BASE, "overrides": [{"heads": "0:2:0", "key": "bf16"}]}, ["overrides.0.heads:", "'0:2:0'", "step != 0"]),
    ({**BASE, "overrides": [{"layers": [], "key": "bf16"}]}, ["overrides.0.layers:", "selects nothing"]),
    ({**BASE, "overrides": [{"layers": [0, 6], "key": "bf16"}]},
     ["overrides.0.layers:", "layer index 6 out of range for 6 layers", "-6..5", "[0, 6]"]),
    ({**BASE, "overrides": [{"layers": -7, "key": "bf16"}]}, ["overrides.0.layers:", "index -7", "-6..5"]),
    ({**BASE, "overrides": [{"layers": "8:12", "key": "bf16"}]}, ["overrides.0.layers:", "'8:12' selects no layer"]),
    ({**BASE, "overrides": [{"layers": 0}, {"heads": 2, "key": "bf16"}]},
     ["overrides.1.heads:", "kv head index 2 out of range for 2 kv heads", "-2..1"]),
])
def test_errors_name_key_value_and_allowed(data, needles):
    msg = _error(data)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_file_errors(tmp_path):
    with pytest.raises(config.ConfigError, match="unknown kvq preset 'nope'; presets: (.*, )?kvq-mixed-example, "):
        config.load("nope")
    with pytest.raises(config.ConfigError, match="cannot read kvq config"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("key: [turboquant3\n")
    with pytest.raises(config.ConfigError, match="invalid YAML in"):
        config.load(bad)
    bad.write_text("- turboquant3\n")
    with pytest.raises(config.ConfigError, match="top level must be a mapping, got list"):
        config.load(bad)
    bad.write_text("key: turboquant3\nvalue: turboquant3\nsed: 1\n")
    with pytest.raises(config.ConfigError, match=rf"{bad}:\n  sed: unknown key"):
        config.load(bad)


def _show(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["config", "show", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_show_table_bytes_and_compression(capsys):
    rc, out, _ = _show(capsys, "kvq-mixed-example", "--layers", "6", "--kv-heads", "3", "--head-size", "64")
    assert rc == 0
    rows = [ln.split() for ln in out.splitlines() if ln[:5].strip().isdigit()]
    assert len(rows) == 6 * 3
    assert rows[0] == ["0", "0", "turboquant4", "turboquant4", "68", "68"]
    assert rows[6] == ["2", "0", "turboquant4", "turboquant3", "60", "60"]
    assert rows[7] == ["2", "1", "turboquant3", "turboquant3", "52", "60"]
    assert rows[-1][:4] == ["5", "2", "turboquant4", "turboquant4"]
    # by hand: 3 heads x (3 layers x 68 + 60 + 2 x 52) = 1104 B; bf16 6 x 3 x 2 x 64 x 2 = 4608 B
    assert "bytes per token (all layers, K+V, padding included): 1104  (bf16: 4608)" in out
    assert "compression vs bf16: 4.17x" in out
    assert "1224 B/token, 3.76x" in out  # every layer padded to 68 B


def test_cli_show_file_with_layout(capsys, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: c\nkey: uniform4\nvalue: {codec: turboquant, bits: 2}\n"
                 "overrides: [{layers: 1, key: {codec: turboquant3, scale_mode: norm}}]\n")
    rc, out, _ = _show(capsys, str(p), "--layers", "2", "--kv-heads", "1", "--head-size", "128", "--layout")
    assert rc == 0
    rows = [ln.split() for ln in out.splitlines() if ln[:5].strip().isdigit()]
    # the table names what runs, parameters included, not just the codec's preset name
    assert rows == [["0", "0", "uniform4", "turboquant(bits=2)", "102", "102"],
                    ["1", "0", "turboquant3(scale_mode=norm)", "turboquant(bits=2)", "84", "84"]]
    # layer 0: uniform4 K 64 + 4 = 68, turboquant2 V 32 + 2 = 34: 102 B; layer 1: 50 + 34 = 84 B;
    # 186 B per token against 2 x 2 x 128 x 2 = 1024 B of bf16
    assert "186  (bf16: 1024)" in out and "compression vs bf16: 5.51x" in out
    assert "K.scale_min" in out and "V.codes2" in out


def test_cli_errors_and_list(capsys):
    with pytest.raises(SystemExit):  # argparse: "--layers: must be a positive integer, got 0"
        _show(capsys, "turboquant3", "--layers", "0")
    assert "must be a positive integer, got 0" in capsys.readouterr().err
    rc, out, err = _show(capsys, "nope")
    assert rc == 2 and "unknown kvq preset 'nope'" in err and out == ""
    rc, out, err = _show(capsys, "kvq-mixed-example", "--layers", "2")
    assert rc == 2 and "overrides.1.layers: layer index 2 out of range for 2 layers" in err
    assert cli.main(["config", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in config.preset_names())


def test_cli_entry_point_in_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "vllm_kvq.cli", "config", "show", "turboquant3", "--layers", "1",
                        "--kv-heads", "8", "--head-size", "128"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "compression vs bf16: 5.12x" in r.stdout  # 512 / 100


def test_for_draft_drops_what_only_the_target_has():
    """A standalone draft model gets the target's YAML: selector items it lacks are dropped (an override left
    with none selects nothing but still sizes the slot), the target's calibration is not used, and each change
    is noted for the log."""
    from vllm_kvq.vllm.formats import slot_bytes

    cfg = config.from_dict({"key": "turboquant3", "value": "turboquant3",
                            "overrides": [{"layers": [0, 30], "key": "uniform8"},
                                          {"layers": "20:", "heads": 1, "value": "bf16"},
                                          {"heads": [1, 5], "key": "turboquant4"}]})
    cfg = cfg.model_copy(update={"calibration": "/x/target.safetensors"})  # loading would check the file
    draft, notes = config.for_draft(cfg, num_layers=4, num_kv_heads=2)
    assert draft.calibration is None and len(notes) == 4  # layers 30, "20:", head 5, calibration
    t = _names(draft, 4, 2)
    tq3, tq4 = ("turboquant3", "turboquant3"), ("turboquant4", "turboquant3")
    assert t == [[("uniform8", "turboquant3"), tq4]] + [[tq3, tq4]] * 3
    assert slot_bytes(draft, 64) == slot_bytes(cfg, 64)  # the bf16 override still sizes the slot
    unchanged, none = config.for_draft(config.from_dict({"key": "turboquant3", "value": "turboquant3",
                                                          "overrides": [{"layers": -1, "key": "uniform8"}]}), 4, 2)
    assert none == [] and _names(unchanged, 4, 2)[3][0] == ("uniform8", "turboquant3")
    with pytest.raises(config.ConfigError, match="out of range"):
        config.resolve(cfg, 4, 2)  # the target's own resolution still rejects them


def test_for_draft_keeps_the_drafts_own_model_calibration(tmp_path):
    """``calibration: model`` names each served model's own statistics: kept for a draft that has them,
    dropped (uncalibrated, with a note) for one that has not."""
    cfg = config.from_dict({"key": "turboquant3", "value": "turboquant3", "calibration": "model"})
    none_here, notes = config.for_draft(cfg, 4, 2, model=tmp_path)
    assert none_here.calibration is None and "no statistics of the draft" in notes[0]
    path = config.model_calibration_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # presence decides here; loading checks the contents later
    kept, notes = config.for_draft(cfg, 4, 2, model=tmp_path)
    assert kept.calibration == "model" and notes == []


def test_cli_show_with_a_model_reads_its_shape_and_calibration(capsys, tmp_path):
    """`config show PRESET --model DIR`: the model's shape replaces --layers/--kv-heads/--head-size, a
    `calibration: model` preset reads the model's statistics, and --block-size sizes the sink area."""
    import json

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "hidden_size": 256}))
    assert cli.main(["config", "show", "k3v3-cal-sink", "--model", str(model), "--block-size", "16"]) == 2
    assert "vllm-kvq calibrate" in capsys.readouterr().err  # no statistics yet: the error says what to run
    path = config.model_calibration_path(model)
    path.parent.mkdir()
    CalibrationStats(torch.zeros(3, 2, 64), torch.zeros(3, 2, 64), torch.ones(3, 2, 64)).save(path)
    assert cli.main(["config", "show", "k3v3-cal-sink", "--model", str(model), "--block-size", "16"]) == 0
    out = capsys.readouterr().out
    # 3 layers x 2 KV heads x (52 B of codes + 16 B of sink area per slot at 16-token blocks)
    assert "3 layers x 2 KV heads x head_size 64" in out and f"{3 * 2 * (52 + 16)}" in out
    assert "keys centred by a fixed mean" in out
    assert cli.main(["config", "show", "k3v3-cal-sink", "--model", str(model), "--block-size", "128"]) == 0
    assert f"{3 * 2 * (52 + 2)}" in capsys.readouterr().out
    # position-aware statistics (the file carries RoPE frequencies): the table says so
    CalibrationStats(torch.zeros(3, 2, 64), torch.zeros(3, 2, 64), torch.ones(3, 2, 64),
                     rope_freq=1e4 ** (-torch.arange(32) / 32)).save(path)
    assert cli.main(["config", "show", "k3v3-cal-sink", "--model", str(model), "--block-size", "16"]) == 0
    assert "mean that follows each key's RoPE position" in capsys.readouterr().out

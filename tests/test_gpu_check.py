"""scripts/gpu_check.sh in its CPU smoke mode: every step runs (Triton interpreter, tiny shapes) and the
Markdown report names each step and its result. On a GPU the same script is the prepared device check."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_writes_a_report(tmp_path):
    report = tmp_path / "report.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(report)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + (report.read_text()[-3000:] if report.exists() else "")
    text = report.read_text()
    assert "SMOKE mode" in text
    for name in ("environment", "build CUDA extension", "pytest -m gpu", "CUDA graph", "store + decode",
                 "store + decode: calibrated, sinks, fibquant2", "decode benchmark", "store benchmark"):
        assert f"| {name}" in text, name
    assert "| FAILED" not in text and "timed out" not in text
    assert "3 replays equal to eager" in text  # the graph step's own check ran and passed
    for fmt in ("turboquant3+calibration", "turboquant3+sinks4", "fibquant2"):  # the formats step compared each
        assert f"formats: triton {fmt}: store bytes differing" in text, fmt


def test_gpu_check_rejects_unknown_arguments():
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "--smoke" in p.stderr

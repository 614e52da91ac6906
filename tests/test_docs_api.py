"""docs/api.md is executable: its Python blocks run in order as one script, so the documented API cannot
drift from the code without this test failing."""

from __future__ import annotations

import re
from pathlib import Path

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_doc_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", API_MD.read_text(), flags=re.S)
    assert len(blocks) >= 5, "docs/api.md lost its examples"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{API_MD}:block{i}", "exec"), namespace)  # noqa: S102 - our own docs
    assert "turboquant3" in capsys.readouterr().out  # describe() printed something sensible

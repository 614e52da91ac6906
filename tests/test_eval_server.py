"""The eval clients against a real ``vllm serve`` of the tiny random Llama (default bf16 cache), started once
for this module: perplexity (checked against transformers on the same tokens), needle prompts, and the
packaged lm-eval tasks run by the real lm-eval. No mocks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vllm_kvq.eval import greedy, lmeval, models, needle, ppl, server, taskdata

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.make_tiny_llama(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def srv(tiny, tmp_path_factory):
    s = server.VllmServer(tiny, max_model_len=512, kv_cache_memory_bytes=64 << 20, startup_timeout=300,
                          log_path=tmp_path_factory.mktemp("log") / "server.log")
    s.start()
    try:
        yield s
    finally:
        s.stop()
    assert s.proc is None


@pytest.fixture(scope="module")
def text_ids(srv):
    text = models.TINY_TEXT * 4
    return server.tokenize(srv.base_url, srv.name, text)


def test_server_lists_model_and_root(srv, tiny):
    assert server.served_model(srv.base_url) == srv.name
    assert lmeval.model_root(srv.base_url, srv.name) == str(tiny)


def test_prompt_logprobs_match_transformers(srv, tiny, text_ids):
    from transformers import AutoModelForCausalLM

    ids = text_ids[:200]
    got = ppl.prompt_logprobs(srv.base_url, srv.name, ids)
    assert got[0] is None and len(got) == len(ids)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    diff = (torch.tensor(got[1:]) - want).abs()
    assert diff.mean() < 0.03 and diff.max() < 0.2, (float(diff.mean()), float(diff.max()))


def test_perplexity_windows_score_every_token_once(srv, text_ids):
    ids = text_ids[:700]
    res = ppl.perplexity(srv.base_url, ids, context=256, stride=128, progress=False)
    wins = ppl.sliding_windows(len(ids), 256, 128)
    assert res.windows == len(wins) and res.tokens_scored == len(ids) - 1 == len(res.token_nll)
    assert math.isclose(res.ppl, math.exp(sum(res.token_nll) / len(res.token_nll)), rel_tol=1e-9)
    # a random 512-token model is close to uniform: perplexity near the vocabulary size, not 1 or inf
    assert 100 < res.ppl < 2000
    # the first window's tokens score exactly as a single request over the same prompt
    first = ppl.prompt_logprobs(srv.base_url, srv.name, ids[:256])
    assert res.token_nll[:255] == pytest.approx([-x for x in first[1:]], abs=1e-4)
    out = res.to_json(with_tokens=False)
    assert "token_nll" not in out and json.dumps(out)


def test_prompt_topk_matches_transformers_and_self_kl_is_zero(srv, tiny, text_ids):
    from transformers import AutoModelForCausalLM

    ids = text_ids[:300]
    res = ppl.perplexity(srv.base_url, ids, context=200, stride=100, progress=False, top_k=5).to_json()
    assert len(res["token_topk"]) == res["tokens_scored"] and all(len(row) == 5 for row in res["token_topk"])
    # the first window's top-1 tokens are transformers' argmax wherever transformers is not near a tie
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:200]])).logits[0, :-1].float(), -1)
    top2 = logp.topk(2, -1)
    clear = (top2.values[:, 0] - top2.values[:, 1]) > 0.05
    server_top1 = torch.tensor([row[0][0] for row in res["token_topk"][:199]])
    assert clear.sum() > 100 and (server_top1[clear] == top2.indices[clear, 0]).all()
    again = ppl.perplexity(srv.base_url, ids, context=200, stride=100, progress=False, top_k=5).to_json()
    vs = ppl.kl_against(res, again)
    assert vs["kl"] == pytest.approx(0.0, abs=1e-6) and vs["top1_agreement"] == 1.0 and vs["top_k"] == 5
    assert ppl.kl_against(res, ppl.perplexity(srv.base_url, ids, context=200, stride=100,
                                              progress=False).to_json()) is None


def test_greedy_is_deterministic_and_compares_against_itself(srv, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(models.TINY_TEXT * 4)
    a = greedy.run_greedy(srv.base_url, str(text), prompts=3, prompt_len=100, gen=40)
    assert [len(o) for o in a["outputs"]] == [40] * 3 and len(set(a["starts"])) == 3
    b = greedy.run_greedy(srv.base_url, str(text), prompts=3, prompt_len=100, gen=40)
    vs = greedy.agreement(a, b)
    assert vs["agreement"] == vs["prefix_agreement"] == 1.0 and vs["first_divergence"] == [40] * 3


def test_ppl_cli_json(srv, tmp_path, capsys):
    from vllm_kvq.cli import main

    text = tmp_path / "t.txt"
    text.write_text(models.TINY_TEXT * 3)
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--base-url", srv.base_url, "--text", str(text), "--context", "128",
                 "--max-windows", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["windows"] == 2 and res["tokens_scored"] == 127 + 64 and res["ppl"] > 1
    common = ["eval", "ppl", "--base-url", srv.base_url, "--text", str(text), "--context", "128", "--max-windows", "2",
              "--top-k", "4", "--token-nll"]
    assert main(common + ["--out", str(tmp_path / "ref.json")]) == 0
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "again.json"), "--reference", str(tmp_path / "ref.json")]) == 0
    assert "vs reference +0.00%" in capsys.readouterr().out
    vs = json.loads((tmp_path / "again.json").read_text())["vs_reference"]
    assert vs["kl"] == pytest.approx(0.0, abs=1e-6) and vs["top1_agreement"] == 1.0 and vs["tokens"] == 191
    with pytest.raises(SystemExit, match="no per-token NLLs"):
        main(common + ["--reference", str(out)])

    gcommon = ["eval", "greedy", "--base-url", srv.base_url, "--text", str(text), "--prompts", "2", "--prompt-len",
               "64", "--gen", "16"]
    assert main(gcommon + ["--out", str(tmp_path / "g.json")]) == 0
    assert main(gcommon + ["--out", str(tmp_path / "g2.json"), "--reference", str(tmp_path / "g.json")]) == 0
    assert json.loads((tmp_path / "g2.json").read_text())["vs_reference"]["first_divergence"] == [16, 16]


def test_needle_fit_and_run(srv):
    count = lambda t: len(server.tokenize(srv.base_url, srv.name, t))  # noqa: E731
    units = needle.haystack_units("repeat")
    for target in (150, 400):
        n = needle.fit_units(count, units, target)
        got = count(needle.build_prompt(units, n, 0.5, "12345", target).text)
        assert target - 40 <= got <= target, (target, got)
    # 512 is the server's max_model_len: the prompt leaves room for the 12 generated tokens
    res = needle.run_needle(srv.base_url, [200, 512], depths=[0.0, 1.0], progress=False)
    assert len(res["trials"]) == 4 and set(res["accuracy_by_length"]) == {"200", "512"}
    assert all(t["tokens"] <= min(t["length"], 512 - 12) for t in res["trials"])
    # the random model cannot find the key; scoring reads the continuation, not the prompt
    assert res["accuracy"] == sum(t["correct"] for t in res["trials"]) / 4
    assert "key_nll_by_length" not in res and all(t["key_nll"] is None for t in res["trials"])


def test_needle_key_nll_matches_transformers(srv, tiny):
    from transformers import AutoModelForCausalLM

    res = needle.run_needle(srv.base_url, [200], depths=[0.3, 0.8], progress=False, with_key_nll=True)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    units = needle.haystack_units("repeat")
    count = lambda t: len(server.tokenize(srv.base_url, srv.name, t))  # noqa: E731
    n = needle.fit_units(count, units, 200 - 12)
    for t in res["trials"]:
        text = needle.build_prompt(units, n, t["depth"], t["key"], 200).text
        head = server.tokenize(srv.base_url, srv.name, text)
        full = server.tokenize(srv.base_url, srv.name, text + " " + t["key"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        want = -logp[len(head) - 1:-1].gather(1, torch.tensor(full[len(head):])[:, None]).sum().item()
        assert t["key_nll"] == pytest.approx(want, abs=0.2 * (len(full) - len(head))), (t["key_nll"], want)
    assert res["key_nll_by_length"]["200"] == pytest.approx(sum(t["key_nll"] for t in res["trials"]) / 2)


def test_lmeval_tasks_run_against_server(srv, tiny, tmp_path):
    res = lmeval.run_lmeval(srv.base_url, tasks=["kvq_shakespeare_ppl", "kvq_shakespeare_mc"], limit=2,
                            max_length=512, output_path=tmp_path / "out")
    ppl_task, mc = res["tasks"]["kvq_shakespeare_ppl"], res["tasks"]["kvq_shakespeare_mc"]
    assert ppl_task["bits_per_byte"] > 1.0 and ppl_task["word_perplexity"] > 1.0  # a random model is bad
    assert mc["acc"] in (0.0, 0.5, 1.0)
    assert res["headline"] == {"kvq_shakespeare_ppl": ppl_task["bits_per_byte"], "kvq_shakespeare_mc": mc["acc"]}
    assert f"tokenizer={tiny}" in " ".join(res["command"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["headline"] == res["headline"]

"""lm-evaluation-harness: our model class on two local tasks (offline), checked against our own ``lm``
(word perplexity of the same text) and against a hand computation of a multiple-choice answer."""

from __future__ import annotations

import math
import re

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'dynaprune[lm-eval]')")

from dynaprune.errors import DynapruneError  # noqa: E402
from dynaprune.integrations.lmeval import DynapruneLM  # noqa: E402
from dynaprune.integrations.lmeval_tasks import write_tasks  # noqa: E402

WINDOW = 128


@pytest.fixture(scope="module")
def smol(smollm2_path):
    from dynaprune import load

    return load(str(smollm2_path))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("lmeval")
    text = shared_data / "wikitext2" / "valid.txt"
    short = folder / "wiki-short.txt"
    short.write_text(text.read_text(encoding="utf-8")[:2500], encoding="utf-8")
    return write_tasks(folder / "tasks", short, shared_data / "sst2" / "dev.tsv", max_sst2=6), short


def run(model, tasks_folder, task, **kw):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=TaskManager(include_path=str(tasks_folder)),
                                   **kw)["results"][task]


@pytest.mark.parametrize("recipe", [None, "token=0.7"])
def test_rolling_word_perplexity_matches_our_lm(smol, tasks, recipe, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from dynaprune.api import evaluate

    folder, text_file = tasks
    got = run(DynapruneLM(model=smol, recipe=recipe, max_length=WINDOW), folder, "dynaprune_wikitext")
    ours = evaluate(smol, "lm", data=text_file, recipe=recipe, protocol="window", window=WINDOW)
    total_nll = ours["metric"]["nll"] * ours["metric"]["tokens"]
    words = len(re.split(r"\s+", text_file.read_text(encoding="utf-8")))
    assert got["word_perplexity,none"] == pytest.approx(math.exp(total_nll / words), rel=1e-4)


def test_multiple_choice_on_sst2_matches_a_hand_count(smol, tasks, monkeypatch):
    """Accuracy from lm-eval equals the share of sentences where our model, scored by hand (one forward
    of prompt + choice), prefers the right label."""
    import torch
    import torch.nn.functional as F

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder, _ = tasks
    got = run(DynapruneLM(model=smol, batch_size=4), folder, "dynaprune_sst2")
    import json

    docs = [json.loads(line) for line in (folder / "sst2.jsonl").read_text().splitlines()]
    tok = smol.tokenizer
    right = 0
    for doc in docs:
        prompt = f"Review: {doc['sentence']}\nSentiment:"
        scores = []
        for choice in ("negative", "positive"):
            p, whole = tok(prompt).input_ids, tok(prompt + " " + choice).input_ids
            with torch.no_grad():
                logp = F.log_softmax(smol(torch.tensor([whole[:-1]]))[0], -1)
            scores.append(sum(logp[i - 1, whole[i]].item() for i in range(len(p), len(whole))))
        right += int(max(range(2), key=scores.__getitem__) == doc["label"])
    assert got["acc,none"] == pytest.approx(right / len(docs))


def test_generate_until_and_batching(smol):
    from lm_eval.api.instance import Instance

    lm = DynapruneLM(model=smol, batch_size=2, max_gen_toks=8)
    reqs = [Instance("generate_until", {}, ("The capital of France is", {"until": ["\n"], "max_gen_toks": 8}), 0),
            Instance("generate_until", {}, ("1, 2, 3,", {"until": [","], "max_gen_toks": 8}), 0)]
    out = lm.generate_until(reqs)
    ref = smol.generate("1, 2, 3,", max_new_tokens=8).text
    assert out[1] == ref.split(",")[0] and "," not in out[1]
    pairs = [Instance("loglikelihood", {}, ("The cat sat on the", " mat"), 0),
             Instance("loglikelihood", {}, ("A much longer context that pads the other row", " away"), 0)]
    batched = DynapruneLM(model=smol, batch_size=2).loglikelihood(pairs)
    single = DynapruneLM(model=smol, batch_size=1).loglikelihood(pairs)
    assert [b[0] for b in batched] == pytest.approx([s[0] for s in single], abs=1e-4)


def test_unknown_model_arg_is_one_message(smol):
    with pytest.raises(DynapruneError, match=r"unknown model_args key 'colour'.*pretrained, model, recipe"):
        DynapruneLM(model=smol, colour="red")
    lm = DynapruneLM(model=smol, recipe="token=0.5", head=0.8)  # lm-eval split recipe=token=0.5,head=0.8
    assert str(lm.recipe) == "token=0.5,head=0.8"

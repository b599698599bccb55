"""The report's pruning pictures: real sentences picked from the data, a cached long generation."""

from __future__ import annotations

import json

import pytest

from dynaprune.errors import DynapruneError
from dynaprune.report.pictures import PictureSpec, draw_pictures, generated_ids, pick_sentence

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sentences_are_picked_from_the_data(shared_data):
    sentence = pick_sentence("sts", 12)
    assert len(sentence.split()) >= 12 and sentence == pick_sentence("sts", 12)
    assert pick_sentence("sts", 12, skip=1) != sentence
    assert len(pick_sentence("sst2", 18).split()) >= 18
    with pytest.raises(DynapruneError, match="no sentence of 10000"):
        pick_sentence("sts", 10000)


class FakeDecoder:
    """generate() like our decoders; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompt, chat, max_new_tokens):
        self.calls += 1

        class Out:
            prompt_ids = [1, 2, 3]
            new_ids = list(range(10, 10 + max_new_tokens))

        return Out()


def test_generation_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAPRUNE_CACHE", str(tmp_path))
    model = FakeDecoder()
    first = generated_ids(model, "m", "hello", 4)
    assert first == [1, 2, 3, 10, 11, 12, 13]
    assert generated_ids(model, "m", "hello", 4) == first and model.calls == 1
    assert generated_ids(model, "m", "hello", 5) != first and model.calls == 2
    cached = list((tmp_path / "generations").glob("*.json"))
    assert len(cached) == 2 and json.loads(cached[0].read_text())["model"] == "m"


def test_minilm_picture(minilm_path, shared_data, tmp_path):
    import dynaprune

    said = []
    pictures = draw_pictures(tmp_path, (PictureSpec("minilm-l6", "token=0.5", "sst2", min_words=15),),
                             load=dynaprune.load, say=said.append)
    assert len(pictures) == 1 and said
    picture = pictures[0]
    assert picture.path.read_bytes()[:8] == PNG_MAGIC
    assert "minilm-l6" in picture.caption and "token=0.5" in picture.caption
    assert pick_sentence("sst2", 15) in picture.caption

"""Fixtures of the static tests: the finetune tests' tiny BERT folder (``ft_fixtures.py``) and a tiny
fine-tuned classifier made from it."""

import pytest
from ft_fixtures import fine_tuned, tiny_bert_folder  # noqa: F401  (a fixture pytest finds here)


@pytest.fixture(scope="module")
def classifier(tiny_bert_folder, tmp_path_factory):  # noqa: F811  (the fixture above, by name)
    """A tiny fine-tuned classifier folder and its training TSV."""
    from dynaprune.finetune import save_classifier

    tmp = tmp_path_factory.mktemp("clf")
    model, _, _, tsv = fine_tuned(tiny_bert_folder, tmp, 96)
    save_classifier(model, tmp / "clf")
    return tmp / "clf", tsv

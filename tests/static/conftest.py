"""Fixtures of the static tests: the finetune tests' tiny BERT folder (``ft_fixtures.py``)."""

from ft_fixtures import tiny_bert_folder  # noqa: F401  (a fixture pytest finds here)

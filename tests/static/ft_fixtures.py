"""The finetune tests' helpers (``tests/finetune/conftest.py``: a tiny random BERT folder with a word
vocabulary, toy rows, TSV writing) for the static tests that fine-tune (recovery, distillation)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_FT_CONFTEST = Path(__file__).parents[1] / "finetune" / "conftest.py"
_spec = importlib.util.spec_from_file_location("finetune_conftest_static", _FT_CONFTEST)
ft = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ft)
tiny_bert_folder = ft.tiny_bert_folder  # the fixture, re-exported where a test module imports it


def fine_tuned(folder: Path, tmp: Path, rows: int):
    """The tiny BERT at ``folder`` fine-tuned 2 epochs on ``rows`` toy rows: (model, texts, labels, TSV)."""
    import dynaprune
    from dynaprune.finetune import FinetuneConfig, finetune, read_training_data

    tsv = ft.write_tsv(tmp / "train.tsv", ft.toy_rows(rows, 0))
    model = dynaprune.load(str(folder))
    train, labels = read_training_data(tsv)
    finetune(model, train, labels, None, FinetuneConfig(epochs=2, batch_size=16, lr=3e-3))
    return model, train, labels, tsv

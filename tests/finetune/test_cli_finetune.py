"""``dynaprune finetune`` through the CLI: a run that writes a checkpoint ``eval ... classify`` then uses,
and bad input: one clear message, exit code 2, no traceback, no checkpoint left behind."""

from __future__ import annotations

import json

import pytest


def run_ok(dynaprune_cli, folder, train, out, *extra):
    code, text = dynaprune_cli("finetune", str(folder), "--data", str(train), "-o", str(out),
                               "--batch-size", "16", "--lr", "3e-3", *extra)
    assert code == 0, text
    return text


def test_finetune_then_eval_with_the_models_own_head(dynaprune_cli, tiny_bert_folder, toy, tmp_path):
    train = toy.write_tsv(tmp_path / "train.tsv", toy.rows(48, 0, ("pos", "neg")))
    dev = toy.write_tsv(tmp_path / "dev.tsv", toy.rows(20, 1, ("pos", "neg")), header=None)
    text = run_ok(dynaprune_cli, tiny_bert_folder, train, tmp_path / "clf", "--dev", str(dev))
    assert "dev acc" in text and "steps/s" in text  # plain progress lines (not a terminal)
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["dynaprune"]["training"]["rows"] == 48
    report = tmp_path / "r.json"
    code, text = dynaprune_cli("eval", str(tmp_path / "clf"), "classify", "--data", str(dev), "--json", str(report))
    assert code == 0, text
    result = json.loads(report.read_text())
    assert result["extra"]["classifier"].startswith("fine-tuned head") and "n_train" not in result["extra"]
    logged = config["dynaprune"]["training"]["dev_accuracy"]
    assert result["metric"]["value"] == pytest.approx(logged)  # the same head, the same 20 sentences
    code, text = dynaprune_cli("eval", str(tmp_path / "clf"), "classify", "--data", str(dev), "--recipe", "token=0.5")
    assert code == 0, text


@pytest.mark.parametrize("case", ["one class", "no label column", "only empty lines", "empty text", "dev label"])
def test_bad_training_data(dynaprune_cli, tiny_bert_folder, toy, tmp_path, case):
    path = tmp_path / "train.tsv"
    rows = toy.rows(8)
    args = []
    if case == "one class":
        toy.write_tsv(path, [(t, 1) for t, _ in rows])
        want = "only one class"
    elif case == "no label column":
        path.write_text("sentence\n" + "\n".join(t for t, _ in rows) + "\n")
        want = "expected 2 (text<TAB>label)"
    elif case == "only empty lines":
        path.write_text("\n\n   \n\t\n")
        want = "empty file"
    elif case == "empty text":
        path.write_text("sentence\tlabel\ngood film\t1\n \t0\n")
        want = "line 3: empty text"
    else:
        toy.write_tsv(path, rows)
        toy.write_tsv(tmp_path / "dev.tsv", [("good film", 7)])
        args, want = ["--dev", str(tmp_path / "dev.tsv")], "labels ['7'] do not occur in the training data"
    code, text = dynaprune_cli("finetune", str(tiny_bert_folder), "--data", str(path), "-o",
                               str(tmp_path / "clf"), *args)
    assert code == 2 and want in text and "Traceback" not in text, text
    assert not (tmp_path / "clf").exists()


def test_existing_output_refused_unless_overwrite(dynaprune_cli, tiny_bert_folder, toy, tmp_path):
    train = toy.write_tsv(tmp_path / "train.tsv", toy.rows(16))
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "keep.txt").write_text("mine")
    code, text = dynaprune_cli("finetune", str(tiny_bert_folder), "--data", str(train), "-o", str(tmp_path / "clf"))
    assert code == 2 and "already exists" in text and "--overwrite" in text
    assert (tmp_path / "clf" / "keep.txt").read_text() == "mine"
    run_ok(dynaprune_cli, tiny_bert_folder, train, tmp_path / "clf", "--overwrite")
    assert (tmp_path / "clf" / "model.safetensors").is_file() and not (tmp_path / "clf" / "keep.txt").exists()


@pytest.mark.parametrize("args,want", [
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive number"),
    (["--pooling", "max"], "--pooling must be one of cls, mean"),
    (["--recipe", "token=2"], "token"),
    (["--recipe", "kv=0.5"], "kv"),
])
def test_bad_options(dynaprune_cli, tiny_bert_folder, toy, tmp_path, args, want):
    train = toy.write_tsv(tmp_path / "train.tsv", toy.rows(16))
    code, text = dynaprune_cli("finetune", str(tiny_bert_folder), "--data", str(train), "-o",
                               str(tmp_path / "clf"), *args)
    assert code == 2 and want in text and "Traceback" not in text, text
    assert not (tmp_path / "clf").exists()


def test_interrupted_run_writes_nothing(dynaprune_cli, tiny_bert_folder, toy, tmp_path, monkeypatch):
    import dynaprune.finetune.train as train_mod

    original = train_mod.bucketed_batches

    def interrupted(*a, **k):  # Ctrl-C in the middle of the epoch: after the second batch
        for i, batch in enumerate(original(*a, **k)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(train_mod, "bucketed_batches", interrupted)
    train = toy.write_tsv(tmp_path / "train.tsv", toy.rows(64))
    code, text = dynaprune_cli("finetune", str(tiny_bert_folder), "--data", str(train), "-o",
                               str(tmp_path / "clf"), "--batch-size", "8")
    assert code == 2 and "interrupted at step 2" in text and "no checkpoint was written" in text, text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.tsv"]  # no folder, no temporary one

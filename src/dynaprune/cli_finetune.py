"""``dynaprune finetune``: fine-tune a BERT-family encoder with a classification head on a
``text<TAB>label`` TSV and write the checkpoint folder atomically. Registered on the app by ``cli.py``."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from dynaprune.cli_common import _positive, console, err_console, status
from dynaprune.errors import DynapruneError


def _reporter(total_hint: str):
    """A rich progress bar with loss and dev accuracy on a terminal; a plain line every ~5% otherwise."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if err_console.is_terminal:
        bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[info]}"), console=err_console, transient=True)
        task = bar.add_task(total_hint, total=None, info="")

        def on_step(s) -> None:
            dev = "" if s.dev_accuracy is None else f" dev acc {s.dev_accuracy:.4f}"
            bar.update(task, completed=s.step, total=s.total, info=f"epoch {s.epoch} loss {s.loss:.4f}{dev}")

        return bar, on_step
    last = [0]

    def plain(s) -> None:
        every = max(1, s.total // 20)
        if s.step % every == 0 or s.step == s.total or s.dev_accuracy is not None and s.step != last[0] + 1:
            dev = "" if s.dev_accuracy is None else f"  dev acc {s.dev_accuracy:.4f}"
            err_console.print(f"step {s.step}/{s.total}  epoch {s.epoch}  loss {s.loss:.4f}  "
                              f"lr {s.lr:.2e}  {s.step / max(s.seconds, 1e-9):.2f} steps/s{dev}")
        last[0] = s.step

    return None, plain


def finetune_cmd(
    model_name: str = typer.Argument(..., metavar="MODEL", help="BERT-family alias or folder, e.g. minilm-l6"),
    data: Path = typer.Option(..., help="training TSV: text<TAB>label (header optional, int or string labels)"),
    dev: Path | None = typer.Option(None, help="dev TSV (same format): accuracy after each epoch"),
    out: Path = typer.Option(..., "--out", "-o", help="checkpoint folder to write (refused if it exists)"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder (only once the new one is whole)"),
    pooling: str = typer.Option("cls", help="cls ([CLS] + pooler, as transformers) or mean (dynaprune only)"),
    epochs: int = typer.Option(1, help="passes over the training data"),
    max_train: int | None = typer.Option(None, help="train on N random rows of --data"),
    lr: float = typer.Option(1e-4, help="peak AdamW learning rate"),
    batch_size: int = typer.Option(32, help="examples per step (length-bucketed)"),
    warmup: float = typer.Option(0.06, help="share of steps of linear warm-up (then linear decay to 0)"),
    seed: int = typer.Option(0, help="seed of the head's initialisation, the row subset and the batch order"),
    eval_every: int | None = typer.Option(None, help="dev accuracy every N steps (always after each epoch)"),
    recipe: str = typer.Option("", help="pruning recipe on during training (pruning-aware fine-tuning)"),
    train_embeddings: bool = typer.Option(False, help="also train the word-embedding table (slower on CPU)"),
) -> None:
    """Fine-tune an encoder with a classification head (AdamW, warm-up + linear decay, clipping)."""
    from dynaprune.eval.data import resolve_data_path
    from dynaprune.finetune import FinetuneConfig, finetune, read_training_data, save_classifier
    from dynaprune.finetune.checkpoint import check_output_folder
    from dynaprune.user_paths import check_input_file

    if epochs < 1:
        raise DynapruneError(f"--epochs must be a positive integer, got {epochs}")
    for name, value in (("--max-train", max_train), ("--batch-size", batch_size), ("--eval-every", eval_every)):
        _positive(name, value)
    cfg = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, warmup=warmup, seed=seed,
                         pooling=pooling, recipe=recipe, eval_every=eval_every,
                         train_embeddings=train_embeddings)
    cfg.check()
    check_output_folder(out, overwrite)  # before any work: an hour of training must not end in a refusal
    train_file = check_input_file(resolve_data_path(data), "training data file")
    train, labels = read_training_data(train_file, max_rows=max_train, seed=seed)
    dev_set = None
    if dev is not None:
        dev_file = check_input_file(resolve_data_path(dev), "dev data file")
        dev_set, _ = read_training_data(dev_file, labels=labels, what="dev data")
    from dynaprune import load

    with status(f"loading {model_name}") as say:
        model = load(model_name, say)
    bar, on_step = _reporter(model_name)
    console.print(f"fine-tuning {model_name} on {len(train.texts)} rows of {data} ({len(labels.labels)} classes: "
                  f"{', '.join(labels.labels[:10])}), {epochs} epoch(s), batch {batch_size}, lr {lr:g}, "
                  f"pooling {pooling}{', recipe ' + recipe if recipe else ''}")
    t0 = time.perf_counter()
    step = [0]

    def counted(s) -> None:
        step[0] = s.step
        on_step(s)

    try:
        if bar is not None:
            with bar:
                rep = finetune(model, train, labels, dev_set, cfg, counted)
        else:
            rep = finetune(model, train, labels, dev_set, cfg, counted)
    except KeyboardInterrupt:
        raise DynapruneError(f"interrupted at step {step[0]}; no checkpoint was written to {out}") from None
    training = {"base_model": model_name, "data": str(data), "dev": str(dev) if dev else None,
                "rows": len(train.texts), "epochs": epochs, "lr": lr, "batch_size": batch_size, "warmup": warmup,
                "seed": seed, "recipe": recipe, "train_embeddings": train_embeddings,
                "steps": rep.steps, "seconds": round(rep.seconds, 1),
                "steps_per_second": round(rep.steps_per_second, 3), "dev_accuracy": rep.dev_accuracy,
                "history": rep.history}
    try:
        folder = save_classifier(model, out, overwrite=overwrite, training=training)
    except KeyboardInterrupt:
        raise DynapruneError(f"interrupted while writing; no checkpoint was written to {out}") from None
    dev_text = "" if rep.dev_accuracy is None else f", dev accuracy {rep.dev_accuracy:.4f}"
    console.print(f"[green]✓[/] {rep.steps} steps in {time.perf_counter() - t0:.0f}s "
                  f"({rep.steps_per_second:.2f} steps/s){dev_text}; checkpoint: {folder}")

"""``dynaprune prune``: static structured pruning (heads, FFN width, layers) into a physically smaller
checkpoint, optional N:M / unstructured zeros, or ``--sensitivity`` (per-layer table + PNG).
Registered on the app by ``cli.py``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dynaprune.cli_common import console, status
from dynaprune.errors import DynapruneError


def prune_cmd(
    model_name: str = typer.Argument(..., metavar="MODEL", help="alias or folder (BERT or Llama family)"),
    heads: float = typer.Option(0.0, help="share of attention heads to remove, in [0, 1)"),
    ffn: float = typer.Option(0.0, help="share of FFN neurons to remove in every layer, in [0, 1)"),
    layers: int = typer.Option(0, help="number of whole layers to remove"),
    nm: str | None = typer.Option(None, help="N:M zeros in the block linears, e.g. 2:4 (shapes kept)"),
    sparsity: float = typer.Option(0.0, help="unstructured magnitude sparsity of the block linears (shapes kept)"),
    steps: int = typer.Option(1, help="steps of the exponential magnitude schedule"),
    criterion: str = typer.Option("taylor", help="head/FFN importance: taylor, entropy, confidence, spatten, "
                                  "magnitude"),
    layer_criterion: str = typer.Option("cosine", help="layer importance: cosine (input/output similarity) or "
                                        "sensitivity (calibration loss with the layer skipped)"),
    calib: Path = typer.Option(..., help="calibration data: STS pairs / text<TAB>label (BERT), text (Llama)"),
    max_calib: int = typer.Option(128, help="calibration examples (Llama: chunks of 256 tokens)"),
    finetune: Path | None = typer.Option(None, help="recovery fine-tuning after pruning: text<TAB>label rows "
                                         "(BERT classifiers; e.g. SST-2 train) or a text file (Llama: causal-LM "
                                         "loss on 512-token chunks, e.g. WikiText-2 valid; test splits refused)"),
    max_train: int = typer.Option(4000, help="--finetune: train on N random rows (Llama: 512-token chunks)"),
    finetune_epochs: int = typer.Option(1, help="--finetune: passes over those rows"),
    finetune_lr: float = typer.Option(1e-4, help="--finetune: peak AdamW learning rate"),
    finetune_warmup: float = typer.Option(0.06, help="--finetune: share of the steps warming the lr up"),
    distill: float = typer.Option(0.0, help="--finetune (BERT classifiers): weight in [0, 1] of knowledge "
                                  "distillation from the dense parent's logits (1 = pure KD)"),
    temperature: float = typer.Option(2.0, help="--distill: softmax temperature"),
    ffn_refit: str | None = typer.Option(None, help="least-squares refit of each pruned FFN down-projection on "
                                         "the calibration activations: output (or residual, BERT)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="output folder (refused if it exists)"),
    overwrite: bool = typer.Option(False, help="replace an existing output folder"),
    sensitivity: bool = typer.Option(False, help="print and plot per-layer sensitivity instead of pruning"),
    plot: Path | None = typer.Option(None, help="PNG of the sensitivity (default: beside -o or sensitivity.png)"),
) -> None:
    """Prune a model once (structured: smaller tensors) and save it; it then takes any run-time recipe."""
    from dynaprune.static.checkpoint import check_output_folder, save_pruned
    from dynaprune.static.prune import StaticConfig

    cfg = StaticConfig(heads=heads, ffn=ffn, layers=layers, criterion=criterion, layer_criterion=layer_criterion,
                       nm=nm, sparsity=sparsity, steps=steps, ffn_refit=ffn_refit)
    cfg.check()
    if max_calib < 1:
        raise DynapruneError(f"--max-calib must be a positive integer, got {max_calib}")
    recovery = None
    if finetune is not None:
        from dynaprune.static.recover import RecoveryConfig

        if sensitivity:
            raise DynapruneError("--finetune and --sensitivity do not go together")
        recovery = RecoveryConfig(finetune, max_train=max_train, epochs=finetune_epochs, lr=finetune_lr,
                                  warmup=finetune_warmup, distill=distill, temperature=temperature)
        recovery.check()
    elif distill:
        raise DynapruneError("--distill needs --finetune (it distils the dense parent during recovery)")
    if not sensitivity:
        if out is None:
            raise DynapruneError("give -o DIR for the pruned checkpoint")
        check_output_folder(out, overwrite)  # before any work
    from dynaprune import load
    from dynaprune.static.calib import load_calibration
    from dynaprune.static.structured import adapter

    with status(f"loading {model_name}"):
        model = load(model_name)
    adapter(model)
    train, teacher = None, None
    if recovery is not None:  # refuse a model or data it cannot train before any pruning
        from dynaprune.static.recover import check_recoverable, read_recovery_data

        check_recoverable(model)
        train, _ = read_recovery_data(model, recovery)
        if recovery.distill:
            import copy

            from dynaprune.static.recover import is_llama

            if is_llama(model):
                raise DynapruneError("--distill is supported for BERT classifiers only")
            teacher = copy.deepcopy(model).eval()  # the dense parent, before any pruning
    data = load_calibration(model, calib, max_examples=max_calib)
    if sensitivity:
        from dynaprune.static.sensitivity import plot as plot_png
        from dynaprune.static.sensitivity import sensitivity as run_sensitivity

        with status("sensitivity") as say:
            result = run_sensitivity(model, data, say)
        console.print(f"{result['metric']}: dense {result['dense']:.4f}")
        console.print(f"{'layer':>5} {'heads off':>12} {'FFN off':>12} {'layer off':>12}")
        for i, (h, f, w) in enumerate(zip(result["heads"], result["ffn"], result["layer"], strict=True)):
            console.print(f"{i:>5} {h:>12.4f} {f:>12.4f} {w:>12.4f}")
        png = plot or (Path(out).with_suffix(".png") if out else Path("sensitivity.png"))
        plot_png(result, png)
        import os
        import sys

        from dynaprune.io import write_json_atomic

        write_json_atomic(png.with_suffix(".json"), {
            **result, "model": model_name, "command": " ".join(["dynaprune", *sys.argv[1:]]),
            "calibration": {"file": str(calib), "examples": max_calib, "kind": data.kind},
            "load_average": list(os.getloadavg())})
        console.print(f"plot: {png} (values: {png.with_suffix('.json')})")
        return
    from dynaprune.static.prune import prune_model

    with status("pruning") as say:
        record = prune_model(model, data, cfg, say)
    record["calibration"] = {"file": str(calib), "examples": max_calib, "kind": data.kind}
    if recovery is not None:
        from dynaprune.static.recover import recover

        with status("recovery fine-tuning") as say:
            record["recovery"] = recover(model, recovery, train,
                                         lambda s: say(f"step {s.step}/{s.total} loss {s.loss:.3f}"), teacher)
    save_pruned(model, out, record, overwrite=overwrite)
    console.print(json.dumps({k: v for k, v in record.items() if k != "config"}), soft_wrap=True)
    console.print(f"[green]✓[/] {record['params']:,} of {record['params_parent']:,} parameters -> {out}")

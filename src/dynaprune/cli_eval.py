"""CLI commands that run a model on inputs: ``eval`` (one task, ``run_task``, also what ``sweep`` and
``demo`` call for each run), ``generate`` (text from a decoder) and ``run`` (one text, the tokens that
survive each layer). Registered on the app by ``cli.py``."""

from __future__ import annotations

from pathlib import Path

import typer

from dynaprune.cli_common import _positive, console, err_console, progress_bar, status
from dynaprune.errors import DynapruneError


def run_task(
    model_name: str, task: str, *, data: Path | None = None, recipe: str | None = None, model=None,
    random_seed: int | None = None, trace: Path | None = None, loader=None, **options,
):
    """``dynaprune.api.evaluate_task`` with the CLI's loading spinner and progress bar (what ``eval``,
    ``sweep`` and ``demo`` run): loads ``model_name`` (after every check) unless ``model`` is given;
    returns a TaskResult."""
    from dynaprune.api import evaluate_task

    return evaluate_task(model if model is not None else model_name, task, data=data, recipe=recipe, trace=trace,
                         loader=loader or _load_with_status, progress_scope=progress_bar, random_seed=random_seed,
                         model_name=model_name, **options)


def _load_with_status(name: str):
    from dynaprune import load

    with status(f"loading {name}") as say:
        return load(name, say)


def print_result(result, dense=None) -> None:
    """The eval table of a TaskResult (and, with ``dense``, the dense reference and the change)."""
    from dynaprune.cli_table import result_table

    console.print(result_table([result.to_json()], dense.to_json() if dense is not None else None))


def warn_long_defaults(task: str, max_train: int | None, max_tokens: int | None, max_examples: int | None) -> None:
    """A warning before a default that runs for long (the whole SST-2 training set, the whole text)."""
    if task in ("classify", "sst2") and max_train is None:
        err_console.print(f"[yellow]warning:[/] {task} without --max-train trains its probe on every training "
                          "sentence (67k for SST-2, ~30 min on a laptop CPU); --max-train 2000 is a quick look",
                          soft_wrap=True)
    if task == "lm" and max_tokens is None and max_examples is None:
        err_console.print("[yellow]warning:[/] lm without --max-tokens reads the whole text (WikiText-2 test: "
                          "~290k tokens); --max-tokens or --max-examples bound it", soft_wrap=True)


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
    compare_dense: bool = typer.Option(False, "--compare-dense", help=(
        "also run the dense model on the same inputs and show its value and the change")),
    trace: Path | None = typer.Option(None, help=(
        "write the SpAtten-schema workload trace of the first batch here (.csv, for `dynaprune hw simulate`)")),
) -> None:
    """Evaluate a model on a task; prints a table and optionally writes JSON."""
    from dynaprune.io import write_json_atomic
    from dynaprune.user_paths import check_output_file

    check_output_file(json_path, "--json")  # before the evaluation: a bad path must not lose a finished result
    if trace is not None and trace.suffix.lower() != ".csv":
        raise DynapruneError(f"--trace {trace}: give a path ending in .csv")
    options = dict(train_data=train_data, max_examples=max_examples, max_train=max_train, max_tokens=max_tokens,
                   window=window, protocol=protocol, context=context, continuation=continuation,
                   batch_size=batch_size, stream_tokens=stream_tokens, max_new_tokens=max_new_tokens, probe=probe)
    loaded: dict[str, object] = {}

    def load_once(name: str):  # called after every check; the dense reference reuses the model
        warn_long_defaults(task, max_train, max_tokens, max_examples)
        loaded[name] = _load_with_status(name)
        return loaded[name]

    result = run_task(model, task, data=data, recipe=recipe, trace=trace, loader=load_once, **options)
    dense = run_task(model, task, data=data, recipe=None, model=loaded.get(model), **options) if compare_dense else None
    print_result(result, dense)
    if trace is not None:
        console.print(f"wrote {trace} (simulate it: dynaprune hw simulate {trace})")
    if json_path:
        record = result.to_json()
        if dense is not None:  # the reference beside the run: its metric and its headline costs
            record["dense_reference"] = {"metric": dense.metric, "seconds": dense.seconds, "cost": {
                k: v for k, v in (dense.cost or {}).items() if isinstance(v, int | float)}}
        write_json_atomic(json_path, record)
        console.print(f"wrote {json_path}")


def generate(
    model: str = typer.Argument(..., help="decoder alias, folder or .gguf"),
    prompt: str = typer.Argument(..., help="the prompt text"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass"),
    seed: int | None = typer.Option(None, help="sampling seed"),
    chat: bool = typer.Option(False, help=(
        "apply the model's chat template (one user turn); off by default, as in the Python API")),
    recipe: str | None = typer.Option(None, help="pruning recipe, e.g. 'kv=0.25,score=h2o' (see README)"),
) -> None:
    """Generate text with a decoder (prefill + decode over our KV cache), optionally under a recipe."""
    from dynaprune.prune.recipe import Recipe

    if not prompt.strip():
        raise DynapruneError("empty prompt")
    _positive("--max-new-tokens", max_new_tokens)
    if temperature < 0 or not 0 < top_p <= 1:
        raise DynapruneError("--temperature must be >= 0 and --top-p in (0, 1]")
    parsed = Recipe.parse(recipe or "")  # before loading: a typo costs no model load
    m = _load_with_status(model)
    if not hasattr(m, "generate"):
        raise DynapruneError(f"{model} is an encoder; generate needs a decoder")
    from dynaprune.runtime.pruning import recipe_for_model

    parsed = recipe_for_model(parsed, m)  # kv_bytes=F: this model's own choice
    out = m.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     seed=seed, chat=chat, recipe=parsed)
    console.print(out.text)
    err_console.print(f"[dim]{len(out.new_ids)} tokens, stop: {out.stop_reason}, "
                      f"{out.decode_tokens_per_s:.1f} tok/s decode[/]")
    if not parsed.is_dense:
        err_console.print(f"[dim]{generation_cost_line(out.cost, parsed)}[/]", soft_wrap=True)


def generation_cost_line(cost: dict, recipe) -> str:
    """One line of what a generation under ``recipe`` kept (FLOPs, K/V bytes, budget, bits)."""
    parts = [f"recipe {recipe}"]
    if "flops_kept" in cost:
        parts.append(f"FLOPs kept {cost['flops_kept']:.3f}")
    if "kv_bytes_vs_fp16" in cost:
        parts.append(f"K/V bytes kept {cost['kv_bytes_vs_fp16']:.3f} of fp16")
    if cost.get("kv_budget_tokens") is not None:
        parts.append(f"KV budget {cost['kv_budget_tokens']} tokens")
    if "bits_fetched_vs_fp16" in cost:
        parts.append(f"bits fetched {cost['bits_fetched_vs_fp16']:.3f} of fp16")
    return ", ".join(parts)


def run(
    model: str = typer.Argument(..., help="alias (see `dynaprune models`), checkpoint folder, .gguf file"),
    text: str = typer.Option(..., "--text", "-t", help="ONE sentence or prompt to run"),
    recipe: str = typer.Option("token=0.5", help="pruning recipe, e.g. 'token=0.4', 'token=0.3,head=0.8'"),
    plot: Path | None = typer.Option(None, help="also draw the tokens x layers picture to this .png"),
    chat: bool = typer.Option(False, help="decoders: wrap the text in the model's chat template"),
    trace: Path | None = typer.Option(None, help=(
        "write the run's SpAtten-schema workload trace here (.csv, for `dynaprune hw simulate`)")),
) -> None:
    """Run one text under a recipe and show which tokens survive each layer (SpAtten Fig. 22/23)."""
    from dynaprune.prune.recipe import Recipe
    from dynaprune.prune.recipe_scope import check_recipe_applies
    from dynaprune.report.pruning_picture import plot_survival, render_terminal, trace_survival
    from dynaprune.user_paths import check_output_file

    if plot is not None and plot.suffix.lower() != ".png":
        raise DynapruneError(f"--plot {plot}: give a path ending in .png")
    if trace is not None and trace.suffix.lower() != ".csv":
        raise DynapruneError(f"--trace {trace}: give a path ending in .csv")
    check_output_file(plot, "--plot")
    check_output_file(trace, "--trace")
    check_recipe_applies(Recipe.parse(recipe), "run")  # one prefill: a KV budget would change nothing
    m = _load_with_status(model)
    survival = trace_survival(m, text, recipe, chat=chat, trace=trace)
    render_terminal(survival, console)
    if plot is not None:
        console.print(f"wrote {plot_survival(survival, plot)}")
    if trace is not None:
        console.print(f"wrote {trace} (simulate it: dynaprune hw simulate {trace})")

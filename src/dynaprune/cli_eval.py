"""CLI commands that run a model on inputs: ``eval`` (one task, ``run_task``, also what ``sweep`` and
``demo`` call for each run), ``generate`` (text from a decoder) and ``run`` (one text, the tokens that
survive each layer). Registered on the app by ``cli.py``."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from dynaprune.cli_common import _positive, console, err_console, progress_bar, status
from dynaprune.errors import DynapruneError
from dynaprune.eval.sweep import LM_PROTOCOLS, TASKS


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
            has_head = getattr(model, "head", None) is not None  # a fine-tuned classifier needs no probe
            if not has_head and (train_data is None or not Path(train_data).is_file()):
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


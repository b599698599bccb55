"""``dynaprune.evaluate``: one evaluation task under a recipe, the record ``dynaprune eval --json`` writes.

The CLI's ``eval``, ``sweep`` and ``demo`` run through :func:`evaluate_task` too, so the library and the
command line count costs one way (``runtime/run_cost.py``). Every input is checked (task, numbers, data
files, the recipe against the task and the model) before any model work; a mistake raises
:class:`DynapruneError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from dynaprune.errors import DynapruneError
from dynaprune.eval.sweep import LM_PROTOCOLS, TASKS

# every keyword option of evaluate() with its default (the CLI's defaults)
TASK_OPTIONS: dict[str, Any] = {
    "train_data": None, "max_examples": None, "max_train": None, "max_tokens": None, "window": 1024,
    "protocol": "window", "context": 1536, "continuation": 512, "batch_size": None, "stream_tokens": 4096,
    "max_new_tokens": 128, "probe": "dense",
}
POSITIVE = ("max_examples", "max_train", "max_tokens", "window", "batch_size", "context", "continuation",
            "stream_tokens", "max_new_tokens")


def evaluate(model: Any, task: str, *, data: str | Path | None = None, recipe: Any = None,
             trace: str | Path | None = None, **options: Any) -> dict:
    """Run ``task`` (sts, classify, sst2, lm, generate) on ``model`` (a loaded model or an alias / path)
    under ``recipe`` (a Recipe, its string, or None for dense) and return the record the CLI writes:
    ``metric``, ``cost`` (FLOPs kept, K/V bytes kept, ``pruning`` summary), ``extra``, ``recipe``, ...
    ``options`` are the CLI's task options by their Python names (``max_examples=``, ``protocol=``, ...);
    ``trace`` writes the SpAtten-schema workload trace of the first batch (``dynaprune hw simulate``)."""
    return evaluate_task(model, task, data=data, recipe=recipe, trace=trace, **options).to_json()


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(TASK_OPTIONS))
    if unknown:
        raise DynapruneError(f"unknown option {unknown[0]!r} of evaluate(); known: {', '.join(TASK_OPTIONS)}")
    opts = {**TASK_OPTIONS, **options}
    for name in POSITIVE:
        value = opts[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise DynapruneError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    return opts


def evaluate_task(
    model: Any, task: str, *, data: str | Path | None = None, recipe: Any = None, trace: str | Path | None = None,
    loader: Callable[[str], Any] | None = None, progress: Callable[[int, int], None] | None = None,
    progress_scope: Callable[[str], AbstractContextManager[Callable[[int, int], None]]] | None = None,
    random_seed: int | None = None, model_name: str | None = None, **options: Any,
):
    """:func:`evaluate` returning the TaskResult; ``loader(name)`` loads a model given by name (after every
    check; default ``dynaprune.load``), ``progress(done, total)`` follows the task (or, from the CLI, the
    callback ``progress_scope(label)`` yields while the task runs, after loading). A recipe with
    score=random runs once per seed of RANDOM_SEEDS (``random_seed`` None) and reports mean and spread."""
    from dynaprune.paths import default_data
    from dynaprune.prune.recipe import Recipe

    if task not in TASKS:
        raise DynapruneError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    opts = _check_options(options)
    parsed = recipe if isinstance(recipe, Recipe) else Recipe.parse(recipe or "")
    from dynaprune.eval.data import resolve_data_path
    from dynaprune.prune.recipe_scope import check_recipe_applies
    from dynaprune.user_paths import check_input_file, check_output_file

    protocol = opts["protocol"]
    if task == "lm" and protocol not in LM_PROTOCOLS:
        raise DynapruneError(f"unknown lm protocol {protocol!r} ({', '.join(LM_PROTOCOLS)})")
    check_recipe_applies(parsed, task, protocol=protocol)  # a key that would change nothing: before any work
    if trace is not None:
        check_output_file(Path(trace), "--trace")
    defaults = default_data(task)
    data = resolve_data_path(Path(data)) if data else defaults.get("data")
    train_data = resolve_data_path(Path(opts["train_data"])) if opts["train_data"] else defaults.get("train_data")
    if data is None:
        raise DynapruneError(f"task {task} has no default data file; give --data")
    data = check_input_file(data, "data file")
    if train_data is not None and task in ("classify", "sst2"):
        train_data = check_input_file(train_data, "training data file")
    if isinstance(model, str | Path):
        from dynaprune import load

        model_name = model_name or str(model)
        model = (loader or load)(str(model))
    model_name = model_name or getattr(model, "name", type(model).__name__)
    from dynaprune.runtime.attention import RunContext
    from dynaprune.runtime.pruning import make_context, recipe_for_model
    from dynaprune.runtime.run_cost import kv_budget_tokens, run_cost

    parsed = recipe_for_model(parsed, model)  # kv_bytes=F: this model's own choice
    make_context(parsed, model)  # validates the recipe against the model before any work
    if parsed.score == "random" and random_seed is None:  # one draw of a random baseline says little
        from dynaprune.eval.metrics import combine_seed_results
        from dynaprune.prune.baselines import RANDOM_SEEDS

        return combine_seed_results([evaluate_task(
            model, task, data=data, recipe=parsed, trace=trace if seed == RANDOM_SEEDS[0] else None,
            progress=progress, progress_scope=progress_scope, random_seed=seed, model_name=model_name,
            **{**options, "train_data": train_data})
            for seed in RANDOM_SEEDS], RANDOM_SEEDS)
    contexts: list[RunContext] = []

    def ctx_factory() -> RunContext:
        # only the first context traces: the trace is of the first input of the first batch
        contexts.append(make_context(parsed, model, seed=random_seed or 0, **({"trace": True} if (
            trace is not None and not contexts) else {})))
        return contexts[-1]

    t0 = time.perf_counter()
    if progress_scope is None:
        result = _run(model, model_name, task, data, train_data, opts, ctx_factory, progress)
    else:
        with progress_scope(f"{task} on {Path(data).name}") as scoped:
            result = _run(model, model_name, task, data, train_data, opts, ctx_factory, scoped)
    result.cost = {**run_cost(model, contexts), **(result.cost or {})}
    if parsed.has_kv_budget and not (result.extra or {}).get("kv_budget_tokens"):
        # the budget in tokens, whichever way the recipe gave it (kv share or kv_tokens)
        result.extra = {**(result.extra or {}), "kv_budget_tokens": kv_budget_tokens(contexts)}
    from dynaprune.static.record import eval_record

    static = eval_record(model, contexts)  # a statically pruned checkpoint: the pruning beside the recipe
    if static is not None:
        result.extra = {**(result.extra or {}), "static_pruning": static}
    result.recipe = str(parsed)
    result.model = model_name
    result.seconds = round(time.perf_counter() - t0, 3)
    if trace is not None:
        from dynaprune.runtime.trace import write_run_trace

        if not contexts:
            raise DynapruneError("the task ran no forward pass; there is no trace to write")
        write_run_trace(trace, contexts[0], config=f"dynaprune {model_name} {task} {parsed}")
    return result


def _require(model: Any, task: str, attribute: str, kind: str) -> None:
    if not hasattr(model, attribute):
        name = getattr(model, "name", "this model")
        other = "a decoder" if kind == "an encoder (sentence embeddings)" else "an encoder"
        raise DynapruneError(f"task {task} needs {kind}; {name} is {other}")


def _run(model, model_name: str, task: str, data: Path, train_data, opts: dict, ctx_factory, progress):
    if task == "sts":
        from dynaprune.eval.sts import evaluate_sts

        _require(model, task, "embed", "an encoder (sentence embeddings)")
        return evaluate_sts(model, data, max_examples=opts["max_examples"], batch_size=opts["batch_size"] or 32,
                            progress=progress, ctx_factory=ctx_factory)
    if task in ("classify", "sst2"):
        from dynaprune.eval.classify import evaluate_classify

        _require(model, task, "embed", "an encoder (sentence embeddings)")
        has_head = getattr(model, "head", None) is not None  # a fine-tuned classifier needs no probe
        if not has_head and (train_data is None or not Path(train_data).is_file()):
            raise DynapruneError(f"training data file not found: {train_data}")
        return evaluate_classify(model, data, train_data, max_train=opts["max_train"],
                                 max_examples=opts["max_examples"], batch_size=opts["batch_size"] or 32,
                                 progress=progress, ctx_factory=ctx_factory, probe=opts["probe"])
    if task == "generate":
        from dynaprune.eval.mtbench import evaluate_generate

        _require(model, task, "generate", "a decoder model")
        return evaluate_generate(model, data, max_new_tokens=opts["max_new_tokens"],
                                 max_examples=opts["max_examples"], batch_size=opts["batch_size"] or 16,
                                 progress=progress, ctx_factory=ctx_factory)
    from dynaprune.eval.lm import evaluate_lm

    _require(model, task, "generate", "a decoder model")
    return evaluate_lm(model, data, protocol=opts["protocol"], window=opts["window"], max_tokens=opts["max_tokens"],
                       context=opts["context"], continuation=opts["continuation"],
                       max_examples=opts["max_examples"], progress=progress, ctx_factory=ctx_factory,
                       stream_tokens=opts["stream_tokens"], batch_size=opts["batch_size"] or 8)

"""``dynaprune lm-eval [lm-eval options]``: register the ``dynaprune`` model with lm-evaluation-harness,
then hand the command line to lm-eval's own CLI (``lm-eval run --model dynaprune ...``)."""

from __future__ import annotations

import sys

import typer

from dynaprune.errors import DynapruneError

SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's argv for ours: the ``run`` subcommand and ``--model dynaprune`` unless given."""
    if args and args[0] in ("ls", "validate"):
        return ["lm-eval", *args]
    args = args[1:] if args[:1] == ["run"] else list(args)
    if not any(a == "--model" or a.startswith("--model=") for a in args):
        args = ["--model", "dynaprune", *args]
    return ["lm-eval", "run", *args]


def lm_eval_cmd(ctx: typer.Context) -> None:
    """Any lm-evaluation-harness task on our model under a recipe, e.g. ``dynaprune lm-eval --model_args
    pretrained=smollm2-135m,recipe=kv=0.25 --tasks hellaswag`` (every other option is lm-eval's own)."""
    try:
        from lm_eval._cli import HarnessCLI

        import dynaprune.integrations.lmeval  # noqa: F401  (registers the model)
    except ImportError:
        raise DynapruneError("lm-eval is not installed: pip install 'dynaprune[lm-eval]'") from None
    saved = sys.argv
    sys.argv = lm_eval_argv(list(ctx.args))
    try:
        parser = HarnessCLI()
        parser.execute(parser.parse_args())
    finally:
        sys.argv = saved

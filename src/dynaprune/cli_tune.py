"""The ``tune`` CLI command: re-derive ``kv_bytes=F`` (the composition of KV eviction and the packed
quantized cache within F of the fp16 K/V bytes) for a model and a validation text
(``calibrate/kv_bytes.py``). Registered on the app by ``cli.py``."""

from __future__ import annotations

from pathlib import Path

import typer

from dynaprune.cli_common import console, status
from dynaprune.errors import DynapruneError


def _fractions(text: str) -> list[float]:
    from dynaprune.prune.techniques.kv_bytes import check_kv_bytes

    out = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise DynapruneError(f"kv_bytes: {item.strip()!r} is not a number (--kv-bytes 0.25,0.125)") from None
        out.append(check_kv_bytes("kv_bytes", value))
    return out


def tune_cmd(
    model: str = typer.Argument(..., help="alias (see `dynaprune models`), checkpoint folder, .gguf file"),
    kv_bytes: str = typer.Option(..., "--kv-bytes", help="targets F in (0, 1], comma-separated: 0.25,0.125"),
    data: Path = typer.Option(..., help="validation text (never the test split)"),
    out: Path = typer.Option(..., "--out", "-o", help="choices JSON to write; use it with DYNAPRUNE_KV_BYTES=FILE"),
    chunks: int = typer.Option(2, help="chunks of context + continuation searched on"),
    context: int = typer.Option(1536, help="context tokens per chunk"),
    continuation: int = typer.Option(512, help="continuation tokens per chunk"),
) -> None:
    """Search the kv_bytes=F compositions (eviction share x K/V bits x allocation x score) on a validation
    text; write them as a choices file (DYNAPRUNE_KV_BYTES=FILE makes kv_bytes=F use it)."""
    fractions = _fractions(kv_bytes)
    if not data.is_file():
        raise DynapruneError(f"--data: {data}: no such text file")
    if chunks < 1 or context < 2 or continuation < 2:
        raise DynapruneError("--chunks must be >= 1, --context and --continuation >= 2")
    from dynaprune.user_paths import check_output_file

    check_output_file(out, "--out")
    from dynaprune import load
    from dynaprune.calibrate.kv_bytes import search
    from dynaprune.prune.techniques.kv_bytes import shape_key, write_choices
    from dynaprune.runtime.cost import cost_shape

    with status(f"loading {model}"):
        loaded = load(model)
    shape = cost_shape(loaded)
    if not shape.causal:
        raise DynapruneError(f"{model} is an encoder: kv_bytes budgets a decoder's KV cache")
    with status("searching") as say:
        found = search(loaded, data, fractions, chunks=chunks, context=context, continuation=continuation,
                       progress=say)
    if not found["choices"]:
        raise DynapruneError(f"{data}: too short for one chunk of {context} + {continuation} tokens")
    write_choices(out, shape_key(shape.layers, shape.heads, shape.kv_heads, shape.head_dim), found,
                  source=str(data), command=f"dynaprune tune {model} --kv-bytes {kv_bytes}", default=True)
    for c in found["choices"]:
        console.print(f"kv_bytes={c['kv_bytes']:g}: {c['recipe']}  valid perplexity {c['valid_perplexity']:.4f} "
                      f"(dense {found['dense_perplexity']:.4f}) at {c['measured_kv_bytes_vs_fp16']:.4f} of fp16")
    console.print(f"[green]✓[/] wrote {out}")

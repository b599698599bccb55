"""Per-layer sensitivity (guide section 3, 'Layer Sensitivity Analysis'): the calibration loss when one
layer's attention heads, its FFN, or the whole layer is switched off, one layer at a time.

Switching off is done with hooks on the dense model (heads: the output projection sees zeros, as if
every head were removed; FFN: the down-projection sees zeros; layer: the block returns its input), so
no copy of the model is made. Lower loss increase = more prunable."""

from __future__ import annotations

import math

import torch

from dynaprune.static.structured import adapter

PARTS = ("heads", "ffn", "layer")


def _mean_loss(model, calib) -> float:
    with torch.no_grad():
        losses = [float(calib.loss(model, b)) for b in calib]
    return sum(losses) / len(losses)


def layer_losses(model, calib) -> list[float]:
    """The mean calibration loss with each layer skipped in turn (the block returns its input)."""
    out = []
    for blk in model.layers:
        h = blk.register_forward_hook(lambda m, args, o: args[0])
        try:
            out.append(_mean_loss(model, calib))
        finally:
            h.remove()
    return out


def sensitivity(model, calib, progress=None) -> dict:
    """{"metric", "dense", "heads": [...], "ffn": [...], "layer": [...]} (one value per layer)."""
    arch = adapter(model)
    out: dict = {"metric": "perplexity" if calib.kind == "lm" else f"{calib.kind} calibration loss"}
    show = math.exp if calib.kind == "lm" else (lambda x: x)
    out["dense"] = show(_mean_loss(model, calib))
    for part in PARTS:
        out[part] = []
        for i in range(arch.n_layers):
            if part == "layer":
                h = model.layers[i].register_forward_hook(lambda m, args, o: args[0])
            else:
                lin = arch.out_proj(i) if part == "heads" else arch.ffn_down(i)
                h = lin.register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]),))
            try:
                out[part].append(show(_mean_loss(model, calib)))
            finally:
                h.remove()
            if progress:
                progress(f"{part} layer {i}")
    return out


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    n = len(result["layer"])
    for part in PARTS:
        ax.plot(range(n), result[part], marker="o", label=f"{part} removed")
    ax.axhline(result["dense"], color="k", ls="--", lw=1, label="dense")
    ax.set_xlabel("layer")
    ax.set_ylabel(result["metric"])
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("per-layer sensitivity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

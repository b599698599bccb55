"""The kv_bytes panel: WikiText-2 TEST perplexity vs ``cost.kv_bytes_vs_fp16`` (continue 1536 + 512, 8
chunks): ours as curves (``kv_bytes=F``; quantization alone from ``kv-quant.json``; eviction alone),
the peers (``results/peers/kvpress.json``: kvpress presses, transformers' quantized cache, compositions)
as points."""

from __future__ import annotations

import json
from pathlib import Path

from dynaprune.io import atomic_writer


def series(ours: Path) -> dict[str, list[tuple[float, float, str]]]:
    """label -> sorted (bytes, perplexity, recipe) of our curves."""
    rows = json.loads(ours.read_text())["rows"]
    out: dict[str, list] = {"kv_bytes=F (eviction x bits, shipped)": [], "eviction alone (fp16)": [],
                            "quantization alone": []}
    for recipe, r in rows.items():
        label = ("kv_bytes=F (eviction x bits, shipped)" if recipe.startswith("kv_bytes=") else
                 "eviction alone (fp16)" if recipe.startswith("kv=") and "bits" not in recipe else None)
        if label:
            out[label].append((r["kv_bytes_vs_fp16"], r["perplexity"], recipe))
    quant = ours.with_name("kv-quant.json")
    if quant.is_file():
        for recipe, r in json.loads(quant.read_text())["runs"].get("test", {}).items():
            if recipe.startswith("kv_bits=") and r["perplexity"] < 20:
                out["quantization alone"].append((r["kv_bytes_vs_fp16"], r["perplexity"], recipe))
    return {k: sorted(v) for k, v in out.items() if v}


def plot(ours: Path, peers: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(ours.read_text())["rows"]
    dense = rows.get("dense", {}).get("perplexity")
    quant = ours.with_name("kv-quant.json")
    if dense is None and quant.is_file():  # our dense on the same chunks (kv-quant.json, test)
        dense = json.loads(quant.read_text())["runs"].get("test", {}).get("dense", {}).get("perplexity")
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for (label, pts), marker in zip(series(ours).items(), ("o-", "s-", "^-"), strict=False):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=f"ours: {label}")
    if peers.is_file():
        for r in json.loads(peers.read_text())["rows"]:
            if r.get("split") == "test" and r.get("press") != "none":
                ax.plot(r["kv_bytes_vs_fp16"], r["perplexity"], "kx" if r["peer"] == "kvpress" else "k+", ms=8)
                ax.annotate(f"{r['peer']}: {r['press']}", (r["kv_bytes_vs_fp16"], r["perplexity"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    if dense:
        ax.axhline(dense, color="grey", lw=0.8, ls="--", label=f"dense {dense:.3f}")
        for share, ls in ((0.005, ":"), (0.03, "-."), (0.07, (0, (1, 4)))):
            ax.axhline(dense * (1 + share), color="grey", lw=0.5, ls=ls, label=f"dense +{share:.1%}")
    if dense:  # points far above (quanto 2 bits: 56) are off the panel, named in the title
        top = dense * 1.3
        off = [f"{r['peer']} {r['press']} {r['perplexity']:.1f}" for r in json.loads(peers.read_text())["rows"]
               if r.get("split") == "test" and r["perplexity"] > top] if peers.is_file() else []
        ax.set_ylim(dense * 0.99, top)
        if off:
            ax.text(0.99, 0.99, "off the panel: " + "; ".join(off), transform=ax.transAxes, ha="right", va="top",
                    fontsize=6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cost.kv_bytes_vs_fp16 (K/V bytes of the context read, vs the fp16 cache)")
    ax.set_ylabel("WikiText-2 test perplexity (8 chunks, continue 1536 + 512)")
    ax.set_title("SmolLM2-135M: perplexity vs KV bytes (peers: black points)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_writer(png, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)

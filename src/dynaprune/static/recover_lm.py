"""Recovery fine-tuning of a statically pruned Llama-family model (pruning guide section 4: "fine-tune
after pruning to recover accuracy") with the causal-LM loss on WikiText-2 *valid* (issue 18: never the
test split, which reports perplexity).

The text is tokenized once and cut into non-overlapping chunks of ``chunk`` tokens; ``max_train`` of
them (seeded random) are read once (``epochs`` passes), ``lm_batch`` chunks per AdamW step, with the
fine-tune's schedule (6% linear warm-up, linear decay to 0, gradient norm clipped at 1). The (tied)
token embeddings stay frozen, as ``dynaprune finetune`` keeps BERT's. The record lists the loss of
each step so that a reader sees it fall."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dynaprune.errors import DynapruneError


@dataclass(frozen=True)
class LMStep:
    step: int
    total: int
    loss: float


def read_lm_chunks(model, data: Path, chunk: int, max_chunks: int | None, seed: int) -> torch.Tensor:
    """(n, chunk) token ids of the recovery text; refuses a test split and a text shorter than a chunk."""
    from dynaprune.eval.data import resolve_data_path
    from dynaprune.eval.lm import read_tokens
    from dynaprune.user_paths import check_input_file

    path = check_input_file(resolve_data_path(data), "recovery fine-tuning text file")
    if "test" in path.name.lower():
        raise DynapruneError(f"{path}: recovery must not train on a test split (use WikiText-2 valid.txt)")
    ids = read_tokens(model, path, None)
    n = len(ids) // chunk
    if n == 0:
        raise DynapruneError(f"{path}: {len(ids)} tokens, fewer than one recovery chunk of {chunk}")
    chunks = torch.tensor(ids[: n * chunk], dtype=torch.long).view(n, chunk)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return chunks[order[: max_chunks or n]]


def train_lm(model, chunks: torch.Tensor, *, lr: float, epochs: int, batch: int, seed: int,
             warmup: float = 0.06, clip: float = 1.0, on_step=None) -> dict:
    """Train ``model`` in place on ``chunks`` with next-token cross-entropy; the training record."""
    torch.manual_seed(seed)
    frozen = {id(model.tok_embeddings.weight), id(model.output.weight)}  # tied in SmolLM2
    params = [p for p in model.parameters() if id(p) not in frozen and p.requires_grad]
    per_epoch = math.ceil(len(chunks) / batch)
    total = per_epoch * epochs
    warm = max(1, int(warmup * total))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm + 1)))
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen and flags[id(p)])
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    try:
        for _epoch in range(epochs):
            for start in range(0, len(chunks), batch):
                x = chunks[start: start + batch]
                logits = model(x)
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if on_step:
                    on_step(LMStep(len(losses), total, losses[-1]))
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    tenth = max(1, len(losses) // 10)
    return {"chunks": len(chunks), "chunk_tokens": int(chunks.shape[1]), "steps": len(losses),
            "loss_first_10pct": sum(losses[:tenth]) / tenth, "loss_last_10pct": sum(losses[-tenth:]) / tenth,
            "losses": [round(v, 4) for v in losses], "seconds": round(time.perf_counter() - t0, 1)}

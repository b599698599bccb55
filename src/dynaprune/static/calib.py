"""Calibration data for the importance criteria: a few batches and the loss each criterion needs.

- a Llama-family model: a text file (WikiText-2 *valid*, never test, for tuning), cut into chunks of
  ``seq_len`` tokens; loss = next-token cross-entropy;
- a BERT classifier (fine-tuned head): ``text<TAB>label`` rows; loss = cross-entropy on the labels;
- a BERT sentence encoder: STS pairs (STS-B *train*); loss = MSE between the pair's cosine and score/5.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from dynaprune.errors import DynapruneError
from dynaprune.static.structured import adapter


@dataclass
class Batch:
    ids: torch.Tensor  # (B, L)
    mask: torch.Tensor  # (B, L) True = real token
    target: torch.Tensor | None = None  # labels (B,) / STS scores (B/2,) / None for LM
    extra: dict = field(default_factory=dict)


@dataclass
class Calibration:
    kind: str  # "lm" | "classify" | "sts" | "random"
    batches: list[Batch]

    def loss(self, model, batch: Batch, ctx=None) -> torch.Tensor:
        """The task loss of one batch (what Taylor importance differentiates)."""
        if self.kind == "lm":
            logits = model(batch.ids, ctx=ctx)
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.ids[:, 1:].reshape(-1))
        hidden, kept = model(batch.ids, batch.mask, ctx=ctx)
        if self.kind == "classify":
            return F.cross_entropy(model.head(hidden, kept), batch.target)
        emb = model.pool(hidden, kept)
        if self.kind == "sts":
            a, b = emb[0::2], emb[1::2]
            return F.mse_loss(F.cosine_similarity(a, b), batch.target / 5.0)
        return emb.pow(2).mean()  # random tiny models in tests: any differentiable function of the output

    def forward(self, model, batch: Batch, ctx=None) -> None:
        if self.kind == "lm":
            model(batch.ids, ctx=ctx)
        else:
            model(batch.ids, batch.mask, ctx=ctx)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


def _pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = [torch.tensor(r) for r in rows]
    ids = pad_sequence(t, batch_first=True, padding_value=pad)
    lens = torch.tensor([len(r) for r in rows])
    return ids, torch.arange(ids.shape[1]) < lens[:, None]


def load_calibration(model, path: str | Path, *, max_examples: int = 128, batch_size: int = 16,
                     seq_len: int = 256) -> Calibration:
    """Read calibration data for ``model`` from ``path`` (see the module docstring for formats)."""
    from dynaprune.eval.data import load_labeled_text, load_sts, resolve_data_path
    from dynaprune.user_paths import check_input_file

    path = check_input_file(resolve_data_path(path), "calibration data file")
    arch = adapter(model)
    if model.tokenizer is None:
        raise DynapruneError(f"{model.name}: no tokenizer, so calibration text cannot be tokenized")
    batches: list[Batch] = []
    if arch.kind == "llama":
        text = path.read_text(errors="replace")
        ids = model.tokenizer(text[: 40 * seq_len * max_examples], add_special_tokens=False)["input_ids"]
        n = min(max_examples, len(ids) // seq_len)
        if n < 1:
            raise DynapruneError(f"{path}: calibration data is empty (fewer than {seq_len} tokens)")
        chunks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
        for s in range(0, n, max(1, batch_size // 4)):
            part = chunks[s:s + max(1, batch_size // 4)]
            batches.append(Batch(part, torch.ones_like(part, dtype=torch.bool)))
        return Calibration("lm", batches)
    pad = model.tokenizer.pad_token_id or 0
    if getattr(model, "head", None) is not None:
        rows = load_labeled_text(path)[:max_examples]
        labels = {lab: i for i, lab in enumerate(model.head.labels)}
        try:
            target = [labels[str(r.label)] for r in rows]
        except KeyError as e:
            raise DynapruneError(f"{path}: label {e.args[0]!r} is not one of the model's {model.head.labels}") from None
        toks = model.tokenize([r.text for r in rows])
        for s in range(0, len(rows), batch_size):
            ids, mask = _pad(toks[s:s + batch_size], pad)
            batches.append(Batch(ids, mask, torch.tensor(target[s:s + batch_size])))
        kind = "classify"
    else:
        pairs = load_sts(path)[:max_examples]
        toks = model.tokenize([s for p in pairs for s in (p.s1, p.s2)])
        half = max(1, batch_size // 2)
        for s in range(0, len(pairs), half):
            ids, mask = _pad(toks[2 * s:2 * (s + half)], pad)
            batches.append(Batch(ids, mask, torch.tensor([p.score for p in pairs[s:s + half]])))
        kind = "sts"
    if not batches:
        raise DynapruneError(f"{path}: calibration data is empty")
    return Calibration(kind, batches)

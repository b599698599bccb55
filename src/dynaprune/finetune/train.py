"""The fine-tuning loop: our Bert encoder + a classification head trained end to end by torch autograd.

AdamW (no weight decay on biases and LayerNorms), linear warm-up then linear decay to zero, gradient
clipping, a seed for the head's initialisation and the batch order, length-bucketed batches. With a
pruning recipe the run-time pruning is on in every training forward (a fresh context per batch, as at
evaluation): the kept tokens/heads/blocks are a function of that forward and gradients flow only
through what was kept, the pruning-aware fine-tuning of SpAtten Sec. 3 / HDP Sec. 4.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from dynaprune.errors import DynapruneError
from dynaprune.finetune.data import LabelMap, TrainingData, bucketed_batches
from dynaprune.models.bert_classifier import HEAD_POOLINGS, ClassifierHead


@dataclass
class FinetuneConfig:
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32
    warmup: float = 0.06  # share of all steps spent warming the learning rate up from 0
    weight_decay: float = 0.01
    clip: float = 1.0  # max global gradient norm
    seed: int = 0
    pooling: str = "cls"
    dropout: float = 0.1  # on the pooled output, as BertForSequenceClassification
    recipe: str = ""  # a pruning recipe on during training ("" = dense)
    eval_every: int | None = None  # dev accuracy every N steps (and always at the end of each epoch)
    # The word-embedding table is half of MiniLM's weights; on CPU its dense gradient and AdamW update
    # cost as much as the rest of a step, and freezing it barely moves accuracy (it is still fine-tuned
    # through everything above it). train_embeddings=True trains it too.
    train_embeddings: bool = False
    # Knowledge distillation from a teacher (the dense parent in recovery after static pruning; pruning guide
    # section 4, CoFi, Sheared-LLaMA): loss = (1 - distill) * CE + distill * T^2 * KL(teacher_T || student_T).
    distill: float = 0.0
    temperature: float = 2.0

    def check(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise DynapruneError(f"--epochs must be a positive integer, got {self.epochs}")
        if self.batch_size < 1:
            raise DynapruneError(f"--batch-size must be a positive number, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DynapruneError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise DynapruneError(f"--warmup must lie in [0, 1), got {self.warmup}")
        if self.pooling not in HEAD_POOLINGS:
            raise DynapruneError(f"--pooling must be one of {', '.join(HEAD_POOLINGS)}, got {self.pooling!r}")
        if not 0 <= self.distill <= 1 or not self.temperature > 0:
            raise DynapruneError(f"distillation weight must lie in [0, 1] and temperature be > 0, got "
                                 f"{self.distill}, {self.temperature}")
        if self.eval_every is not None and self.eval_every < 1:
            raise DynapruneError(f"--eval-every must be a positive number, got {self.eval_every}")


@dataclass
class StepInfo:
    step: int
    total: int
    epoch: int
    loss: float  # mean training loss since the last report
    lr: float
    dev_accuracy: float | None  # the latest dev accuracy, None before the first evaluation
    seconds: float


@dataclass
class FinetuneReport:
    steps: int
    seconds: float
    train_examples: int
    dev_accuracy: float | None
    history: list[dict] = field(default_factory=list)  # per evaluation: step, epoch, loss, dev accuracy

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def new_head(model, labels: LabelMap, cfg: FinetuneConfig) -> ClassifierHead:
    """A head initialised as transformers initialises BERT's (normal(0, 0.02), zero bias), seeded."""
    gen = torch.Generator().manual_seed(cfg.seed)
    head = ClassifierHead(model.config.hidden_size, list(labels.labels), cfg.pooling, cfg.dropout,
                          labels.label_type)
    with torch.no_grad():
        for lin in (head.pooler, head.classifier):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.02)
            lin.bias.zero_()
    return head


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases and LayerNorm gains are not decayed (BERT's recipe); "ln" names our LayerNorms.
        (no_decay if name.endswith(".bias") or "ln" in name.split(".")[-2] else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def dev_accuracy(model, dev: TrainingData, recipe: str, batch_size: int = 64) -> float:
    was_training = model.training
    model.eval()
    try:
        logits = model.classify_logits(dev.texts, recipe or None, batch_size=batch_size)
    finally:
        model.train(was_training)
    return float((logits.argmax(1) == torch.tensor(dev.targets)).float().mean())


def distill_loss(logits: torch.Tensor, teacher, x: torch.Tensor, mask: torch.Tensor, temperature: float):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al. 2015), batch mean."""
    with torch.no_grad():
        was = teacher.training
        teacher.eval()
        t_hidden, t_kept = teacher(x, mask, torch.zeros_like(x))
        t_logits = teacher.head(t_hidden, t_kept)
        teacher.train(was)
    return temperature ** 2 * F.kl_div((logits / temperature).log_softmax(1), (t_logits / temperature).log_softmax(1),
                                       log_target=True, reduction="batchmean")


def finetune(
    model, train: TrainingData, labels: LabelMap, dev: TrainingData | None, cfg: FinetuneConfig,
    on_step: Callable[[StepInfo], None] | None = None, teacher=None,
) -> FinetuneReport:
    """Train ``model`` (a Bert) and its head in place on ``train``; returns timings and dev accuracies.
    A head with the same labels and pooling is continued (pruning-aware fine-tuning of a fine-tuned
    classifier); otherwise a new one is initialised. With ``cfg.distill`` > 0 the ``teacher``'s logits
    (dense, no gradient) are distilled into the model."""
    cfg.check()
    if cfg.distill and teacher is None:
        raise DynapruneError("distillation needs a teacher model")
    if not hasattr(model, "classify_logits"):
        raise DynapruneError(f"{model.name}: fine-tuning needs a BERT-family encoder")
    if len(train.texts) == 0:
        raise DynapruneError(f"{train.path}: no training examples")
    ctx_of = None
    if cfg.recipe not in ("", "dense"):
        from dynaprune.prune.recipe import Recipe
        from dynaprune.prune.recipe_scope import check_recipe_applies
        from dynaprune.runtime.pruning import make_context

        parsed = Recipe.parse(cfg.recipe)
        check_recipe_applies(parsed, "classify")
        make_context(parsed, model)  # validates the recipe against the model before any work
        ctx_of = lambda: make_context(parsed, model)  # noqa: E731
    head = model.head
    if head is None or head.labels != list(labels.labels) or head.pooling != cfg.pooling:
        model.head = new_head(model, labels, cfg)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    ids = model.tokenize(train.texts)
    lengths = [len(x) for x in ids]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.config.pad_token_id
    per_epoch = math.ceil(len(ids) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    warm = int(cfg.warmup * total)
    model.tok_emb.weight.requires_grad_(cfg.train_embeddings)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        # update s (0-based) ramps (s + 1) / warm up to the peak, then decays linearly to 0 after the last
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm + 1)))
    targets = torch.tensor(train.targets)
    report = FinetuneReport(0, 0.0, len(ids), None)
    t0 = time.perf_counter()
    step, loss_sum, loss_n = 0, 0.0, 0
    model.train()
    try:
        for epoch in range(cfg.epochs):
            for batch in bucketed_batches(lengths, cfg.batch_size, rng):
                rows = [torch.tensor(ids[i]) for i in batch]
                x = pad_sequence(rows, batch_first=True, padding_value=pad)
                mask = torch.arange(x.shape[1]) < torch.tensor([len(r) for r in rows])[:, None]
                hidden, kept = model(x, mask, torch.zeros_like(x), ctx=ctx_of() if ctx_of else None)
                logits = model.head(hidden, kept)
                loss = F.cross_entropy(logits, targets[batch])
                if cfg.distill:
                    loss = (1 - cfg.distill) * loss + cfg.distill * distill_loss(logits, teacher, x, mask,
                                                                                 cfg.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip)
                opt.step()
                sched.step()
                step += 1
                loss_sum, loss_n = loss_sum + float(loss.detach()), loss_n + 1
                end_of_epoch = step % per_epoch == 0
                if dev is not None and (end_of_epoch or (cfg.eval_every and step % cfg.eval_every == 0)):
                    report.dev_accuracy = dev_accuracy(model, dev, cfg.recipe)
                    report.history.append({"step": step, "epoch": epoch + 1, "loss": loss_sum / loss_n,
                                           "dev_accuracy": report.dev_accuracy,
                                           "seconds": time.perf_counter() - t0})
                if on_step:
                    on_step(StepInfo(step, total, epoch + 1, loss_sum / loss_n, sched.get_last_lr()[0],
                                     report.dev_accuracy, time.perf_counter() - t0))
                if end_of_epoch or (cfg.eval_every and step % cfg.eval_every == 0):
                    loss_sum, loss_n = 0.0, 0
    finally:
        model.eval()
        model.tok_emb.weight.requires_grad_(True)
    report.steps, report.seconds = step, time.perf_counter() - t0
    return report

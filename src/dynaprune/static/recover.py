"""Recovery fine-tuning of a statically pruned model (pruning guide section 4: "fine-tune after pruning to
recover accuracy"; section 5's iterative schedule ends with it too).

A BERT classifier (a fine-tuned head travels with the pruned encoder) is trained again on
``text<TAB>label`` rows with ``dynaprune.finetune`` (same labels and pooling: the head is continued, not
re-initialised). A Llama-family model is trained with the causal-LM loss on chunks of a text file
(WikiText-2 *valid*, never test; ``static/recover_lm.py``). A sentence encoder (STS loss) has no
recovery loop here and is refused before any pruning is done."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from dynaprune.errors import DynapruneError


@dataclass(frozen=True)
class RecoveryConfig:
    data: Path
    max_train: int | None = 4000
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32
    seed: int = 0
    recipe: str = ""  # a run-time recipe on during recovery (the pruned model will run under it)
    chunk: int = 512  # Llama: tokens per training chunk (max_train counts chunks)
    lm_batch: int = 1  # Llama: chunks per step
    distill: float = 0.0  # BERT: weight of knowledge distillation from the dense parent's logits (recover(teacher=))
    temperature: float = 2.0
    warmup: float = 0.06  # BERT: share of the steps warming the learning rate up (FinetuneConfig.warmup)

    def check(self) -> None:
        if self.max_train is not None and self.max_train < 1:
            raise DynapruneError(f"--max-train must be a positive integer, got {self.max_train}")
        if self.epochs < 1:
            raise DynapruneError(f"--finetune-epochs must be a positive integer, got {self.epochs}")
        if not self.lr > 0:
            raise DynapruneError(f"--finetune-lr must be a positive number, got {self.lr}")
        if not 0 <= self.distill <= 1 or not self.temperature > 0:
            raise DynapruneError(f"--distill must lie in [0, 1] and --temperature be > 0, got {self.distill}, "
                                 f"{self.temperature}")
        if not 0 <= self.warmup < 1:
            raise DynapruneError(f"the recovery warm-up share must lie in [0, 1), got {self.warmup}")
        if self.chunk < 2 or self.lm_batch < 1:
            raise DynapruneError(f"recovery chunks need >= 2 tokens and >= 1 per step, got {self.chunk}, "
                                 f"{self.lm_batch}")


def is_llama(model) -> bool:
    from dynaprune.static.structured import adapter

    return adapter(model).kind == "llama"


def check_recoverable(model) -> None:
    """Refuse, before any work, a model this recovery loop cannot train."""
    from dynaprune.static.structured import adapter

    arch = adapter(model)
    if arch.kind == "llama":
        if model.tokenizer is None:
            raise DynapruneError(f"{model.name}: --finetune needs the model's tokenizer to read the text")
        return
    if getattr(model, "head", None) is None:
        raise DynapruneError(f"{model.name}: --finetune needs a fine-tuned classifier (a checkpoint from "
                             "`dynaprune finetune`); a sentence encoder has no recovery loop here")


def read_recovery_data(model, cfg: RecoveryConfig):
    """The training rows, with the classifier's own label map (unknown labels: one error naming them)."""
    from dynaprune.eval.data import resolve_data_path
    from dynaprune.finetune import LabelMap, read_training_data
    from dynaprune.user_paths import check_input_file

    cfg.check()
    if is_llama(model):
        from dynaprune.static.recover_lm import read_lm_chunks

        if cfg.recipe not in ("", "dense"):
            raise DynapruneError("a run-time recipe during recovery is supported for BERT classifiers only")
        return read_lm_chunks(model, cfg.data, cfg.chunk, cfg.max_train, cfg.seed), None
    path = check_input_file(resolve_data_path(cfg.data), "recovery fine-tuning data file")
    head = model.head
    labels = LabelMap(tuple(head.labels), head.label_type)
    train, _ = read_training_data(path, max_rows=cfg.max_train, seed=cfg.seed, labels=labels,
                                  what="recovery fine-tuning data")
    if not train.texts:
        raise DynapruneError(f"{path}: recovery fine-tuning data is empty")
    return train, labels


def recover(model, cfg: RecoveryConfig, train=None, on_step=None, teacher=None) -> dict:
    """Fine-tune the pruned ``model`` in place; the training record stored in its config."""
    from dynaprune.finetune import FinetuneConfig, LabelMap, finetune

    check_recoverable(model)
    if train is None:
        train, _ = read_recovery_data(model, cfg)
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    if is_llama(model):
        from dynaprune.static.recover_lm import train_lm

        record.update(loss="causal LM (next-token cross-entropy)",
                      **train_lm(model, train, lr=cfg.lr, epochs=cfg.epochs, batch=cfg.lm_batch, seed=cfg.seed,
                                 on_step=on_step))
        return record
    labels = LabelMap(tuple(model.head.labels), model.head.label_type)
    ft = FinetuneConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                        pooling=model.head.pooling, recipe=cfg.recipe, distill=cfg.distill,
                        temperature=cfg.temperature, warmup=cfg.warmup)
    report = finetune(model, train, labels, None, ft, on_step, teacher=teacher)
    record.update(rows=len(train.texts), steps=report.steps, seconds=round(report.seconds, 1))
    return record

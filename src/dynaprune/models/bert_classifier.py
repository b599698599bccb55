"""Sequence-classification head of the BERT encoder, in transformers' BertForSequenceClassification layout
(pooler dense + tanh, dropout, classifier), and the mapping of our weights back to HF tensor names.

With ``pooling="cls"`` a checkpoint gives the same logits in transformers; ``"mean"`` pools the mean of
the surviving real tokens before the same pooler, which only dynaprune reproduces (the config says so).
Labels are kept as strings (HF's ``id2label``) with ``label_type`` saying how the training file wrote them.
"""

from __future__ import annotations

import torch
from torch import nn

from dynaprune.errors import DynapruneError

HEAD_POOLINGS = ("cls", "mean")
MEAN_POOLING_NOTE = (
    "pooling=mean: the classifier reads the mean of the last states over real tokens, not [CLS]; "
    "transformers' BertForSequenceClassification loads these weights but pools [CLS], so only dynaprune "
    "reproduces this model's logits"
)


class ClassifierHead(nn.Module):
    """logits = classifier(dropout(tanh(pooler(pool(hidden))))); pool = [CLS] state or masked mean."""

    def __init__(self, hidden: int, labels: list[str], pooling: str = "cls", dropout: float = 0.1,
                 label_type: str = "str"):
        super().__init__()
        if pooling not in HEAD_POOLINGS:
            raise DynapruneError(f"unknown pooling {pooling!r} (known: {', '.join(HEAD_POOLINGS)})")
        if len(labels) < 2:
            raise DynapruneError(f"a classifier needs at least 2 labels, got {labels}")
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, len(labels))
        self.dropout = nn.Dropout(dropout)
        self.pooling = pooling
        self.labels = [str(x) for x in labels]  # class index -> label as written in the data
        self.label_type = label_type  # "int" when every training label was an integer

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # token pruning never drops [CLS]; final_states keeps position 0 first
        else:
            m = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return self.classifier(self.dropout(torch.tanh(self.pooler(pooled))))

    def label_of(self, index: int) -> int | str:
        """The label of class ``index`` in the type the training data used."""
        label = self.labels[index]
        return int(label) if self.label_type == "int" else label


def head_from_checkpoint(config: dict, state: dict[str, torch.Tensor], where: str) -> ClassifierHead | None:
    """The head of a BertForSequenceClassification checkpoint, None for any other (a plain encoder)."""
    archs = config.get("architectures") or []
    weight = state.get("classifier.weight")
    if weight is None or not any(str(a).endswith("ForSequenceClassification") for a in archs):
        return None
    n = weight.shape[0]
    id2label = config.get("id2label") or {}
    labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
    ours = config.get("dynaprune") or {}
    if config.get("problem_type") == "regression" or n < 2:
        raise DynapruneError(f"{where}: a regression head ({n} output) is not supported; classification only")
    head = ClassifierHead(int(config["hidden_size"]), labels, pooling=ours.get("pooling", "cls"),
                          dropout=float(config.get("classifier_dropout") or config.get("hidden_dropout_prob") or 0.1),
                          label_type=ours.get("label_type", "str"))
    try:
        head.load_state_dict({
            "pooler.weight": state["bert.pooler.dense.weight" if "bert.pooler.dense.weight" in state
                                   else "pooler.dense.weight"],
            "pooler.bias": state["bert.pooler.dense.bias" if "bert.pooler.dense.bias" in state
                                 else "pooler.dense.bias"],
            "classifier.weight": weight, "classifier.bias": state["classifier.bias"],
        })
    except KeyError as e:
        raise DynapruneError(f"{where}: classifier checkpoint lacks weight {e.args[0]!r}") from None
    except RuntimeError as e:
        raise DynapruneError(f"{where}: classifier weights do not match config.json ({e})") from None
    return head.eval()


def hf_state(model) -> dict[str, torch.Tensor]:
    """Our Bert (+ head) as BertForSequenceClassification tensors (``bert.`` prefix, split Q/K/V)."""
    s = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out = {
        "bert.embeddings.word_embeddings.weight": s["tok_emb.weight"],
        "bert.embeddings.position_embeddings.weight": s["pos_emb.weight"],
        "bert.embeddings.token_type_embeddings.weight": s["type_emb.weight"],
        "bert.embeddings.LayerNorm.weight": s["emb_ln.weight"],
        "bert.embeddings.LayerNorm.bias": s["emb_ln.bias"],
    }
    for i in range(model.config.num_layers):
        p, o = f"bert.encoder.layer.{i}.", f"layers.{i}."
        for t in ("weight", "bias"):
            qkv = s[o + "qkv." + t]
            n = qkv.shape[0] // 3  # = d unless the layer's heads were removed (static pruning)
            for j, name in enumerate(("query", "key", "value")):
                out[p + f"attention.self.{name}.{t}"] = qkv[j * n:(j + 1) * n].clone()
            out[p + f"attention.output.dense.{t}"] = s[o + "proj." + t]
            out[p + f"attention.output.LayerNorm.{t}"] = s[o + "ln1." + t]
            out[p + f"intermediate.dense.{t}"] = s[o + "fc1." + t]
            out[p + f"output.dense.{t}"] = s[o + "fc2." + t]
            out[p + f"output.LayerNorm.{t}"] = s[o + "ln2." + t]
    head = getattr(model, "head", None)
    if head is not None:
        out["bert.pooler.dense.weight"] = s["head.pooler.weight"]
        out["bert.pooler.dense.bias"] = s["head.pooler.bias"]
        out["classifier.weight"] = s["head.classifier.weight"]
        out["classifier.bias"] = s["head.classifier.bias"]
    return {k: v.float().contiguous() for k, v in out.items()}

"""BERT-family encoder (all-MiniLM-L6-v2, plain BERT checkpoints): compact, dense path = transformers.

Post-LayerNorm blocks, absolute position and token-type embeddings at the input, fused QKV projection.
Every attention call goes through ``runtime.attention`` and every block is followed by
``ctx.between_layers`` so a pruning context can drop heads or gather surviving tokens; the model itself
never knows which technique is on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from dynaprune.errors import DynapruneError
from dynaprune.models.checkpoint import read_config, read_safetensors, strip_prefix
from dynaprune.models.sentence_folder import load_tokenizer, read_sentence_transformers
from dynaprune.runtime.attention import DENSE, RunContext, attention

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU, what BERT and MiniLM use
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
# Checkpoint tensors that are not part of the encoder we run (pooler/classifier heads, MLM head, buffers).
IGNORED_PREFIXES = ("pooler.", "classifier.", "cls.", "embeddings.position_ids", "qa_outputs.")


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    # a statically pruned checkpoint (dynaprune prune): heads / FFN width of each layer; None = uniform
    layer_heads: list[int] | None = None
    layer_intermediate: list[int] | None = None
    static_record: dict | None = None  # config.json's dynaprune_static: what dynaprune prune removed

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def heads_of(self, layer: int) -> int:
        return self.num_heads if self.layer_heads is None else self.layer_heads[layer]

    def ffn_of(self, layer: int) -> int:
        return self.intermediate_size if self.layer_intermediate is None else self.layer_intermediate[layer]

    @classmethod
    def from_hf(cls, d: dict) -> BertConfig:
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise DynapruneError(f"model_type {model_type!r} is not a BERT checkpoint (expected 'bert')")
        pos_type = d.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise DynapruneError(f"position_embedding_type {pos_type!r} is not supported (only 'absolute')")
        act = d.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise DynapruneError(f"hidden_act {act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        try:
            cfg = cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=int(d["hidden_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=int(d["num_attention_heads"]),
                intermediate_size=int(d["intermediate_size"]),
                max_position_embeddings=int(d.get("max_position_embeddings", 512)),
                type_vocab_size=int(d.get("type_vocab_size", 2)),
                layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
                hidden_act=act,
                pad_token_id=int(d.get("pad_token_id") or 0),
            )
            from dynaprune.static.shapes import per_layer_shapes, read_static_record  # pruned checkpoints

            cfg.layer_heads, cfg.layer_intermediate = per_layer_shapes(d, cfg.num_layers, cfg.num_heads)
            cfg.static_record = read_static_record(d)
        except KeyError as e:
            raise DynapruneError(f"config.json lacks {e.args[0]!r}, needed for a BERT model") from None
        except (TypeError, ValueError) as e:
            raise DynapruneError(f"config.json has an invalid value: {e}") from None
        if cfg.hidden_size % cfg.num_heads:
            raise DynapruneError(
                f"hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads {cfg.num_heads}"
            )
        return cfg


class Block(nn.Module):
    """Post-LN encoder block: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: BertConfig, layer: int = 0):
        super().__init__()
        d = cfg.hidden_size
        self.n_head, self.head_dim = cfg.heads_of(layer), cfg.head_dim
        width = self.n_head * self.head_dim  # < d once heads were pruned away (dynaprune prune)
        self.qkv = nn.Linear(d, 3 * width)  # fused query/key/value: one GEMM instead of three
        self.proj = nn.Linear(width, d)
        self.ln1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, cfg.ffn_of(layer))
        self.fc2 = nn.Linear(cfg.ffn_of(layer), d)
        self.ln2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, layer: int, ctx: RunContext
    ) -> torch.Tensor:
        B, L, d = x.shape
        plan = ctx.head_plan()  # pruned heads: their projections are skipped
        if plan is None:
            q, k, v = self.qkv(x).view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = plan.qkv(x, self.qkv)
        y = attention(q, k, v, layer=layer, ctx=ctx, key_padding_mask=mask)  # (B, H, L, D)
        projected = self.proj(y.transpose(1, 2).reshape(B, L, -1)) if plan is None else plan.output(y, self.proj)
        x = self.ln1(x + projected)
        return self.ln2(x + self.fc2(self.act(self.fc1(x))))


class Bert(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_position_embeddings, d)
        self.type_emb = nn.Embedding(max(cfg.type_vocab_size, 1), d)
        self.emb_ln = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        # Sentence-embedding recipe; from_hf_folder overrides these from sentence-transformers' configs.
        self.name = "bert"
        self.tokenizer = None
        self.max_seq_length = cfg.max_position_embeddings
        self.pooling = "mean"  # "mean" | "cls"
        self.normalize = False
        self.lowercase = False  # sentence-transformers' do_lower_case
        self.head = None  # a ClassifierHead (models/bert_classifier.py) when fine-tuned for classification

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        ctx: RunContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The states to pool (B, L', d) and their real-token mask (B, L'), as ``ctx.final_states`` gives
        them: dense, the last block's states (L' = L); a token-pruning context may return only the
        survivors (L' < L) or put back the states pruned tokens had when they left."""
        ctx = ctx or DENSE
        cfg = self.config
        B, L = input_ids.shape
        if L > cfg.max_position_embeddings:
            raise DynapruneError(
                f"sequence of {L} tokens is longer than the model's {cfg.max_position_embeddings} positions "
                f"(forward() does not truncate; embed() truncates at max_seq_length={self.max_seq_length})"
            )
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
            raise DynapruneError(f"token ids must lie in [0, {cfg.vocab_size}) for this model")
        mask = (
            torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
            if attention_mask is None
            else attention_mask.to(torch.bool)
        )
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
        x = self.tok_emb(input_ids) + self.pos_emb(pos)
        if token_type_ids is not None:
            x = x + self.type_emb(token_type_ids)
        else:
            x = x + self.type_emb.weight[0]  # HF default: all-zero token types
        x = self.emb_ln(x)
        # "pos" = original token index, so a pruning context can keep [CLS] and report which tokens survive.
        keep = {"mask": mask, "pos": pos}
        for i, block in enumerate(self.layers):
            m = keep["mask"]
            # No padding left: let SDPA take its unmasked (faster) path; identical result.
            x = block(x, None if bool(m.all()) else m, i, ctx)
            x, keep = ctx.between_layers(i, x, keep)
        return ctx.final_states(x, keep)

    # ---- sentence embeddings (sentence-transformers recipe) ----

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pool (B, L, d) over the surviving real tokens, then L2-normalize if the recipe says so."""
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = mask.to(hidden.dtype).unsqueeze(-1)
            out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers' clamp
        return F.normalize(out, p=2, dim=1) if self.normalize else out

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated at max_seq_length (special tokens included)."""
        if self.tokenizer is None:
            raise DynapruneError(f"{self.name}: no tokenizer files were found with this model")
        texts = [t.strip().lower() if self.lowercase else t.strip() for t in texts]
        enc = self.tokenizer(
            texts, truncation=True, max_length=self.max_seq_length,
            return_attention_mask=False, return_token_type_ids=False,
        )
        return enc["input_ids"]

    def embed(
        self,
        texts: Sequence[str],
        recipe: object | None = None,
        *,
        batch_size: int = 32,
        ctx_factory: Callable[[], RunContext] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Sentence embeddings (N, d): tokenize with truncation at ``max_seq_length``, run the encoder,
        pool over real tokens (mean or CLS) and L2-normalize when the model's recipe does.
        (``classify_logits`` runs the same loop through the classification head.)

        Texts are sorted by length into batches (little padding) and the order is restored.
        ``recipe`` (a Recipe or its string form) or ``ctx_factory`` gives each batch a fresh RunContext
        (the pruning hooks); ``progress(done, total)`` is called after each batch."""
        return self._run_batches(texts, recipe, self.pool, self.config.hidden_size, batch_size=batch_size,
                                 ctx_factory=ctx_factory, progress=progress)

    def classify_logits(
        self,
        texts: Sequence[str],
        recipe: object | None = None,
        *,
        batch_size: int = 32,
        ctx_factory: Callable[[], RunContext] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Logits (N, labels) of the fine-tuned classification head (``self.head``), batched as ``embed``."""
        if self.head is None:
            raise DynapruneError(f"{self.name} has no classification head (fine-tune one: dynaprune finetune)")
        return self._run_batches(texts, recipe, self.head, len(self.head.labels), batch_size=batch_size,
                                 ctx_factory=ctx_factory, progress=progress)

    def encode(self, sentences: str | Sequence[str], recipe: object | None = None, *, batch_size: int = 32,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """sentence-transformers' ``encode``: one string gives one embedding (d,), a list gives (N, d);
        the result carries ``.cost`` like ``embed``'s."""
        single = isinstance(sentences, str)
        out = self.embed([sentences] if single else sentences, recipe, batch_size=batch_size, progress=progress)
        if single:
            cost, out = out.cost, out[0]
            out.cost = cost
        return out

    def _run_batches(self, texts, recipe, reduce, width: int, *, batch_size, ctx_factory, progress) -> torch.Tensor:
        from dynaprune.runtime.pruning import make_context
        from dynaprune.runtime.run_cost import call_cost

        if recipe is not None and ctx_factory is not None:
            raise DynapruneError("give recipe= or ctx_factory=, not both (a recipe makes its own contexts)")
        if ctx_factory is None:  # a Recipe or its string form (or dense): one fresh context per batch
            make_context(recipe, self)  # validate before any work
            ctx_factory = lambda: make_context(recipe, self)  # noqa: E731
        contexts = []
        if isinstance(texts, str):
            raise DynapruneError("embed() takes a list of texts, not a single string")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DynapruneError(f"text {i} is a {type(t).__name__}, not a string")
            if not t.strip():
                raise DynapruneError(f"text {i} is empty (or only whitespace)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise DynapruneError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(texts)
        device = self.tok_emb.weight.device
        out = torch.empty(n, width)
        ids = self.tokenize(texts) if n else []
        order = sorted(range(n), key=lambda i: -len(ids[i]))  # longest first: memory peak shows up early
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        pad = self.config.pad_token_id if pad is None else pad
        if progress:
            progress(0, n)
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                rows = [torch.tensor(ids[i]) for i in idx]
                batch = pad_sequence(rows, batch_first=True, padding_value=pad).to(device)
                lens = torch.tensor([len(r) for r in rows], device=device)
                mask = torch.arange(batch.shape[1], device=device) < lens[:, None]
                ctx = ctx_factory()
                contexts.append(ctx)
                hidden, kept = self(batch, mask, torch.zeros_like(batch), ctx=ctx)
                out[idx] = reduce(hidden, kept).float().cpu()
                if progress:
                    progress(min(start + batch_size, n), n)
        out.cost = call_cost(self, contexts)  # what the call kept (runtime/run_cost.py), as generate's .cost
        return out

    # ---- loading ----

    @classmethod
    def from_hf_folder(cls, path: str | Path, name: str | None = None) -> Bert:
        """Load a BERT checkpoint folder (BertModel / BertFor* safetensors, config.json, tokenizer) and,
        when present, sentence-transformers' pooling, normalization and max_seq_length."""
        folder = Path(path)
        if not folder.is_dir():
            raise DynapruneError(f"{folder}: not a model folder")
        cfg = BertConfig.from_hf(read_config(folder))
        model = cls(cfg)
        state = read_safetensors(folder)
        model.load_hf_state(state, str(folder))
        from dynaprune.models.bert_classifier import head_from_checkpoint

        model.head = head_from_checkpoint(read_config(folder), state, str(folder))
        model.name = name or (folder.parent.name if folder.name in ("model", "") else folder.name)
        model.tokenizer = load_tokenizer(folder)
        read_sentence_transformers(model, folder)
        return model.eval()

    def load_hf_state(self, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
        """Map HF tensor names (with or without the ``bert.`` prefix) onto our modules."""
        state = strip_prefix(state, ("bert.",))
        # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
        state = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
                 for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}

        def take(key: str) -> torch.Tensor:
            if key not in state:
                raise DynapruneError(f"{where}: weight {key!r} is missing (not a BERT checkpoint?)")
            return state.pop(key)

        ours: dict[str, torch.Tensor] = {
            "tok_emb.weight": take("embeddings.word_embeddings.weight"),
            "pos_emb.weight": take("embeddings.position_embeddings.weight"),
            "emb_ln.weight": take("embeddings.LayerNorm.weight"),
            "emb_ln.bias": take("embeddings.LayerNorm.bias"),
        }
        type_key = "embeddings.token_type_embeddings.weight"
        ours["type_emb.weight"] = (
            state.pop(type_key) if type_key in state else torch.zeros_like(self.type_emb.weight)
        )
        for i in range(self.config.num_layers):
            p, o = f"encoder.layer.{i}.", f"layers.{i}."
            for t in ("weight", "bias"):
                ours[o + "qkv." + t] = torch.cat(
                    [take(p + f"attention.self.{n}.{t}") for n in ("query", "key", "value")]
                )
                ours[o + "proj." + t] = take(p + f"attention.output.dense.{t}")
                ours[o + "ln1." + t] = take(p + f"attention.output.LayerNorm.{t}")
                ours[o + "fc1." + t] = take(p + f"intermediate.dense.{t}")
                ours[o + "fc2." + t] = take(p + f"output.dense.{t}")
                ours[o + "ln2." + t] = take(p + f"output.LayerNorm.{t}")
        if state:
            extra = sorted(state)
            raise DynapruneError(
                f"{where}: unexpected weights {extra[:3]}{' ...' if len(extra) > 3 else ''} "
                f"(config.json says {self.config.num_layers} layers)"
            )
        try:
            self.load_state_dict({k: v.float().contiguous() for k, v in ours.items()}, strict=True)
        except RuntimeError as e:
            first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e))
            raise DynapruneError(f"{where}: weights do not match config.json ({first})") from None


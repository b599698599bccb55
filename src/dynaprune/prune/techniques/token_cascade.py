"""Cascade token pruning (SpAtten, Wang et al. HPCA 2021, Sec. III-A, Algorithm 2): ``token=K`` or
``token_schedule=I:F/...``, tuned by ``token_adapt`` and ``token_ref_len``.

The run ranks tokens by the scorer's importance (``score=``, SpAtten's cumulative attention by
default), and after each pruning layer gathers the survivors' hidden states and every per-token
tensor the model carries: attention *and* FFN shrink in every later layer. The first real token of an
encoder ([CLS]) and the last real token of a decoder prompt are never pruned. Cost: fewer tokens
enter the later layers (counted by the run's work counter).

``token_policy=drop`` (default) drops the pruned tokens; ``token_policy=merge`` (encoders) merges each
into its most similar kept token instead (ToMe, Bolya et al. ICLR 2023, Sec. 3; math in
``prune/merge.py``): size-weighted states, ``+ log(size)`` on merged keys' logits in every later layer,
and the pooled states of an encoder are every original token's merged state (a size-weighted mean).
``token_policy=tome`` merges the same way but picks the tokens to merge by ToMe's bipartite soft
matching on key similarity (``prune/merge.py`` bipartite_importance) instead of attention importance;
no attention scores are accumulated. The similarity and the merge are counted in the cost
(``token_merge`` FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dynaprune.prune import keys as K
from dynaprune.prune.merge import bipartite_flops, bipartite_importance, key_metric, merge_flops, merge_into_kept
from dynaprune.prune.technique import Stage, Technique
from dynaprune.prune.tokens import edge_token_mask, gather_tokens, select_tokens_to_keep

# Length-adaptive token pruning (see TokenPruning.token_keep_schedule).
DEFAULT_TOKEN_ADAPT = 1.0 / 3.0
DEFAULT_TOKEN_REF_LEN = 128
TOKEN_POLICIES = ("drop", "merge", "tome")


@dataclass(frozen=True)
class TokenPruning(Technique):
    """``token``: fraction of the input's tokens alive after the last pruning layer; or
    ``token_schedule``: after layer I (0-based) a fraction F of the original tokens is alive (taken
    literally). ``token_adapt`` (default 1/3, 0 = off) and ``token_ref_len`` (default 128) tune the
    length-adaptive rule of ``token``. ``token_policy``: ``drop`` (default) or ``merge`` the pruned tokens,
    or ``tome`` (merge the most similar tokens; see the module docstring)."""

    token: float | None = None
    token_schedule: K.Schedule | None = None
    token_adapt: float | None = None
    token_ref_len: int | None = None
    token_policy: str | None = None

    role = "tokens"
    keys = (
        K.Key("token", K.parse_float, K.ratio),
        K.Key("token_schedule", K.parse_schedule, K.schedule, json="schedule"),
        K.Key("token_adapt", K.parse_float, K.at_least(0.0, integer=False)),
        K.Key("token_ref_len", K.parse_int, K.at_least(1, integer=True)),
        K.Key("token_policy", K.parse_word, K.choice(*TOKEN_POLICIES)),
    )
    exports = ("token_keep_schedule", "token_keep_counts", "prunes_tokens")

    def check(self) -> None:
        if self.token is not None and self.token_schedule is not None:
            raise K.err("token_schedule", "set either token or token_schedule, not both")
        for name in ("token_adapt", "token_ref_len"):
            if getattr(self, name) is not None and self.token is None:
                raise K.err(name, "tunes the length-adaptive default schedule of token=K; it needs token "
                                  "(an explicit token_schedule is taken literally)")
        if self.token_policy is not None and not self.prunes_tokens:
            raise K.err("token_policy", "says what happens to pruned tokens; it needs token or token_schedule")

    def check_with(self, recipe) -> None:
        if self.token_policy in ("merge", "tome") and any(t.role == "kernel" for t in recipe.techniques):
            raise K.err("token_policy", "merge needs proportional attention (log size on merged keys), which "
                                        "HDP's own attention kernel (block/hdp keys) does not apply")

    def validate_for(self, n_layers, n_heads, n_kv_heads, context_len) -> None:
        if self.token_schedule is not None:
            K.step_schedule("token_schedule", self.token_schedule, n_layers)

    @property
    def prunes_tokens(self) -> bool:
        return self.token is not None or self.token_schedule is not None

    def token_keep_schedule(self, n_layers: int, seq_len: int) -> list[float]:
        """Fraction of the ORIGINAL ``seq_len`` tokens alive after each layer (entry i = after layer i).

        ``token=K`` (cascade, Sec. III-A: "the deeper the layer, the more tokens are pruned"): layers
        ``0 .. s-1`` see every token, ``s = max(1, round(n_layers / 8))`` (importance first accumulates);
        layers ``s .. e``, ``e = max(s, round(n_layers / 2))``, enter with ``K_L ** ((j - s + 1) /
        (e - s + 1))`` (the same share of survivors dropped at each step); later layers run on ``K_L``
        (mid-depth is where the published SpAtten GPT-2-medium trace reaches its final ratio).
        Length-adaptive ("the longer, the more tokens are pruned away"): ``K_L = K * min(1, token_ref_len
        / seq_len) ** token_adapt``; inputs up to 128 tokens keep exactly K, longer ones ~ L ** (-1/3)
        (our reading of the paper's ~2x pruning at BERT lengths against ~4x at GPT-2's ~1000 tokens).
        ``token_schedule`` is returned literally; no token pruning gives 1.0s.
        """
        K.check_layers(n_layers)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if self.token_schedule is not None:
            return K.step_schedule("token_schedule", self.token_schedule, n_layers)
        if self.token is None:
            return [1.0] * n_layers
        adapt = DEFAULT_TOKEN_ADAPT if self.token_adapt is None else self.token_adapt
        ref_len = DEFAULT_TOKEN_REF_LEN if self.token_ref_len is None else self.token_ref_len
        target = self.token * min(1.0, ref_len / seq_len) ** adapt
        start = max(1, round(n_layers / 8))
        end = max(start, round(n_layers / 2))
        return K.geometric_schedule(target, start, end, n_layers)

    def token_keep_counts(self, n_layers: int, seq_len: int) -> list[int]:
        """:meth:`token_keep_schedule` as token counts (:func:`keep_count` of ``seq_len``)."""
        return [K.keep_count(f, seq_len) for f in self.token_keep_schedule(n_layers, seq_len)]

    @staticmethod
    def merge_summary(summaries: list[dict], merged: dict) -> None:
        if any("tokens_merged" in s for s in summaries):
            merged["token_policy"] = "merge"
            merged["tokens_merged"] = sum(s.get("tokens_merged", 0) for s in summaries)

    def stage(self, run) -> Stage | None:
        return TokenCascadeStage(self, run) if self.prunes_tokens else None


class TokenCascadeStage(Stage):
    name = "tokens"

    def __init__(self, technique: TokenPruning, run) -> None:
        super().__init__(technique, run)
        self.token_keep_after: list[torch.Tensor] | None = None  # per layer, (B,) counts
        self.last_token_layer = run.shape.layers - 1  # the last layer after which tokens are pruned
        self.token_importance: torch.Tensor | None = None  # (B, L) aligned with the current tokens
        # Pruned tokens' last hidden states ("frozen" where they left), so mean pooling still sees every
        # token (else a mean-pooled embedding drifts to the few high-attention tokens that survive).
        self.pruned_states: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (hidden, pos, valid)
        self.merge = technique.token_policy in ("merge", "tome")
        self.bipartite = technique.token_policy == "tome"  # which tokens go: key similarity, not attention
        if self.merge and run.shape.causal:
            raise K.err("token_policy", "merge is for encoders: in a decoder a later token merged into an earlier "
                                        "one would leak the future into its keys (use token_policy=drop)")
        self.layer_keys: torch.Tensor | None = None  # merge: this layer's keys (B, H, L, D), the similarity
        self.sizes: torch.Tensor | None = None  # merge: (B, L) original tokens each current token stands for
        self.slot: torch.Tensor | None = None  # merge: (B, L0) the current token holding each original token
        self.original_valid: torch.Tensor | None = None  # merge: (B, L0) real tokens of the input

    def before_attention(self, layer, key_padding_mask, batch, length) -> None:
        """Per row, how many tokens live after each layer (length-adaptive: by each row's real length)."""
        if self.token_keep_after is not None:
            return
        layers = self.run.shape.layers
        real = key_padding_mask.sum(-1).cpu() if key_padding_mask is not None else torch.full((batch,), length)
        per_row = [self.technique.token_keep_schedule(layers, max(1, int(n))) for n in real]
        self.token_keep_after = [
            torch.stack([K.keep_counts(per_row[b][layer], real[b : b + 1])[0] for b in range(batch)])
            for layer in range(layers)
        ]
        alive = [real.long(), *self.token_keep_after]
        pruning = [i for i in range(layers) if bool((alive[i + 1] < alive[i]).any())]
        self.last_token_layer = max(pruning, default=-1)  # importance is needed up to this layer only

    def queries_keys(self, layer, q, k, key_padding_mask, scale) -> None:
        if self.merge:
            self.layer_keys = k

    def key_sizes(self, layer: int) -> torch.Tensor | None:
        return self.sizes

    @property
    def wants_probabilities(self) -> bool:
        return self.run.scorer.uses_attention and not self.bipartite

    def needs_received(self, layer: int) -> bool:
        return (self.run.scorer.uses_attention and not self.bipartite and not self.run.prefilled
                and layer <= self.last_token_layer)

    def received(self, layer: int, received: torch.Tensor) -> None:
        if self.run.scorer.uses_attention and not self.bipartite and not self.run.prefilled:
            self.token_importance = self.run.scorer.accumulate(self.token_importance, received)

    def between_layers(self, layer, hidden, keep):
        run = self.run
        if self.token_keep_after is None or run.prefilled:
            return hidden, keep
        valid = keep.get("mask")
        if valid is None:
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        target = self.token_keep_after[layer].to(hidden.device)
        if bool((valid.sum(-1) <= target).all()):
            return hidden, keep
        importance = self.token_importance
        protected = edge_token_mask(valid, first=run.protect_first, last=run.protect_last)
        if self.bipartite:  # ToMe: the A tokens with the closest B match go ([CLS] and [SEP] stay)
            protected = edge_token_mask(valid, first=max(1, run.protect_first), last=max(1, run.protect_last))
            importance = bipartite_importance(key_metric(self.layer_keys), valid, protected)
            work = run.work.merge_flops
            work[layer] = work.get(layer, 0) + bipartite_flops(valid, protected, self.layer_keys.shape[-1])
        elif not run.scorer.uses_attention or importance is None:
            importance = torch.rand(hidden.shape[:2], generator=run.generator).to(hidden.device)
        selection = select_tokens_to_keep(importance, target, protected, valid)
        if run.trace_calls:
            run.trace_calls[-1]["topk"] = int(selection.mask[0].sum())
        if self.merge:
            hidden = self._merge(layer, hidden, valid, selection)
        elif run.keep_pruned_states and "pos" in keep:
            kept = torch.zeros_like(valid).scatter(1, selection.index, selection.mask)
            self.pruned_states.append((hidden, keep["pos"], valid & ~kept))
        if not self.merge:
            hidden = gather_tokens(hidden, selection.index)
        keep = {name: gather_tokens(t, selection.index) for name, t in keep.items()}
        keep["mask"] = selection.mask & gather_tokens(valid, selection.index)
        if self.token_importance is not None:
            self.token_importance = gather_tokens(self.token_importance, selection.index)
        return hidden, keep

    def _merge(self, layer, hidden, valid, selection) -> torch.Tensor:
        """Merge the tokens ``selection`` drops into their most similar kept tokens (prune/merge.py); the
        kept tokens' new states, sizes and where every original token now lives; the work counted."""
        if self.sizes is None:  # first merge: every token is itself (no pruning happened before)
            self.sizes = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
            self.slot = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[:2])
            self.original_valid = valid
        keys = self.layer_keys
        merged = merge_into_kept(hidden, self.sizes, key_metric(keys), selection.index, selection.mask, valid)
        self.sizes, self.slot = merged.sizes, merged.dest.gather(1, self.slot)
        kept = selection.mask.sum(-1)
        work = self.run.work.merge_flops
        work[layer] = work.get(layer, 0) + merge_flops(merged.pruned, kept, valid, keys.shape[1], keys.shape[-1],
                                                       hidden.shape[-1])
        counts = self.run.counts(layer, self.name)
        counts["merged"] = counts.get("merged", 0) + int(merged.pruned.sum())
        return merged.hidden

    def summary(self, out: dict, layers: list[int]) -> None:
        if self.merge:
            out["token_policy"] = "merge"
            out["tokens_merged"] = int(self.total(layers, "merged"))

    def final_states(self, hidden, keep):
        """The last hidden state of every original token: survivors from ``hidden``, pruned tokens from
        the layer where they left, in original token order (None: nothing was pruned). Merged: the state
        of the kept token each original token was merged into (mean pooling becomes size-weighted)."""
        if self.merge:
            if self.slot is None or not self.run.keep_pruned_states:
                return None
            return gather_tokens(hidden, self.slot), self.original_valid
        if not self.pruned_states or "pos" not in keep:
            return None
        _, first_pos, _ = self.pruned_states[0]
        B, L0 = first_pos.shape
        full = torch.zeros(B, L0, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        mask = torch.zeros(B, L0, dtype=torch.bool, device=hidden.device)
        for states, pos, left in [*self.pruned_states, (hidden, keep["pos"], keep["mask"])]:
            rows, cols = left.nonzero(as_tuple=True)
            full[rows, pos[rows, cols]] = states[rows, cols]
            mask[rows, pos[rows, cols]] = True
        return full, mask

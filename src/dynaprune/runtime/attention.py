"""The single attention entry point of every model.

Models call ``attention(q, k, v, ...)`` for every layer and ``ctx.between_layers(...)`` after every
block. With the default dense ``RunContext`` both are plain dense computation (SDPA) and the identity,
so models stay ignorant of pruning: later techniques subclass ``RunContext`` and may ask for the
attention probabilities, drop heads, or gather the hidden states of surviving tokens between layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionRecord:
    """What one attention call produced, kept only when the context asks for it."""

    layer: int
    probs: torch.Tensor | None = None  # (B, Hq, Lq, Lk) attention probabilities
    head_outputs: torch.Tensor | None = None  # (B, Hq, Lq, D) per-head outputs before o_proj


@dataclass
class RunContext:
    """State of one forward/generate call. Dense by default.

    ``record_probs`` / ``record_head_outputs`` keep per-layer attention probabilities and per-head
    outputs in ``records`` (for inspection, plots and the pruning techniques).
    """

    record_probs: bool = False
    record_head_outputs: bool = False
    records: list[AttentionRecord] = field(default_factory=list)

    @property
    def needs_probs(self) -> bool:
        return self.record_probs

    def on_attention(
        self, layer: int, probs: torch.Tensor | None, head_outputs: torch.Tensor
    ) -> torch.Tensor:
        """Called with each layer's probabilities (if asked for) and per-head outputs.

        Returns the per-head outputs to use (a pruning context may zero or drop heads here).
        """
        if self.record_probs or self.record_head_outputs:
            self.records.append(
                AttentionRecord(
                    layer,
                    probs.detach() if self.record_probs and probs is not None else None,
                    head_outputs.detach() if self.record_head_outputs else None,
                )
            )
        return head_outputs

    def between_layers(
        self, layer: int, hidden: torch.Tensor, keep: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Called after block ``layer`` with the hidden states (B, L, d) and the per-token tensors the
        model carries (padding mask, position ids, ...), all indexed by token on dim 1.

        The dense context returns them unchanged; a token-pruning context gathers the survivors.
        """
        return hidden, keep


DENSE = RunContext()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    layer: int,
    ctx: RunContext | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head (grouped-query) attention.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Hq a multiple of Hkv (GQA repeats K/V groups).
    key_padding_mask: (B, Lk) bool, True for real tokens. ``causal`` aligns the last query with the
    last key (so it also serves decode steps over a KV cache). Returns per-head outputs (B, Hq, Lq, D).
    """
    ctx = ctx or DENSE
    hq, hkv = q.shape[1], k.shape[1]
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    lq, lk = q.shape[2], k.shape[2]
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].to(torch.bool)
    if causal and lq > 1:
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        mask = tri if mask is None else mask & tri
    if not ctx.needs_probs:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return ctx.on_attention(layer, None, out)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = probs @ v
    return ctx.on_attention(layer, probs, out)

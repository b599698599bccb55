"""How a KV budget is spread over layers and KV heads (issue 14 item 1; ``kv_alloc``, ``kv_depth``).

- ``kv_alloc=layer`` (default): one token set per layer, shared by its KV heads (H2O, SpAtten).
- ``kv_alloc=head``: each KV head keeps its own ``budget`` tokens (kvpress's presses select per head).
- ``kv_alloc=ada``: Ada-KV (Feng et al. 2024, Alg. 1): a layer's ``budget x Hkv`` slots go to the
  highest scores over all its heads together, so a head with concentrated attention gives slots to a
  head with spread-out attention; each head first keeps its protected tokens and a floor of
  ``ADA_FLOOR x budget`` (the paper's safeguard). Heads then hold different counts: padded with invalid
  slots that attention masks and the byte count ignores.
- ``kv_alloc=global``: KVzip (Kim et al. 2025, Sec. 3.3): one threshold over every layer's and KV head's
  scores at the prompt's eviction, so layers and heads keep unequal counts with the same total
  (``budget x Hkv x layers``); protected tokens stay in every head; no floor. Scores must be comparable
  across layers (attention probabilities or sums of them, as every scorer here gives). Later (decode)
  evictions keep each layer's width from then on, per head. Needs ``kv_depth=flat``.
- ``kv_alloc=global_layer``: the same single ranking, but each layer's KV heads keep one count (their
  own top tokens): the layers' widths maximise the summed scores kept (``layer_widths``, exact: each
  layer's gain of one more slot per head falls with the slot). No padding, so a packed cache stores no
  slot it does not use (``global`` pads heads to the layer's widest, and packed padding is stored); with
  ``kv_bits`` the widths are whole key groups, so no layer keeps an fp16 tail.
- ``kv_depth=flat`` (default): every layer the same budget; ``pyramid``: PyramidKV (Cai et al. 2024)
  budgets shrinking linearly with depth (1.5x the mean at layer 0 to 0.5x at the last, the same total);
  or one relative weight per layer ``w0/w1/...`` (normalised to mean 1).
"""

from __future__ import annotations

import torch

from dynaprune.prune import keys as K
from dynaprune.prune.tokens import select_tokens_to_keep

ALLOCATIONS = ("layer", "head", "ada", "global", "global_layer")
DEPTHS = ("flat", "pyramid")
ADA_FLOOR = 0.2  # share of a head's uniform budget it keeps whatever the other heads score
PYRAMID_SPAN = 0.5  # pyramid weights run from 1 + span (first layer) to 1 - span (last layer)


def check_depth(key: str, value: object) -> str:
    """``flat``, ``pyramid`` or positive weights ``w0/w1/...`` (canonical string)."""
    text = str(value)
    if text in DEPTHS:
        return text
    weights = [K.parse_float(key, part) for part in text.split("/")]
    if any(not w > 0 for w in weights):
        raise K.err(key, f"{text!r}: layer weights must be positive (or write flat / pyramid)")
    return "/".join(K.fmt_float(w) for w in weights)


def depth_weights(depth: str, n_layers: int) -> list[float]:
    """Relative budget of each layer, mean 1."""
    if depth == "flat":
        return [1.0] * n_layers
    if depth == "pyramid":
        if n_layers == 1:
            return [1.0]
        return [1 + PYRAMID_SPAN - 2 * PYRAMID_SPAN * i / (n_layers - 1) for i in range(n_layers)]
    weights = [float(w) for w in depth.split("/")]
    if len(weights) != n_layers:
        raise K.err("kv_depth", f"{len(weights)} layer weights for a model of {n_layers} layers")
    mean = sum(weights) / n_layers
    return [w / mean for w in weights]


def layer_budgets(budget: int, depth: str, n_layers: int) -> list[int]:
    """Tokens each layer keeps: ``budget x weight`` rounded so the total is ``budget x n_layers``
    (largest remainders round up), at least 1."""
    if depth == "flat":
        return [budget] * n_layers
    exact = [budget * w for w in depth_weights(depth, n_layers)]
    out = [max(1, int(x)) for x in exact]
    short = budget * n_layers - sum(out)
    for i in sorted(range(n_layers), key=lambda i: int(exact[i]) - exact[i])[: max(0, short)]:
        out[i] += 1
    return out


def ada_select(scores: torch.Tensor, budget: int, protected: torch.Tensor, valid: torch.Tensor,
               floor: float = ADA_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Ada-KV selection of one layer: scores, protected, valid (B, Hkv, L) -> (index, mask) (B, Hkv, W),
    each head's kept tokens in order then filler, ``mask`` True for the kept entries. About
    ``budget x Hkv`` tokens are kept per row in all (more only where protected tokens demand it)."""
    b, h, length = scores.shape
    base = select_tokens_to_keep(scores, max(1, round(floor * budget)), protected, valid)
    sure = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    sure.scatter_(-1, base.index, base.mask)
    flat = select_tokens_to_keep(scores.reshape(b, h * length), budget * h, sure.reshape(b, h * length),
                                 valid.reshape(b, h * length))
    selected = torch.zeros(b, h * length, dtype=torch.bool, device=scores.device)
    selected.scatter_(-1, flat.index, flat.mask)
    return padded_selection(selected.view(b, h, length))


def padded_selection(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hkv, L) bool -> (index, mask) (B, Hkv, W): each head's selected tokens in order then filler."""
    counts = selected.sum(-1)
    width = max(1, int(counts.max()))
    index = torch.argsort((~selected).to(torch.int8), dim=-1, stable=True)[..., :width]
    return index, torch.arange(width, device=selected.device) < counts[..., None]


def global_select(scores: list[torch.Tensor], total: int, protected: list[torch.Tensor],
                  valid: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KVzip's global selection: per layer scores, protected, valid (B, Hkv, L_l) -> per layer (index,
    mask) (B, Hkv, W_l). Per row the protected tokens plus the highest scores over all layers and heads
    together, ``total`` slots in all (more only where protected tokens demand it)."""
    b = scores[0].shape[0]
    flat = select_tokens_to_keep(torch.cat([s.float().reshape(b, -1) for s in scores], 1), total,
                                 torch.cat([p.reshape(b, -1) for p in protected], 1),
                                 torch.cat([v.reshape(b, -1) for v in valid], 1))
    chosen = torch.zeros(b, sum(s[0].numel() for s in scores), dtype=torch.bool, device=scores[0].device)
    chosen.scatter_(-1, flat.index, flat.mask)
    out, start = [], 0
    for s in scores:
        n = s[0].numel()
        out.append(padded_selection(chosen[:, start:start + n].view(s.shape)))
        start += n
    return out


def layer_widths(scores: list[torch.Tensor], total: int, protected: list[torch.Tensor],
                 valid: list[torch.Tensor], align: int = 1) -> list[int]:
    """Tokens per KV head of each layer, ``total`` over the layers (per head), maximising the summed
    scores kept when every head of a layer keeps its top ``width`` (protected first): layer l's r-th slot
    gains the sum over heads and batch rows of their r-th highest score; those gains fall with r, so the
    ``total`` highest gains over all layers are a prefix of each layer's (the greedy optimum). ``align``:
    widths in whole blocks of that many slots (a packed cache's key group: no fp16 tail), the blocks
    ranked by their summed gains, ``total // align`` of them. A layer keeps at least its protected tokens."""
    big = torch.finfo(torch.float32).max / 1e6  # protected first, padding last, sums stay finite
    gains, floors = [], []
    for s, p, v in zip(scores, protected, valid, strict=True):
        ranked = s.float().masked_fill(~v, -big).masked_fill(p & v, big)
        gain = ranked.sort(-1, descending=True).values.sum((0, 1))  # (L,) falling
        blocks = -(-gain.shape[0] // align)
        gain = torch.nn.functional.pad(gain, (0, blocks * align - gain.shape[0]), value=-big)
        gains.append(gain.view(blocks, align).sum(-1))  # falling too
        floors.append(int((p & v).sum(-1).max()))
    flat = torch.cat(gains)
    chosen = torch.zeros(flat.shape[0], dtype=torch.bool)
    chosen[flat.topk(min(total // align, flat.shape[0])).indices] = True
    out, start = [], 0
    for g, s, floor in zip(gains, scores, floors, strict=True):
        width = min(s.shape[-1], align * int(chosen[start:start + g.shape[0]].sum()))
        out.append(max(floor, 1, width))
        start += g.shape[0]
    return out

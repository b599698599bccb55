"""``WorkCounter``: the work a run context really did, per layer, which ``runtime.cost`` turns into
FLOPs and bytes (useful work on real tokens, beside what the padded tensors computed)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WorkCounter:
    """Work done per layer: real query tokens, real (query, key) pairs, query heads computed, keys held."""

    tokens: dict[int, int] = field(default_factory=dict)
    pairs: dict[int, int] = field(default_factory=dict)
    head_pairs: dict[int, int] = field(default_factory=dict)  # pairs x heads actually computed
    keys: dict[int, int] = field(default_factory=dict)  # real keys attended (the K/V read), summed over calls
    # what the same calls would have attended with no K/V evicted (differs from pairs/keys under a KV budget)
    dense_pairs: dict[int, int] = field(default_factory=dict)
    dense_keys: dict[int, int] = field(default_factory=dict)
    # query heads x tokens and KV heads x tokens whose projections ran (pruned heads skip theirs)
    q_head_tokens: dict[int, int] = field(default_factory=dict)
    kv_head_tokens: dict[int, int] = field(default_factory=dict)
    # HDP: (query, key, head) pairs of the integer pass (every valid pair of every head it scores)
    int_head_pairs: dict[int, int] = field(default_factory=dict)
    # token merging (token_policy=merge): FLOPs of the similarity and the merge after each layer (prune/merge.py)
    merge_flops: dict[int, int] = field(default_factory=dict)
    # what the tensors really computed, padding and emulation overhead included (see ``add_computed``)
    tokens_computed: dict[int, int] = field(default_factory=dict)
    q_head_tokens_computed: dict[int, int] = field(default_factory=dict)
    kv_head_tokens_computed: dict[int, int] = field(default_factory=dict)
    qk_head_pairs_computed: dict[int, int] = field(default_factory=dict)
    pv_head_pairs_computed: dict[int, int] = field(default_factory=dict)
    # LM head: real positions whose logits were computed, all positions computed (padding included),
    # and the real positions a dense run would have computed (token pruning drops some)
    lm_head_tokens: int = 0
    lm_head_tokens_computed: int = 0
    lm_head_tokens_dense: int = 0
    heads: int = 0  # query heads of the model (for the dense figure)
    storage: str | None = None  # "simulated": quantized values live in float tensors (fp16-width bytes)
    # K/V cache bytes (packed codes, scales, zero-points; unpacked tokens at fp16) beside a fp16 cache of every
    # token appended (runtime/cost.py kv_bytes_vs_fp16): summed over the forwards after the prompt (what each
    # reads of the context), and held after the last forward
    kv_read_bytes: int = 0
    kv_read_bytes_dense: int = 0
    kv_held_bytes: int = 0
    kv_held_bytes_dense: int = 0

    def add(
        self, layer: int, tokens: int, pairs: int, heads_computed: int, keys: int,
        dense_pairs: int | None = None, dense_keys: int | None = None, head_pairs: int | None = None,
        kv_heads_computed: int | None = None, projected_heads: int | None = None, int_head_pairs: int = 0,
    ) -> None:
        """``head_pairs``: the (query, key, head) scores really computed, when fewer than
        ``pairs * heads_computed`` (HDP's block and early head pruning skip some inside a head).
        ``projected_heads`` / ``kv_heads_computed``: query and KV heads whose projections ran (default:
        ``heads_computed`` and the model's KV heads, i.e. only attention skips pruned heads).
        ``int_head_pairs``: HDP's integer pass (pairs x heads), counted apart from the kept pairs."""
        self.tokens[layer] = self.tokens.get(layer, 0) + tokens
        self.pairs[layer] = self.pairs.get(layer, 0) + pairs
        computed = pairs * heads_computed if head_pairs is None else head_pairs
        self.head_pairs[layer] = self.head_pairs.get(layer, 0) + computed
        self.keys[layer] = self.keys.get(layer, 0) + keys
        q_heads = heads_computed if projected_heads is None else projected_heads
        self.q_head_tokens[layer] = self.q_head_tokens.get(layer, 0) + tokens * q_heads
        if kv_heads_computed is not None:
            self.kv_head_tokens[layer] = self.kv_head_tokens.get(layer, 0) + tokens * kv_heads_computed
        self.dense_pairs[layer] = self.dense_pairs.get(layer, 0) + (pairs if dense_pairs is None else dense_pairs)
        self.dense_keys[layer] = self.dense_keys.get(layer, 0) + (keys if dense_keys is None else dense_keys)
        if int_head_pairs:
            self.int_head_pairs[layer] = self.int_head_pairs.get(layer, 0) + int_head_pairs

    def add_computed(self, layer: int, positions: int, q_heads: int, kv_heads: int, qk_head_pairs: int,
                     pv_head_pairs: int | None = None) -> None:
        """What one call's tensors computed: ``positions`` query positions (batch x padded length) through
        the projections (``q_heads`` / ``kv_heads`` projected) and the FFN, and the (query, key, head)
        scores of QK^T and products of PV that the kernels evaluated, masked ones included."""
        for counts, n in ((self.tokens_computed, positions), (self.q_head_tokens_computed, positions * q_heads),
                          (self.kv_head_tokens_computed, positions * kv_heads),
                          (self.qk_head_pairs_computed, qk_head_pairs),
                          (self.pv_head_pairs_computed, qk_head_pairs if pv_head_pairs is None else pv_head_pairs)):
            counts[layer] = counts.get(layer, 0) + n

    def add_lm_head(self, real: int, computed: int, dense: int) -> None:
        """One LM-head call: logits of ``real`` real positions, ``computed`` positions in the tensor,
        ``dense`` real positions a run without token pruning would have computed."""
        self.lm_head_tokens += real
        self.lm_head_tokens_computed += computed
        self.lm_head_tokens_dense += dense

    def merge(self, other: WorkCounter) -> None:
        for name in _PER_LAYER:
            mine = getattr(self, name)
            for layer, n in getattr(other, name).items():
                mine[layer] = mine.get(layer, 0) + n
        self.lm_head_tokens += other.lm_head_tokens
        self.lm_head_tokens_computed += other.lm_head_tokens_computed
        self.lm_head_tokens_dense += other.lm_head_tokens_dense
        self.heads = max(self.heads, other.heads)
        for name in ("kv_read_bytes", "kv_read_bytes_dense", "kv_held_bytes", "kv_held_bytes_dense"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.storage = self.storage or other.storage


_PER_LAYER = ("tokens", "pairs", "head_pairs", "keys", "dense_pairs", "dense_keys", "q_head_tokens", "kv_head_tokens",
              "int_head_pairs", "merge_flops", "tokens_computed", "q_head_tokens_computed", "kv_head_tokens_computed",
              "qk_head_pairs_computed", "pv_head_pairs_computed")


def padded_pairs(batch: int, lq: int, lk: int, causal_kernel: bool) -> int:
    """(query, key) scores a kernel evaluates for one head: the whole Lq x Lk rectangle per batch row
    (masked scores are computed, then dropped), or the causal triangle for SDPA's mask-free causal
    kernel, which skips the blocks above the diagonal."""
    if causal_kernel:
        return batch * (lq * lk - lq * (lq - 1) // 2)
    return batch * lq * lk

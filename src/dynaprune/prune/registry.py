"""The registry: which technique owns which recipe key, and which scorer each ``score=`` name is.

The order of ``TECHNIQUES`` is the canonical order of the recipe keys (``str(recipe)``); ``SCORERS``
lists the ``score=`` values. Adding a technique or a scorer is one file plus one line here. A key (or
a scorer name) registered twice is an error at import time.
"""

from __future__ import annotations

from dynaprune.prune.keys import Key
from dynaprune.prune.scorers.base import SCORE_KEY, TokenScorer
from dynaprune.prune.scorers.h2o import H2OScore
from dynaprune.prune.scorers.instant import InstantScore
from dynaprune.prune.scorers.kvzip import KVzipScore
from dynaprune.prune.scorers.observed import ObservedScore
from dynaprune.prune.scorers.random import RandomScore
from dynaprune.prune.scorers.snapkv import SnapKVScore
from dynaprune.prune.scorers.spatten import SpAttenScore
from dynaprune.prune.scorers.streaming import StreamingScore
from dynaprune.prune.scorers.tova import TOVAScore
from dynaprune.prune.technique import ROLES, Technique
from dynaprune.prune.techniques.hdp import HybridDynamicPruning
from dynaprune.prune.techniques.head_cascade import HeadPruning
from dynaprune.prune.techniques.kv_budget import KVBudget
from dynaprune.prune.techniques.kv_quant import KVQuantization
from dynaprune.prune.techniques.local_value import ValuePruning
from dynaprune.prune.techniques.prefill_window import PrefillSelection
from dynaprune.prune.techniques.progressive_quant import Quantization
from dynaprune.prune.techniques.token_cascade import TokenPruning

TECHNIQUES: tuple[type[Technique], ...] = (
    TokenPruning, HeadPruning, ValuePruning, Quantization, KVBudget, TokenScorer, HybridDynamicPruning,
    KVQuantization, PrefillSelection,
)
SCORERS: dict[str, type[TokenScorer]] = {}
KEYS: dict[str, Key] = {}  # recipe key -> its spec, in canonical order
OWNER: dict[str, type[Technique]] = {}  # recipe key -> the technique class (TokenScorer for score)
EXPORTS: dict[str, type[Technique]] = {}  # Recipe attribute (a technique's method) -> technique class


def register(technique: type[Technique]) -> None:
    """Add a technique's keys (and exported methods); a key already owned is an error."""
    if technique.role not in ROLES:
        raise ValueError(f"{technique.__name__}: unknown role {technique.role!r} (roles: {', '.join(ROLES)})")
    for key in technique.keys:
        if key.name in KEYS:
            raise ValueError(f"recipe key '{key.name}' of {technique.__name__} is already registered "
                             f"by {OWNER[key.name].__name__}")
        KEYS[key.name], OWNER[key.name] = key, technique
    for name in technique.exports:
        if name in EXPORTS:
            raise ValueError(f"{technique.__name__}.{name} is already exported by {EXPORTS[name].__name__}")
        EXPORTS[name] = technique


def register_scorer(scorer: type[TokenScorer]) -> None:
    """Add a ``score=`` name; a name already taken is an error."""
    if scorer.name in SCORERS:
        raise ValueError(f"score={scorer.name} is already registered by {SCORERS[scorer.name].__name__}")
    SCORERS[scorer.name] = scorer


for _technique in TECHNIQUES:
    register(_technique)

register_scorer(SpAttenScore)
register_scorer(H2OScore)
register_scorer(StreamingScore)
register_scorer(RandomScore)
register_scorer(InstantScore)
register_scorer(TOVAScore)
register_scorer(KVzipScore)
register_scorer(ObservedScore)
register_scorer(SnapKVScore)

assert KEYS["score"] is SCORE_KEY

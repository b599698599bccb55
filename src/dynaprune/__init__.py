"""dynaprune: run-time attention pruning (SpAtten, Hybrid Dynamic Pruning) on real transformers."""

__version__ = "0.1.0"

from dynaprune.api import evaluate  # noqa: E402
from dynaprune.errors import DynapruneError  # noqa: E402
from dynaprune.integrations.hf import from_transformers, to_transformers  # noqa: E402
from dynaprune.models import load  # noqa: E402
from dynaprune.prune.recipe import Recipe  # noqa: E402
from dynaprune.prune.scorers.h2o import H2OScore  # noqa: E402
from dynaprune.prune.scorers.instant import InstantScore  # noqa: E402
from dynaprune.prune.scorers.kvzip import KVzipScore  # noqa: E402
from dynaprune.prune.scorers.observed import ObservedScore  # noqa: E402
from dynaprune.prune.scorers.random import RandomScore  # noqa: E402
from dynaprune.prune.scorers.snapkv import SnapKVScore  # noqa: E402
from dynaprune.prune.scorers.spatten import SpAttenScore  # noqa: E402
from dynaprune.prune.scorers.streaming import StreamingScore  # noqa: E402
from dynaprune.prune.scorers.tova import TOVAScore  # noqa: E402
from dynaprune.prune.techniques.hdp import HybridDynamicPruning  # noqa: E402
from dynaprune.prune.techniques.head_cascade import HeadPruning  # noqa: E402
from dynaprune.prune.techniques.kv_budget import KVBudget  # noqa: E402
from dynaprune.prune.techniques.kv_quant import KVQuantization  # noqa: E402
from dynaprune.prune.techniques.local_value import ValuePruning  # noqa: E402
from dynaprune.prune.techniques.prefill_window import PrefillSelection  # noqa: E402
from dynaprune.prune.techniques.progressive_quant import Quantization, QuantSetting  # noqa: E402
from dynaprune.prune.techniques.token_cascade import TokenPruning  # noqa: E402

__all__ = [
    "DynapruneError", "load", "evaluate", "__version__", "Recipe", "from_transformers", "to_transformers",
    # the techniques a recipe composes (their fields are the recipe keys)
    "TokenPruning", "HeadPruning", "ValuePruning", "Quantization", "QuantSetting", "KVBudget",
    "HybridDynamicPruning", "KVQuantization", "PrefillSelection",
    # token scorers (score=...)
    "SpAttenScore", "H2OScore", "StreamingScore", "RandomScore", "InstantScore", "TOVAScore",
    "ObservedScore", "SnapKVScore", "KVzipScore",
]

"""dynaprune: run-time attention pruning (SpAtten, Hybrid Dynamic Pruning) on real transformers."""

__version__ = "0.1.0"

from dynaprune.errors import DynapruneError  # noqa: E402
from dynaprune.models import load  # noqa: E402

__all__ = ["DynapruneError", "load", "__version__"]

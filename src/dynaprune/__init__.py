"""dynaprune: run-time attention pruning (SpAtten, Hybrid Dynamic Pruning) on real transformers."""

__version__ = "0.1.0"

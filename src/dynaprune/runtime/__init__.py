"""The one attention function every model calls, and the run context that carries pruning state."""

from dynaprune.runtime.attention import RunContext, attention

__all__ = ["RunContext", "attention"]

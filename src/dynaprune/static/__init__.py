"""Static (one-off) pruning from the pruning guide (sections 2-5): importance criteria for attention
heads, FFN neurons and whole layers; physical removal (a smaller checkpoint); unstructured magnitude and
N:M weight masks (same shapes, zeros); per-layer sensitivity. A pruned checkpoint loads with
``dynaprune.load`` and takes any run-time recipe on top."""

from dynaprune.static.structured import Architecture, adapter, remove_ffn_neurons, remove_heads, remove_layers

__all__ = ["Architecture", "adapter", "remove_ffn_neurons", "remove_heads", "remove_layers"]

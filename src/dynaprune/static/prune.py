"""The whole static pruning pass behind ``dynaprune prune``: layers, then heads, then FFN neurons, then
(optionally) unstructured magnitude or N:M zeros; returns the record written into config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dynaprune.errors import DynapruneError
from dynaprune.static import plan
from dynaprune.static.criteria import LAYER_CRITERIA, criterion
from dynaprune.static.criteria.magnitude import exponential_schedule, magnitude_prune
from dynaprune.static.criteria.nm import apply_nm, parse_nm
from dynaprune.static.structured import adapter


@dataclass
class StaticConfig:
    heads: float = 0.0
    ffn: float = 0.0
    layers: int = 0
    criterion: str = "taylor"
    layer_criterion: str = "cosine"
    nm: str | None = None
    sparsity: float = 0.0
    steps: int = 1
    ffn_refit: str | None = None  # "output" | "residual": least-squares refit of the down-projection (refit.py)

    def check(self, n_layers: int | None = None) -> None:
        plan.check_ratio("--heads", self.heads)
        plan.check_ratio("--ffn", self.ffn)
        plan.check_ratio("--sparsity", self.sparsity)
        criterion(self.criterion)
        if self.layer_criterion not in LAYER_CRITERIA:
            known = ", ".join(LAYER_CRITERIA)
            raise DynapruneError(f"unknown layer criterion {self.layer_criterion!r} (known: {known})")
        if self.layers < 0 or (n_layers is not None and self.layers >= n_layers):
            raise DynapruneError(f"--layers must lie in [0, {n_layers}) (removing every layer is not allowed), "
                                 f"got {self.layers}")
        if self.nm is not None:
            parse_nm(self.nm)
            if self.sparsity:
                raise DynapruneError("give --nm or --sparsity, not both")
        exponential_schedule(self.sparsity, self.steps)
        if self.ffn_refit is not None:
            from dynaprune.static.refit import TARGETS

            if self.ffn_refit not in TARGETS:
                raise DynapruneError(f"unknown --ffn-refit {self.ffn_refit!r} (known: {', '.join(TARGETS)})")
            if not self.ffn:
                raise DynapruneError("--ffn-refit needs --ffn (it refits the pruned FFN layers)")


def prune_model(model, calib, cfg: StaticConfig, say=lambda _m: None) -> dict:
    """Prune ``model`` in place; the record of what was removed (original layer indices)."""
    arch = adapter(model)
    cfg.check(arch.n_layers)
    if cfg.nm is not None:  # check the widths before any work
        n, m = parse_nm(cfg.nm)
        widths = {lin.in_features for blk in model.layers for lin in blk.modules()
                  if lin.__class__.__name__ == "Linear"}
        bad = sorted(w for w in widths if w % m)
        if bad:
            raise DynapruneError(f"--nm {cfg.nm}: M={m} does not divide the input width {bad[0]}")
    from dynaprune.runtime.cost import cost_shape, dense_cost

    params_before = sum(p.numel() for p in model.parameters())
    parent_shape = cost_shape(model)
    original = list(range(arch.n_layers))
    record: dict = {"parent": model.name, "config": asdict(cfg), "parent_layers": arch.n_layers}
    previous = getattr(model.config, "static_record", None)
    if previous:  # pruning a pruned checkpoint again: its own record is kept inside the new one
        record["previous"] = previous
    if cfg.layers:
        say("layer importance")
        drop = plan.layers_to_remove(LAYER_CRITERIA[cfg.layer_criterion](model, calib), cfg.layers)
        plan.apply_layers(model, drop)
        original = [i for i in original if i not in drop]
        record["removed_layers"] = drop
    head_fn, ffn_fn = criterion(cfg.criterion)
    if cfg.heads:
        say(f"head importance ({cfg.criterion})")
        removed = plan.heads_to_remove(model, head_fn(model, calib), cfg.heads)
        plan.apply_heads(model, removed)
        record["removed_heads"] = {str(original[k]): v for k, v in sorted(removed.items())}
    if cfg.ffn:
        say(f"FFN importance ({cfg.criterion})")
        removed = plan.ffn_to_remove(ffn_fn(model, calib), cfg.ffn)
        if cfg.ffn_refit:
            from dynaprune.static.refit import RefitConfig, prune_ffn_refit

            say(f"FFN down-projection refit ({cfg.ffn_refit})")
            record["ffn_refit"] = prune_ffn_refit(model, calib, removed, RefitConfig(cfg.ffn_refit))
        else:
            plan.apply_ffn(model, removed)
        record["removed_ffn_neurons"] = {str(original[k]): len(v) for k, v in sorted(removed.items())}
    record["kept_layers"] = original
    if cfg.nm is not None:
        record["nm_zeroed_weights"] = apply_nm(model, *parse_nm(cfg.nm))
        record["note"] = "N:M zeros keep the tensor shapes: no speed-up without sparse kernels"
    elif cfg.sparsity:
        record["schedule"] = magnitude_prune(model, cfg.sparsity, cfg.steps)
        record["note"] = "unstructured zeros keep the tensor shapes: no speed-up without sparse kernels"
    record["params_parent"] = params_before
    record["params"] = sum(p.numel() for p in model.parameters())
    shape = cost_shape(model)  # dense FLOPs of one sequence, pruned over parent (runtime/cost.py)
    record["static_flops_kept_at"] = {str(n): dense_cost(shape, [n])["dense_flops"]["total"]
                                      / dense_cost(parent_shape, [n])["dense_flops"]["total"] for n in (128, 512)}
    model.config.static_record = record  # the in-memory model carries it as a loaded one does
    return record

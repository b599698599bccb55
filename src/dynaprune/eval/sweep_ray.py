"""``dynaprune sweep CONFIG --ray [ADDRESS]``: the grid's points as Ray tasks (Ray is an optional extra).

The driver keeps the results file: it submits every pending point, and appends a point's line when its
task finishes (``append_result``: one fsynced append), so resuming, the run ids and the file format are
those of the sequential sweep. A worker that dies mid-point (killed, out of memory) is retried by Ray
(``max_retries``); a point is written only once its task has returned, so nothing is written twice. A
point that raises is written as a failed line (``status: failed``) and the others go on.

ADDRESS: none starts a local Ray with ``workers`` CPUs; ``auto`` joins the cluster of this node; ``HOST:PORT``
or ``ray://HOST:PORT`` joins a remote one, checked first with a plain TCP connect and a timeout so an
unreachable address is one error, not a hang.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from dynaprune.errors import DynapruneError
from dynaprune.eval.sweep import SCHEMA, RunSpec, _drop_partial_tail, append_result, failed_row, pending

CONNECT_TIMEOUT_S = 5.0
_MODELS: dict[str, object] = {}  # per worker process: the last model loaded (one in memory at a time)


def run_point(spec: RunSpec, command: str = "") -> dict:
    """One point of the grid, as the sequential sweep runs it (what a Ray task executes)."""
    from datetime import datetime, timezone

    from dynaprune import load
    from dynaprune.api import evaluate_task

    if spec.model not in _MODELS:
        _MODELS.clear()
        _MODELS[spec.model] = load(spec.model)
    opts = {k: Path(v) if k == "train_data" else v for k, v in spec.options.items()}
    row = evaluate_task(_MODELS[spec.model], spec.task, data=Path(spec.data) if spec.data else None,
                        recipe=spec.recipe, model_name=spec.model, **opts).to_json()
    row["extra"] = {**row.get("extra", {}), **{k: v for k, v in spec.options.items() if k == "protocol"}}
    row["command"] = command
    row["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return row


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A TCP connect to the address's host and port; a DynapruneError when nothing answers in time."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise DynapruneError(f"--ray {address}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise DynapruneError(f"cannot reach a Ray cluster at {address} within {timeout:.0f}s "
                             f"({e.strerror or e}); start one with `ray start --head` or drop the address") from None


def _init(address: str | None, workers: int | None):
    try:
        import ray
    except ImportError:
        raise DynapruneError("Ray is not installed: pip install 'dynaprune[ray]'") from None
    if address and address != "auto":
        check_reachable(address)
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": workers or 2, "include_dashboard": False}
        try:
            ray.init(log_to_driver=False, **kwargs)
        except (ConnectionError, TimeoutError, RuntimeError) as e:  # something answered, but not a Ray head
            raise DynapruneError(f"cannot reach a Ray cluster at {address}: {e}") from None
    return ray


def run_sweep_ray(
    specs: list[RunSpec],
    results_path: str | Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    command: str = "",
    point: Callable[[RunSpec, str], dict] = run_point,
    on_done: Callable[[RunSpec, int, int], None] | None = None,
    max_retries: int = 2,
) -> int:
    """Run every pending spec as a Ray task (1 CPU each), appending each line as its task finishes, in
    finishing order. Returns how many points ran (failed ones included)."""
    results_path = Path(results_path)
    _drop_partial_tail(results_path)
    todo = list(pending(specs, results_path))
    if not todo:
        return 0
    ray = _init(address, workers)
    remote = ray.remote(num_cpus=1, max_retries=max_retries)(point)
    waiting = {remote.remote(spec, command): spec for spec in todo}
    done = 0
    while waiting:
        ready, _ = ray.wait(list(waiting), num_returns=1)
        spec = waiting.pop(ready[0])
        try:
            row = {"schema": SCHEMA, "run_id": spec.run_id, "config_line": spec.line, **ray.get(ready[0])}
        except Exception as e:  # the point's own error (or retries exhausted): a failed line, the rest go on
            cause = getattr(e, "cause", None) or e
            row = failed_row(spec, f"{type(cause).__name__}: {cause}", command)
        append_result(results_path, row)
        done += 1
        if on_done:
            on_done(spec, done, len(todo))
    return done

"""Issue 18 on SmolLM2-135M: static head pruning, then recovery fine-tuning with the causal-LM loss
(``static/recover_lm.py``, pruning guide section 4), perplexity before and after.

Calibration (the Taylor head importance) and recovery train on WikiText-2 *valid*; perplexity is
reported on WikiText-2 *test* with the ``continue`` protocol (1536 context tokens prefilled, 512 scored),
its first ``--chunks`` chunks, for the dense parent, the pruned model and the recovered one (same
chunks). The record is rewritten after each phase (a long CPU run leaves what it finished).

    python -m benchmarks.static_smollm2 [--heads 0.3] [--recovery-chunks 96] [--lr 1e-4] [--chunks 8]
        [--threads 1] [--quick]
Writes benchmarks/results/static-smollm2.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, save, setup_threads


def perplexity(model, data: Path, chunks: int) -> dict:
    from dynaprune.cli_eval import run_task

    r = run_task(model.name, "lm", data=data, model=model, protocol="continue", max_examples=chunks)
    return {"perplexity": r.metric["value"], "n": r.n, "seconds": r.seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--heads", type=float, default=0.3)
    p.add_argument("--criterion", default="taylor")
    p.add_argument("--calib-chunks", type=int, default=16, help="256-token WikiText-2 valid chunks")
    p.add_argument("--recovery-chunks", type=int, default=96, help="512-token WikiText-2 valid chunks (1 step each)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--chunks", type=int, default=8, help="WikiText-2 test chunks scored")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 test chunk, 2 calibration / recovery chunks")
    p.add_argument("--out", type=Path, default=RESULTS / "static-smollm2.json")
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    import dynaprune
    from dynaprune.paths import shared_data_dir
    from dynaprune.static.calib import load_calibration
    from dynaprune.static.prune import StaticConfig, prune_model
    from dynaprune.static.recover import RecoveryConfig, recover

    if args.quick:
        args.chunks, args.calib_chunks, args.recovery_chunks = 1, 2, 2
    valid, test = shared_data_dir() / "wikitext2" / "valid.txt", shared_data_dir() / "wikitext2" / "test.txt"
    t0 = time.perf_counter()
    model = dynaprune.load(args.model)
    payload: dict = {"command": " ".join(["python -m benchmarks.static_smollm2", *(argv or sys.argv[1:])]),
                     "model": args.model, "threads": threads,
                     "split": {"report": f"WikiText-2 test, protocol continue (1536 + 512), first {args.chunks} "
                               "chunks", "calibration": f"{args.calib_chunks} x 256 tokens of WikiText-2 valid",
                               "recovery": f"{args.recovery_chunks} x 512 tokens of WikiText-2 valid, 1 epoch, "
                               f"1 chunk per AdamW step, lr {args.lr}"},
                     "chunks": args.chunks}

    def checkpoint() -> None:
        payload["seconds"] = round(time.perf_counter() - t0, 1)
        save("static-smollm2", payload, path=args.out)

    payload["dense"] = perplexity(model, test, args.chunks)
    print("dense", payload["dense"], file=sys.stderr, flush=True)
    checkpoint()
    calib = load_calibration(model, valid, max_examples=args.calib_chunks)
    record = prune_model(model, calib, StaticConfig(heads=args.heads, criterion=args.criterion))
    payload["pruning"] = {k: record[k] for k in ("config", "removed_heads", "params", "params_parent",
                                                  "static_flops_kept_at")}
    payload["pruned"] = perplexity(model, test, args.chunks)
    print("pruned", payload["pruned"], file=sys.stderr, flush=True)
    checkpoint()
    rcfg = RecoveryConfig(valid, max_train=args.recovery_chunks, lr=args.lr, chunk=512, lm_batch=1)
    rec = recover(model, rcfg, on_step=lambda s: print(f"step {s.step}/{s.total} loss {s.loss:.3f}",
                                                       file=sys.stderr, flush=True))
    payload["recovery"] = rec
    payload["recovered"] = perplexity(model, test, args.chunks)
    print("recovered", payload["recovered"], file=sys.stderr, flush=True)
    for key in ("pruned", "recovered"):
        payload[key]["vs_dense"] = payload[key]["perplexity"] / payload["dense"]["perplexity"]
    checkpoint()
    print(args.out)


if __name__ == "__main__":
    main()

"""Trainer step time per transport: ringsync-train's step, and its gradient all-reduce alone.

    python benchmarks/train_step.py --transports p2p,shm --ranks 2 --rounds 3 --json out.json

Run it directly (not under mpiexec): for each transport it launches `mpiexec -n RANKS python
benchmarks/train_step.py` with RINGSYNC_TRANSPORT set (ringsync reads it once, at init()),
round-robin over the transports for --rounds rounds, so drift in the machine's load hits
every transport alike. Each launch builds the trainer's step (ringsync.training.train.Trainer:
forward/backward, the gradient all-reduce -- grouped_allreduce_ over the FlatBuffer's views,
op Average -- then SGD) for each model and times:
  step             one whole train_step (compute, all-reduce, update)
  allreduce        the all-reduce phase inside those steps (it absorbs the ranks' compute skew)
  allreduce alone  the gradient all-reduce called by itself, after a barrier
each the slowest rank's, median over --steps steps after --warmup untimed ones; the table
gives the median over launches, and each transport's time over the first one's (/p2p with
--transports p2p,shm: below 1 is faster than p2p). Models:
  digits  ringsync-train's default: digits, MLP 64-128-64-10 (17,226 float32 parameters, 67 KB)
  mlp4m   synthetic data, MLP 512-1024-512-10: 1,055,242 float32 parameters (4.0 MB)
A transport whose launch fails (e.g. one this ringsync lacks) is reported in one line, and
the others are still measured; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl

PROG = "train_step.py"
TRANSPORTS = ("auto", "p2p", "shm")
MODELS = {
    "digits": ["--dataset", "digits"],
    "mlp4m": ["--dataset", "synthetic", "--samples", "4096", "--features", "512", "--hidden", "1024,512"],
}


def _names(text: str, allowed, flag: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in allowed]
    if bad or not names:
        raise bl.CliError(f"{flag}: unknown {bad or text!r}; choose from {','.join(allowed)}")
    if len(set(names)) != len(names):
        raise bl.CliError(f"{flag}: {text!r} names one twice")
    return names


def parse_args(argv: list[str] | None = None):
    ap = bl.Parser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default="p2p",
                    help=f"RINGSYNC_TRANSPORT values, comma-separated, of {','.join(TRANSPORTS)} (p2p)")
    ap.add_argument("--models", default="digits,mlp4m", help=f"of {','.join(MODELS)} (both)")
    ap.add_argument("--ranks", type=bl.positive_int, default=2, help="ranks per launch (2)")
    ap.add_argument("--rounds", type=bl.positive_int, default=3, help="launches per transport, interleaved (3)")
    ap.add_argument("--steps", type=bl.positive_int, default=40, help="timed steps per model and launch (40)")
    ap.add_argument("--warmup", type=bl.nonnegative_int, default=5, help="untimed steps first (5)")
    ap.add_argument("--batch-size", type=bl.positive_int, default=32, help="samples per rank per step (32)")
    ap.add_argument("--mpiexec", default=bl.default_mpiexec(), help="launcher command (the venv's mpiexec)")
    ap.add_argument("--timeout", type=bl.positive_int, default=300, help="seconds per launch (300)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--csv", metavar="PATH")
    ap.add_argument("--worker-out", metavar="PATH", help=argparse.SUPPRESS)   # set by the launcher
    args = ap.parse_args(argv)
    try:
        args.transports = _names(args.transports, TRANSPORTS, "--transports")
        args.models = _names(args.models, tuple(MODELS), "--models")
    except bl.CliError as exc:
        bl.fail(f"{PROG}: error: {exc}")
    return args


# --- one launch: under mpiexec, with RINGSYNC_TRANSPORT set by the launcher ------------------

def worker(args) -> int:
    from mpi4py import MPI

    import ringsync as rs
    from ringsync.context import world
    from ringsync.training import train

    try:
        rs.init()
    except Exception as exc:  # noqa: BLE001 - ValueError for a bad RINGSYNC_*; reported in one line
        bl.fail(f"{PROG}: error: ringsync.init(): {exc}")
    comm = MPI.COMM_WORLD
    out = {"settings": world().settings.variables(), "ringsync_env": bl.ringsync_env(), "models": {}}
    for model in args.models:
        targs = train.parse_args([*MODELS[model], "--batch-size", str(args.batch_size), "--epochs", str(10 ** 6),
                                  "--quiet"])
        trainer = train.Trainer(targs, train.load_data(targs))
        step_s, in_step_s, alone_s = [], [], []
        for i in range(args.warmup + args.steps):
            xb, yb = trainer.batch(trainer.step)
            before = trainer.phase_seconds["allreduce"]
            t0 = time.perf_counter()
            trainer.train_step(xb, yb)
            if i >= args.warmup:
                step_s.append(time.perf_counter() - t0)
                in_step_s.append(trainer.phase_seconds["allreduce"] - before)
        for i in range(args.warmup + args.steps):
            comm.Barrier()
            t0 = time.perf_counter()
            trainer.allreduce_gradients()
            if i >= args.warmup:
                alone_s.append(time.perf_counter() - t0)
        med = {}
        for name, mine in (("step", step_s), ("allreduce_in_step", in_step_s), ("allreduce_alone", alone_s)):
            worst = np.empty(len(mine))
            comm.Allreduce(np.array(mine), worst, op=MPI.MAX)   # the slowest rank's, step by step
            med[f"{name}_ms"] = float(np.median(worst)) * 1e3
        grads = trainer.params.flat_grad
        out["models"][model] = {"sizes": trainer.sizes, "params": int(grads.size), "grad_bytes": int(grads.nbytes),
                                **med}
    if comm.Get_rank() == 0:
        bl.write_json(args.worker_out, out)
    return 0


# --- the launcher ----------------------------------------------------------------------------

def launch(args, transport: str) -> dict:
    """One job with RINGSYNC_TRANSPORT=transport; its worker's figures (RuntimeError if it fails)."""
    import json

    argv = [os.path.abspath(__file__), "--models", ",".join(args.models), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "launch.json")
        bl.run_job(args.mpiexec, args.ranks, [*argv, "--worker-out", out], args.timeout,
                   f"RINGSYNC_TRANSPORT={transport} launch", need=out,
                   env_extra={"RINGSYNC_TRANSPORT": transport}, marker=f"{PROG}: error:")
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker_out:
        return worker(args)
    launches: dict[str, list[dict]] = {t: [] for t in args.transports}
    failures: dict[str, str] = {}
    for _ in range(args.rounds):
        for t in args.transports:
            if t in failures:
                continue
            try:
                launches[t].append(launch(args, t))
            except RuntimeError as exc:
                failures[t] = str(exc)   # reported once, under the table; not launched again
    measured = [t for t in args.transports if t not in failures]
    rows = []
    for model in args.models:
        base = None
        for t in measured:
            figures = [run["models"][model] for run in launches[t]]
            row = {"model": model, "transport": t, "ranks": args.ranks, "batch_per_rank": args.batch_size,
                   "sizes": "-".join(map(str, figures[0]["sizes"])), "params": figures[0]["params"],
                   "grad_bytes": figures[0]["grad_bytes"], "launches": len(figures)}
            for key in ("step_ms", "allreduce_in_step_ms", "allreduce_alone_ms"):
                row[key] = float(np.median([f[key] for f in figures]))
                row[f"min_{key}"] = float(np.min([f[key] for f in figures]))
            base = base or row
            row["vs"] = base["transport"]
            row["step_over_base"] = row["step_ms"] / base["step_ms"]
            row["allreduce_alone_over_base"] = row["allreduce_alone_ms"] / base["allreduce_alone_ms"]
            rows.append(row)
    base_name = measured[0] if measured else args.transports[0]
    print(f"# trainer step: {args.ranks} ranks, batch {args.batch_size}/rank; per launch the slowest rank's "
          f"median over {args.steps} steps (+{args.warmup} warm-up); median over {args.rounds} interleaved "
          f"launches per transport; /{base_name}: time over {base_name}'s (below 1: faster)")
    print(f"# {'model':>7} {'params':>9} {'grads':>8} {'transport':>9} {'step(ms)':>9} {'ar in step(ms)':>14} "
          f"{'ar alone(ms)':>12} {'step/' + base_name:>9} {'alone/' + base_name:>10}")
    for r in rows:
        print(f"  {r['model']:>7} {r['params']:>9} {r['grad_bytes'] / 2**20:>6.2f}MB {r['transport']:>9} "
              f"{r['step_ms']:>9.3f} {r['allreduce_in_step_ms']:>14.3f} {r['allreduce_alone_ms']:>12.3f} "
              f"{r['step_over_base']:>9.2f} {r['allreduce_alone_over_base']:>10.2f}", flush=True)
    for t, why in failures.items():
        print(f"# {t}: NOT MEASURED: {why}")
    for r in rows:
        if r["transport"] != base_name and r["allreduce_alone_over_base"] > 1:
            print(f"# {r['model']}: {r['transport']}'s all-reduce is {r['allreduce_alone_over_base']:.2f}x "
                  f"{base_name}'s: slower")
    if rows:
        meta = {"benchmark": "train_step", "ranks": args.ranks, "rounds": args.rounds, "steps": args.steps,
                "warmup": args.warmup, "batch_per_rank": args.batch_size, "models": {m: MODELS[m] for m in args.models},
                "transports": args.transports, "failures": failures, "mpiexec": args.mpiexec,
                "launch_settings": {t: [run["settings"] for run in launches[t]] for t in measured},
                "machine": bl.machine()}
        if args.json:
            bl.write_json(args.json, {"meta": {**meta, "ringsync_env": bl.ringsync_env()}, "results": rows})
        if args.csv:
            bl.write_csv(args.csv, rows)
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())

"""What slow ranks cost: ringsync-train's step under injected stragglers and jitter.

(In-process, under mpiexec; benchmarks/straggler.py sweeps one straggler's delay from outside,
with plots. This one adds random jitter on every rank, and the theory beside it.)

    mpiexec -n 4 python benchmarks/jitter.py [--delays 0,0.005,0.01,0.02,0.05]
        [--jitters exp:0.002,exp:0.005] [--steps 40] [--json out.json]

A straggler row slows the last rank by a fixed delay per step: every other rank then waits
that long each step, so the whole job runs at the straggler's pace. A jitter row adds an
exponential (or uniform) random delay to every rank: each step waits for the largest of p
draws, and for exponential delays of mean m the expected wait per rank and step is
m * (H_p - 1), H_p = 1 + 1/2 + ... + 1/p, which grows like ln p: the more ranks, the more
likely one of them is slow. The table shows that formula beside the measurement.
"""
from __future__ import annotations

import sys
import time

import benchlib as bl

import ringsync as rs
from ringsync import timing
from ringsync.timing.inject import parse_jitter
from ringsync.training import train


def run_case(trainer: train.Trainer, batches: list, steps: int, stragglers: dict, jitter: str | None) -> dict:
    """Train `steps` steps with the given injection; return the straggler report."""
    timing.start("passive", every=0, timeline="", stragglers=stragglers, jitter=jitter)
    t0 = time.perf_counter()
    for k in range(steps):
        trainer.train_step(*batches[k % len(batches)])
    seconds = time.perf_counter() - t0
    report = timing.finish()
    report["step_ms"] = 1e3 * seconds / steps
    return report


def main() -> int:
    parser = bl.Parser(prog="jitter.py", description=__doc__.splitlines()[0])
    parser.add_argument("--delays", default="0,0.005,0.01,0.02,0.05", help="straggler delays, seconds")
    parser.add_argument("--jitters", default="exp:0.002,exp:0.005", help="jitter distributions")
    parser.add_argument("--steps", type=int, default=40, help="steps per case (40)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows here (rank 0)")
    args = parser.parse_args()
    try:
        delays = [float(d) for d in args.delays.split(",") if d.strip()]
        jitters = [j for j in args.jitters.split(",") if j.strip()]
        for j in jitters:
            parse_jitter(j)
    except ValueError as exc:
        parser.error(str(exc))
    if args.steps < 1 or any(not d >= 0 for d in delays):
        parser.error("--steps must be >= 1 and every delay >= 0")
    targs = train.parse_args(["--quiet"])
    rs.init()
    p = rs.size()
    trainer = train.Trainer(targs, train.load_data(targs))
    batches = [trainer.batch(k) for k in range(trainer.steps_per_epoch)]
    run_case(trainer, batches, 5, {}, None)                      # warm up
    harmonic = sum(1 / k for k in range(1, p + 1))
    rows = []
    cases = [(f"straggler {p - 1}:{d}" if d else "no injection", {p - 1: d} if d else {}, None, d)
             for d in delays]
    cases += [(f"jitter {j}", {}, j, None) for j in jitters]
    for name, stragglers, jitter, delay in cases:
        rep = run_case(trainer, batches, args.steps, stragglers, jitter)
        others = [r["wait_s"] for r in rep["ranks"] if not (stragglers and r["rank"] == p - 1)]
        kind, _, scale = (jitter or "").partition(":")
        theory = delay if delay is not None else (float(scale) * (harmonic - 1) if kind == "exp" else None)
        rows.append({"case": name, "step_ms": rep["step_ms"],
                     "wait_ms_per_step": 1e3 * sum(others) / len(others) / args.steps,
                     "expected_wait_ms": None if theory is None else 1e3 * theory,
                     "cost_fraction": rep["straggler"]["cost_fraction"],
                     "slowest_rank": rep["straggler"]["slowest_rank"]})
    if rs.rank() == 0:
        base = rows[0]["step_ms"]
        print(f"straggler cost on {p} rank(s), {args.steps} steps per case (default ringsync-train model)")
        print(f"{'case':>24} {'step ms':>8} {'slowdown':>9} {'wait ms/step':>13} {'expected':>9} "
              f"{'cost':>6} {'slowest':>8}")
        for row in rows:
            expected = "" if row["expected_wait_ms"] is None else f"{row['expected_wait_ms']:.2f}"
            print(f"{row['case']:>24} {row['step_ms']:>8.2f} {row['step_ms'] / base:>8.2f}x "
                  f"{row['wait_ms_per_step']:>13.2f} {expected:>9} {100 * row['cost_fraction']:>5.1f}% "
                  f"{row['slowest_rank']:>8}")
        print("(wait: mean over the ranks that were not injected as stragglers; expected: the delay, "
              "or m(H_p - 1) for exp jitter)")
        if args.json:
            bl.write_json(args.json, {"ranks": p, "steps": args.steps, "rows": rows,
                                      "ringsync_env": bl.ringsync_env()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

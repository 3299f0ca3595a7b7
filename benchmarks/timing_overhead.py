"""What timing costs: ringsync-train's step time under each RINGSYNC_TIMING mode, interleaved.

    mpiexec -n 2 python benchmarks/timing_overhead.py --rounds 30 --steps 200 [--json out.json]

One process trains the same model throughout; blocks of `--steps` steps run in turn under
off, passive and barrier (the order rotates each round, so drift and neighbours' load hit
every mode alike). A block's time is the slowest rank's; each mode's figure is the median
block; its overhead is the median over rounds of (its block / off's block in the same round),
a paired ratio that cancels slow drift in the machine's load. The fastest block per mode is
shown too: on a loaded machine it is the figure least disturbed by neighbours. Nothing is
injected.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import ringsync as rs
from ringsync import timing, train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="blocks per mode (30)")
    parser.add_argument("--steps", type=int, default=200, help="steps per block (200)")
    parser.add_argument("--train-args", default="--dataset digits",
                        help="ringsync-train flags for the model and data (default: digits)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures here (rank 0)")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    targs = train.parse_args([*args.train_args.split(), "--quiet"])
    rs.init()
    trainer = train.Trainer(targs, train.load_data(targs))
    batches = [trainer.batch(k) for k in range(trainer.steps_per_epoch)]

    def block(mode: str) -> float:
        timing.start(mode, timeline="")
        rs.barrier()
        t0 = time.perf_counter()
        for k in range(args.steps):
            trainer.train_step(*batches[k % len(batches)])
        seconds = time.perf_counter() - t0
        timing.finish()
        return float(rs.allreduce(np.array([seconds]), op=rs.Max)[0])

    modes = list(timing.MODES)
    block("barrier")                                       # warm up caches and connections
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes[r % 3:] + modes[:r % 3]:
            times[m].append(block(m) / args.steps)
    med = {m: float(np.median(times[m])) for m in modes}
    paired = {m: float(np.median(np.array(times[m]) / np.array(times["off"]))) for m in modes}
    result = {"ranks": rs.size(), "steps_per_block": args.steps, "rounds": args.rounds,
              "train_args": args.train_args,
              "median_step_ms": {m: 1e3 * med[m] for m in modes},
              "overhead_percent": {m: 100 * (paired[m] - 1) for m in modes},
              "fastest_block_overhead_percent": {m: 100 * (min(times[m]) / min(times["off"]) - 1)
                                                 for m in modes}}
    if rs.rank() == 0:
        print(f"timing overhead on {rs.size()} rank(s), {args.rounds} interleaved blocks of "
              f"{args.steps} steps per mode ({args.train_args})")
        print(f"{'mode':>8} {'median step (ms)':>17} {'overhead':>9} {'quartiles (ms)':>18}"
              f" {'fastest (ms)':>13} {'overhead':>9}")
        for m in modes:
            q1, q3 = (1e3 * np.percentile(times[m], q) for q in (25, 75))
            print(f"{m:>8} {1e3 * med[m]:>17.4f} {result['overhead_percent'][m]:>+8.2f}%"
                  f" {q1:>8.4f} {q3:>9.4f} {1e3 * min(times[m]):>13.4f}"
                  f" {result['fastest_block_overhead_percent'][m]:>+8.2f}%")
        if args.json:
            tmp = f"{args.json}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
            os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

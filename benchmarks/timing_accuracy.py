"""How well are waits measured? Inject known delays and compare, per timing mode.

    mpiexec -n 2 python benchmarks/timing_accuracy.py [--delay 0.004] [--steps 60] [--count 1000]

Rank r sleeps r x DELAY per step before a small all-reduce, so rank r should wait
(p-1-r) x DELAY for the last rank. The error also holds the sleeps' own overshoot and, on an
oversubscribed machine, scheduling delays: an upper bound on the method's error. The last
rank (expected wait 0, measured 0 by construction) is left out of the error figures.
"""
from __future__ import annotations

import sys
import time

import benchlib as bl
import numpy as np

import ringsync as rs
from ringsync import timing


def main() -> int:
    parser = bl.Parser(prog="timing_accuracy.py", description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.004, help="seconds per rank step (0.004)")
    parser.add_argument("--steps", type=int, default=60, help="steps per mode (60)")
    parser.add_argument("--count", type=int, default=1000, help="float32 elements all-reduced (1000)")
    args = parser.parse_args()
    if not args.delay >= 0 or args.steps < 3 or args.count < 0:
        parser.error("need --delay >= 0, --steps >= 3, --count >= 0")
    rs.init()
    p, r = rs.size(), rs.rank()
    grad = np.ones(args.count, dtype=np.float32)
    expected = args.delay * (p - 1 - np.arange(p))[:, None]
    for mode in ("barrier", "passive"):
        timing.start(mode, every=0, timeline="")
        for _ in range(args.steps):
            timing.begin_step()
            time.sleep(args.delay * r)
            rs.allreduce_(grad, op=rs.Average)
            timing.end_step()
        report = timing.finish()
        if r == 0:
            wait = np.array(report["straggler"]["wait_per_step_s"])[:, 2:]    # 2 warm-up steps
            err = 1e3 * np.abs(wait - expected)[:-1]           # the last rank's 0 is exact
            print(f"{mode:>8}: {p} ranks, expected waits (ms) {np.round(1e3 * expected[:, 0], 2)}, "
                  f"median measured {np.round(1e3 * np.median(wait, axis=1), 2)}; |error| median "
                  f"{np.median(err):.3f} ms, 90th percentile {np.percentile(err, 90):.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

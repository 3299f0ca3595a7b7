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

import sys
import time

import benchlib as bl
import numpy as np

import ringsync as rs
from ringsync import timing
from ringsync.training import train


def component_costs(n: int = 20000) -> tuple[float, float]:
    """(probe CPU seconds per step, barrier seconds): the two things a timing mode adds.

    The probes are timed around a no-op "collective" (no messages, so no neighbours' noise);
    the barrier is ringsync's own, back to back. Medians of 9 repeats.
    """
    noop = timing.probe(lambda: None)
    probe, barrier = [], []
    for _ in range(9):
        per_mode = {}
        for mode in ("off", "passive"):
            timing.start(mode, timeline="", every=0)
            t0 = time.perf_counter()
            for _ in range(n):
                timing.begin_step()
                noop()
                timing.end_step()
            per_mode[mode] = (time.perf_counter() - t0) / n
            timing.finish()
        probe.append(per_mode["passive"] - per_mode["off"])
        rs.barrier()
        t0 = time.perf_counter()
        for _ in range(n // 10):
            rs.barrier()
        barrier.append((time.perf_counter() - t0) / (n // 10))
    return float(np.median(probe)), float(np.median(barrier))


def main() -> int:
    parser = bl.Parser(prog="timing_overhead.py", description=__doc__.splitlines()[0])
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
    probe_s, barrier_s = component_costs()
    med = {m: float(np.median(times[m])) for m in modes}
    paired = {m: float(np.median(np.array(times[m]) / np.array(times["off"]))) for m in modes}
    result = {"ranks": rs.size(), "steps_per_block": args.steps, "rounds": args.rounds,
              "train_args": args.train_args,
              "median_step_ms": {m: 1e3 * med[m] for m in modes},
              "overhead_percent": {m: 100 * (paired[m] - 1) for m in modes},
              "probe_us_per_step": 1e6 * probe_s, "barrier_us": 1e6 * barrier_s,
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
        print(f"components: probes {1e6 * probe_s:.2f} us of CPU per step (passive and barrier); "
              f"barrier {1e6 * barrier_s:.2f} us per step (barrier mode only)")
        if args.json:
            bl.write_json(args.json, {**result, "ringsync_env": bl.ringsync_env()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

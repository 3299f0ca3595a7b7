"""Timing hooks in your own training loop:  mpiexec -n 4 python examples/timing_hooks.py

Rank r "computes" for 2 + 8r ms per step, so the highest rank is the straggler. Three calls
time the loop: begin_step and end_step around each step (the all-reduce inside is timed by
itself), and finish at the end. A hook registered with gathered=True receives every rank's
record of a step on rank 0, waits included, every `every` steps: feed it to your own logger.
"""
import time

import numpy as np

import ringsync as rs
from ringsync import timing
from ringsync.timing.straggler import format_report

rs.init()
grad = np.ones(250_000, dtype=np.float32)     # 1 MB of "gradients"


@timing.on_step
def local(record: timing.StepRecord) -> None:
    """Every rank, every step: its own compute and sync time (waits are not known yet)."""
    if record.rank == 0 and record.step == 0:
        print(f"rank 0, step 0: compute {1e3 * record.compute_s:.1f} ms, "
              f"in sync {1e3 * record.allreduce_s:.1f} ms")


@timing.on_step(gathered=True)
def wait_line(records: list) -> None:
    """Rank 0 only, once the ranks have compared notes: who waited how long in this step."""
    waits = " ".join(f"{1e3 * r.wait_s:5.1f}" for r in records)
    slowest = min(records, key=lambda r: r.wait_s).rank
    print(f"step {records[0].step}: wait per rank (ms) {waits}   everybody waited for rank {slowest}")


timing.start("barrier", every=5)
for step in range(10):
    timing.begin_step()
    time.sleep((2 + 8 * rs.rank()) / 1e3)     # stand-in for forward and backward
    rs.allreduce_(grad, op=rs.Average)
    timing.end_step()
report = timing.finish()
if rs.rank() == 0:
    print(format_report(report))

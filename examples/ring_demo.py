"""Watch the ring all-reduce, step by step:  mpiexec -n 4 python examples/ring_demo.py

Rank r contributes 10**r to every element, so each printed number spells out whose
contributions it holds: on 4 ranks, 1111 means "all four", 110 means "ranks 1 and 2".
"""
import argparse
import sys

import numpy as np
from mpi4py import MPI

import ringsync as rs
from ringsync.algorithms.ring import chunk_bounds, ring_allreduce_


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=10, help="elements per rank (default 10)")
    args = parser.parse_args()
    if args.length < 0:
        parser.error("--length must be >= 0")

    rs.init()
    r, p = rs.rank(), rs.size()
    comm = MPI.COMM_WORLD.Dup()     # the teaching ring's own message space
    buf = np.full(args.length, 10 ** r, dtype=np.int64)
    original = buf.copy()

    def show(title: str) -> None:
        # Gather every rank's buffer on rank 0 (a demo may use MPI's gather; the ring does not).
        rows = MPI.COMM_WORLD.gather(buf.copy(), root=0)
        if r == 0:
            print(f"\n{title}")
            for rank, row in enumerate(rows):
                print(f"  rank {rank}: " + " ".join(f"{v:>{p}d}" for v in row))

    if r == 0:
        sizes = [b - a for a, b in chunk_bounds(args.length, p)]
        print(f"{p} ranks, {args.length} elements cut into chunks of sizes {sizes}")
        print(f"each rank sends and receives 2(p-1)/p = {2 * (p - 1) / p:.2f} x the buffer")
    show("start: rank r holds 10**r everywhere")
    ring_allreduce_(buf, comm, np.add,
                    observe=lambda phase, step: show(f"after {phase} step {step + 1} of {p - 1}"))

    expected = np.empty_like(original)
    MPI.COMM_WORLD.Allreduce(original, expected, op=MPI.SUM)
    same = bool(np.array_equal(buf, expected)) and np.array_equal(rs.allreduce(original), expected)
    verdicts = MPI.COMM_WORLD.gather(same, root=0)
    if r == 0:
        print(f"\nmatches MPI's own Allreduce on every rank: {'yes' if all(verdicts) else 'NO'}")
    comm.Free()
    return 0 if r != 0 or all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())

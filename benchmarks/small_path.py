"""Where a small all-reduce's time goes on the shared-memory path: each piece timed alone.

    mpiexec -n 2 python benchmarks/small_path.py --bytes 4K

  copy      the buffer into this rank's slot of the node's segment (NumPy slice assignment)
  add       one np.add of the buffer's size (the reduce, for 2 ranks)
  sync      one sync point of the segment (publish a counter, wait for the others')
  opening   the agreement check's opening alone: arm the call, trailer, one sync, compare
  ringsync  the whole rs.allreduce_ (front door + opening with the payload + reduce)
  mpi       MPI's own Allreduce of the same buffer, in place

Each runs --iters calls per round, interleaved over --rounds rounds; medians per call. The
sum copy + add + opening, against ringsync, shows what the front door itself costs.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl


def main(argv: list[str] | None = None) -> int:
    ap = bl.Parser(prog="small_path.py", description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=bl.parse_size, default=bl.parse_size("4K"), help="buffer size (4K)")
    ap.add_argument("-n", "--iters", type=bl.positive_int, default=2000, help="calls per round (2000)")
    ap.add_argument("-r", "--rounds", type=bl.positive_int, default=9, help="interleaved rounds (9)")
    args = ap.parse_args(argv)

    from mpi4py import MPI

    import ringsync as rs
    from ringsync.agreement import ALLREDUCE
    from ringsync.context import world

    rs.init()
    w, comm = world(), MPI.COMM_WORLD
    if w.node is None or not w.single_node or w.checker.segment is None:
        bl.fail("small_path.py: error: needs 2+ ranks on one node with RINGSYNC_TRANSPORT=auto|shm "
                "and the agreement check on")
    x = np.zeros(max(1, args.bytes // 4), dtype=np.float32)
    y = np.zeros_like(x)
    seg, checker = w.node, w.checker
    slot = seg.views(0, x.dtype, x.size)[seg.rank]

    def opening() -> None:
        checker.arm(ALLREDUCE, rs.Sum, x.dtype, x.shape)
        checker.agree()

    impls = {
        "copy": lambda: slot.__setitem__(Ellipsis, x),
        "add": lambda: np.add(x, y, out=y),
        "sync": seg.sync,
        "opening": opening,
        "ringsync": lambda: rs.allreduce_(x),
        "mpi": lambda: comm.Allreduce(MPI.IN_PLACE, x),
    }
    times = bl.interleaved(impls, rounds=args.rounds, iters=args.iters, warmup=50, barrier=comm.Barrier)
    # per round the slowest rank's figure, then the median over rounds
    med = {k: float(np.median(np.max(comm.allgather(np.asarray(v)), axis=0))) for k, v in times.items()}
    if comm.rank == 0:
        print(f"# small_path: {x.nbytes} B float32 on {comm.size} ranks, {args.iters} calls x "
              f"{args.rounds} interleaved rounds, medians per call (slowest rank); {MPI.Get_library_version().splitlines()[0].strip(chr(0))}")
        for name, t in med.items():
            print(f"  {name:>9} {t * 1e6:8.2f} us")
        parts = med["copy"] + med["add"] + med["opening"]
        print(f"# copy + add + opening = {parts * 1e6:.2f} us: the rest of ringsync's "
              f"{med['ringsync'] * 1e6:.2f} us is the front door's Python")
        print(f"# ringsync / mpi = {med['ringsync'] / med['mpi']:.2f} (the target is at most 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What does the cross-rank agreement check cost?  mpiexec -n 2 python benchmarks/agreement_cost.py

Times ringsync.allreduce_ on one small buffer (default 4 KB of float32) with the check on
and off, in interleaved blocks (on, off, off, on, ...) so that a busy machine slows both
alike, and prints the median time of each and the median of the per-round ratios.
"""
import statistics
import time

import benchlib as bl
import numpy as np
from mpi4py import MPI

import ringsync as rs
from ringsync.context import world


def main() -> None:
    parser = bl.Parser(prog="agreement_cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=4096, help="buffer size (default 4096)")
    parser.add_argument("--rounds", type=int, default=31, help="on/off pairs (default 31)")
    parser.add_argument("--iters", type=int, default=1000, help="calls per block (default 1000)")
    args = parser.parse_args()
    if args.bytes < 4 or args.rounds < 1 or args.iters < 1:
        parser.error("--bytes must be >= 4, --rounds and --iters >= 1")

    rs.init()
    checker = world().checker
    x = np.zeros(args.bytes // 4, dtype=np.float32)   # zeros: repeated sums stay finite

    def block(enabled: bool) -> float:
        checker.enabled = enabled
        for _ in range(50):                     # warm-up
            rs.allreduce_(x)
        MPI.COMM_WORLD.Barrier()
        start = time.perf_counter()
        for _ in range(args.iters):
            rs.allreduce_(x)
        return (time.perf_counter() - start) / args.iters * 1e6

    on, off = [], []
    for i in range(args.rounds):
        first, second = (True, False) if i % 2 == 0 else (False, True)   # alternate the order
        a, b = block(first), block(second)
        on.append(a if first else b)
        off.append(b if first else a)
    if rs.rank() == 0:
        ratios = [a / b for a, b in zip(on, off)]
        print(f"{world().size} ranks, {args.bytes} B float32 allreduce_, {args.rounds} interleaved rounds "
              f"of {args.iters} calls")
        print(f"check on : median {statistics.median(on):7.2f} us, best block {min(on):7.2f} us")
        print(f"check off: median {statistics.median(off):7.2f} us, best block {min(off):7.2f} us")
        print(f"ratio on/off: median {statistics.median(ratios):.3f} "
              f"(quartiles {np.percentile(ratios, 25):.3f} .. {np.percentile(ratios, 75):.3f})")


if __name__ == "__main__":
    main()

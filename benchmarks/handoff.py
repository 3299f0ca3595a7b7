"""What the shared-memory path's copies cost, each timed alone: the limits under it.

    mpiexec -n 2 python benchmarks/handoff.py -b 4K -e 1M -f 4

The shared-memory all-reduce (ringsync/algorithms/shared.py) moves data with plain copies
into a rank's part of a shared window, which the other ranks then read. Every rank does the
same at the same time, per size:

  private    copy between two private buffers (destination 128 bytes into its page, past
             the source: clear of memcpy's trap)
  trapped    the same copy with the destination 16 bytes past the source, modulo the page:
             memcpy's trap (ringsync/transport/memcopy.py)
  copy_      that trapped copy through ringsync's copy_, which steps around the trap from
             128 KB up to the L2 cache's size (smaller copies it leaves to memcpy)
  shared     copy into this rank's part of a shared window that no other rank reads
  handoff    the same copy, made after the next rank has read that part (as every call of
             the all-reduce does): the reader's cached copies must be invalidated first
  read       copy the previous rank's part, just written there, into a private buffer
  add        np.add of two private buffers into a third (the reduce, for 2 ranks)
  mpi        MPI's own Allreduce of the same bytes, in place (for scale)

handoff/private is what coherence between cores adds to a copy in this launch, trapped/private
what the trap costs. Rounds are interleaved; each figure is the median over rounds of the
slowest rank's time per call. Sizes past the L2 cache (1M and up) measure mostly the memory
the ranks share, and which step happened to run beside which: read them as noise.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl

STEPS = ("private", "trapped", "copy_", "shared", "handoff", "read", "add", "mpi")


def at_page_offset(nbytes: int, offset: int) -> np.ndarray:
    """nbytes private bytes (written) whose first lies `offset` bytes into a page."""
    from ringsync.transport.memcopy import PAGE, address

    raw = np.ones(nbytes + 2 * PAGE, np.uint8)
    start = (offset - address(raw)) % PAGE
    return raw[start:start + nbytes]


def measure(comm, node, n: int, rounds: int) -> dict[str, float]:
    """Seconds per call of each step for n bytes: median over rounds of the slowest rank."""
    from mpi4py import MPI

    from ringsync.transport.memcopy import copy_
    from ringsync.transport.shm import SharedWindow

    p, r = node.Get_size(), node.Get_rank()
    window = SharedWindow(node, n)
    mine, previous = window.mine, window.peers[(r - 1) % p]
    src, dst, trap = at_page_offset(n, 0), at_page_offset(n, 128), at_page_offset(n, 16)
    x, y, z = (np.ones(n // 4, np.float32) for _ in range(3))
    iters = max(3, min(200, (16 << 20) // n))
    steps = {       # timed as loops of `iters` calls (handoff and read: below, between barriers)
        "private": lambda: np.copyto(dst, src),
        "trapped": lambda: np.copyto(trap, src),
        "copy_": lambda: copy_(trap, src),
        "shared": lambda: np.copyto(mine, src),
        "add": lambda: np.add(x, y, out=z),
    }
    per_round: dict[str, list[float]] = {s: [] for s in STEPS}
    for round_ in range(rounds + 1):                # the first round warms up, untimed
        spent = dict.fromkeys(STEPS, 0.0)
        for name, step in steps.items():
            node.Barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                step()
            spent[name] = time.perf_counter() - t0
        node.Barrier()
        for _ in range(iters):                      # write mine; the next rank reads it
            t0 = time.perf_counter()
            np.copyto(mine, src)
            t1 = time.perf_counter()
            node.Barrier()
            t2 = time.perf_counter()
            np.copyto(dst, previous)
            t3 = time.perf_counter()
            node.Barrier()
            spent["handoff"] += t1 - t0
            spent["read"] += t3 - t2
        node.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            comm.Allreduce(MPI.IN_PLACE, x)
        spent["mpi"] = time.perf_counter() - t0
        x[...] = 1
        if round_:
            for name in STEPS:
                per_round[name].append(comm.allreduce(spent[name] / iters, op=MPI.MAX))
    window.free()
    return {name: float(np.median(v)) for name, v in per_round.items()}


def main(argv: list[str] | None = None) -> int:
    ap = bl.Parser(prog="handoff.py", description=__doc__.splitlines()[0])
    bl.add_size_range(ap, "4K", "1M", 4)
    ap.add_argument("-r", "--rounds", type=bl.positive_int, default=7, help="interleaved rounds (7)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.minbytes < 64 or args.maxbytes < args.minbytes:
        bl.fail("handoff.py: error: need 64 <= minbytes <= maxbytes")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    if node.Get_size() < 2 or node.Get_size() != comm.Get_size():
        bl.fail("handoff.py: error: needs 2+ ranks, all on one node", comm.Get_rank())
    rows = []
    for n in bl.size_list(args.minbytes, args.maxbytes, args.stepfactor):
        med = measure(comm, node, n, args.rounds)
        rows.append({"bytes": n, "ranks": comm.Get_size(), **{f"{s}_us": med[s] * 1e6 for s in STEPS},
                     "trapped_over_private": med["trapped"] / med["private"],
                     "handoff_over_private": med["handoff"] / med["private"]})
    if comm.Get_rank() == 0:
        print(f"# handoff: {comm.Get_size()} ranks on one node, {args.rounds} interleaved rounds, medians "
              f"per call (slowest rank); {MPI.Get_library_version().splitlines()[0].strip(chr(0))}")
        print(f"# {'bytes':>9} " + " ".join(f"{s + '(us)':>11}" for s in STEPS) + f" {'trapped/private':>15}"
              f" {'handoff/private':>15}")
        for row in rows:
            print(f"  {row['bytes']:>9} " + " ".join(f"{row[s + '_us']:>11.1f}" for s in STEPS)
                  + f" {row['trapped_over_private']:>15.2f} {row['handoff_over_private']:>15.2f}", flush=True)
        if args.json:
            bl.write_json(args.json, {"meta": {"benchmark": "handoff", "ranks": comm.Get_size(),
                                               "rounds": args.rounds, "machine": bl.machine()},
                                      "results": rows})
    node.Free()
    return 0


if __name__ == "__main__":
    sys.exit(main())

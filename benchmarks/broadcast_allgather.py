"""Broadcast and all-gather per transport: ringsync over p2p, over shared memory, and MPI's own.

    mpiexec -n 2 python benchmarks/broadcast_allgather.py -b 1K -e 8M -f 8

  p2p   RINGSYNC_TRANSPORT=p2p: the opening by messages, then a binomial tree (broadcast)
        or the ring (all-gather)
  shm   RINGSYNC_TRANSPORT=shm (what auto picks on one node): the opening and the data
        through the node's segment (but a broadcast above RINGSYNC_SMALL_BYTES takes the
        tree, and an all-gather whose blocks pass one slot the ring, even here)
  mpi   MPI's Bcast and Allgather
Sizes are per rank (the broadcast buffer; each rank's all-gather block). ringsync is
re-initialized for each transport in every round, and the rounds alternate, so drift in the
machine's load hits all three alike; medians over rounds of the slowest rank's time. Each
transport's results are first checked against MPI's at every size (`check`; exit 1 if wrong).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl

TRANSPORTS = ("p2p", "shm")


def main(argv: list[str] | None = None) -> int:
    ap = bl.Parser(prog="broadcast_allgather.py", description=__doc__.splitlines()[0])
    bl.add_size_range(ap, "1K", "8M", 8)
    ap.add_argument("-r", "--rounds", type=bl.positive_int, default=7, help="interleaved rounds (7)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.minbytes < 4 or args.maxbytes < args.minbytes:
        bl.fail("broadcast_allgather.py: error: need 4 <= minbytes <= maxbytes")
    from mpi4py import MPI

    import ringsync as rs

    comm = MPI.COMM_WORLD
    p = comm.Get_size()
    sizes = bl.size_list(args.minbytes, args.maxbytes, args.stepfactor)
    buffers = {n: np.ones(n // 4, np.float32) for n in sizes}
    gathered = {n: np.empty(p * (n // 4), np.float32) for n in sizes}
    times: dict[tuple[str, str, int], list[float]] = {}

    def timed(key: tuple[str, str, int], fn) -> None:
        iters = max(3, min(200, (4 << 20) // key[2]))
        for _ in range(max(3, min(50, (32 << 20) // key[2]))):     # (a new segment needs a few
            fn()                                                    # calls to reach full speed)
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.setdefault(key, []).append(comm.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX))

    def check() -> bool:
        """Both collectives on rank-dependent data, at every size, against MPI's own."""
        ok = True
        for n in sizes:
            x = np.arange(n // 4, dtype=np.float32) + 1000 * comm.Get_rank()
            ok &= np.array_equal(rs.broadcast(x, root=p - 1), comm.bcast(x, root=p - 1))
            ok &= np.array_equal(rs.allgather(x), np.concatenate(comm.allgather(x)))
        return bool(comm.allreduce(int(ok), op=MPI.MIN))

    checked: dict[str, str] = {}
    saved = os.environ.get("RINGSYNC_TRANSPORT")
    for _ in range(args.rounds):
        for transport in TRANSPORTS:
            os.environ["RINGSYNC_TRANSPORT"] = transport
            rs.shutdown()
            rs.init()
            if transport not in checked:
                checked[transport] = "ok" if check() else "WRONG"
            for n, x in buffers.items():
                timed(("broadcast", transport, n), lambda x=x: rs.broadcast_(x, root=0))
                timed(("allgather", transport, n), lambda x=x: rs.allgather(x))
        for n, x in buffers.items():
            timed(("broadcast", "mpi", n), lambda x=x: comm.Bcast(x, root=0))
            timed(("allgather", "mpi", n), lambda x=x, n=n: comm.Allgather(x, gathered[n]))
    if saved is None:
        os.environ.pop("RINGSYNC_TRANSPORT", None)
    else:
        os.environ["RINGSYNC_TRANSPORT"] = saved
    rows = []
    for kind in ("broadcast", "allgather"):
        for n in sizes:
            med = {t: float(np.median(times[(kind, t, n)])) for t in (*TRANSPORTS, "mpi")}
            rows.append({"collective": kind, "bytes": n, "ranks": p,
                         **{f"{t}_us": med[t] * 1e6 for t in med},
                         "shm_over_p2p": med["shm"] / med["p2p"], "mpi_over_shm": med["mpi"] / med["shm"],
                         "check": "ok" if set(checked.values()) == {"ok"} else "WRONG"})
    if comm.Get_rank() == 0:
        print(f"# broadcast_allgather: float32 on {p} ranks, {args.rounds} interleaved rounds, medians "
              f"(slowest rank); shm/p2p below 1: shared memory is faster; mpi/shm above 1: ringsync is faster")
        print(f"# {'collective':>10} {'bytes':>9} {'p2p(us)':>10} {'shm(us)':>10} {'mpi(us)':>10} "
              f"{'shm/p2p':>8} {'mpi/shm':>8} {'check':>6}")
        for r in rows:
            print(f"  {r['collective']:>10} {r['bytes']:>9} {r['p2p_us']:>10.1f} {r['shm_us']:>10.1f} "
                  f"{r['mpi_us']:>10.1f} {r['shm_over_p2p']:>8.2f} {r['mpi_over_shm']:>8.2f} {r['check']:>6}",
                  flush=True)
        if args.json:
            bl.write_json(args.json, {"meta": {"benchmark": "broadcast_allgather", "ranks": p,
                                               "rounds": args.rounds, "machine": bl.machine(),
                                               "mpi": MPI.Get_library_version().splitlines()[0].strip(chr(0))},
                                      "results": rows})
    return 0 if set(checked.values()) == {"ok"} else 1


if __name__ == "__main__":
    sys.exit(main())

"""Bytes each host's link carries for one all-reduce, per implementation (across emulated hosts).

    sudo ringsync-cluster run --hosts 2 --ranks-per-host 2 -- python benchmarks/link_bytes.py \
        --sizes 1M,16M --json out.json

Run on hosts of their own (benchmarks/cluster_bench.py does): local rank 0 of each host reads
its eth0 counters (/proc/net/dev: the host's own network namespace) around one call of each
implementation, with barriers between, and the table shows them beside what a ring across h
hosts must send per host link and direction: 2(h-1)/h * n. The counters see a GSO packet's
headers once (docs/cluster.md), so they read a little above the payload, not 4% above.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl


def eth0_bytes() -> tuple[int, int]:
    """(sent, received) bytes of this host's eth0, as its network namespace counts them."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "eth0":
                fields = rest.split()
                return int(fields[8]), int(fields[0])
    return 0, 0


def main(argv: list[str] | None = None) -> int:
    ap = bl.Parser(prog="link_bytes.py", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,16M", help="bytes per all-reduce (1M,16M)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    try:
        sizes = [bl.parse_size(s) for s in args.sizes.split(",")]
    except argparse.ArgumentTypeError as exc:
        bl.fail(f"link_bytes.py: error: --sizes: {exc}")
    from mpi4py import MPI

    import ringsync as rs
    from ringsync.algorithms.ring import ring_allreduce_

    rs.init()
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    leaders = comm.Split(0 if local.Get_rank() == 0 else MPI.UNDEFINED, comm.Get_rank())
    hosts = comm.allreduce(1 if local.Get_rank() == 0 else 0)
    rows = []
    for nbytes in sizes:
        buf = np.zeros(nbytes // 4, np.float32)
        out = np.empty_like(buf)
        scratch = np.empty(-(-buf.size // comm.Get_size()), np.float32)
        impls = {"ringsync": partial(rs.allreduce_, buf),
                 "flat ring (p2p)": partial(ring_allreduce_, buf, comm, np.add, scratch),
                 "mpi": partial(comm.Allreduce, buf, out)}
        for name, fn in impls.items():
            fn()                                  # connections made, buffers touched
            comm.Barrier()
            before = eth0_bytes()
            comm.Barrier()
            fn()
            comm.Barrier()
            after = eth0_bytes()
            moved = (after[0] - before[0], after[1] - before[1])
            if leaders != MPI.COMM_NULL:
                per_host = leaders.gather(moved, root=0)
                if leaders.Get_rank() == 0:
                    expected = 2 * (hosts - 1) / hosts * nbytes
                    rows.append({"size": nbytes, "impl": name, "hosts": hosts, "expected": expected,
                                 "sent": [s for s, _ in per_host], "received": [r for _, r in per_host]})
    if comm.Get_rank() == 0:
        print(f"# bytes per host link for one all-reduce, {hosts} hosts, {comm.Get_size()} ranks")
        print(f"# {'size':>10} {'impl':>16} {'expected':>12}  sent / received per host (x expected)")
        for row in rows:
            ratios = " ".join(f"{s / row['expected']:.3f}/{r / row['expected']:.3f}"
                              for s, r in zip(row["sent"], row["received"]))
            print(f"  {row['size']:>10} {row['impl']:>16} {row['expected']:>12.0f}  {ratios}")
        if args.json:
            bl.write_json(args.json, {"hosts": hosts, "ranks": comm.Get_size(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

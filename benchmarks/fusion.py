"""Tensor fusion: N arrays of S bytes all-reduced one by one, grouped, and as one flat buffer.

    mpiexec -n 2 python benchmarks/fusion.py -N 256 -S 16K --json out.json --plot out.png

  one-by-one  rs.allreduce_ on each array: N all-reduces, N latencies
  grouped     rs.grouped_allreduce_ on N separate arrays: packed into fusion buckets
              (default threshold), reduced, unpacked
  grouped-views  the same on N adjacent views of one rs.FlatBuffer (as the trainer's
              gradients): reduced where they lie, no packing
  flat        rs.allreduce_ on one buffer of N*S bytes: the bound fusion aims at
and a threshold sweep: grouped with fusion thresholds from S up to N*S, showing how many
buckets pay off. All run interleaved (round-robin per round); medians over rounds.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl


def parse_args(argv: list[str] | None = None):
    ap = bl.Parser(prog="fusion.py", description=__doc__.splitlines()[0])
    ap.add_argument("-N", "--tensors", type=bl.positive_int, default=256, help="number of arrays (256)")
    ap.add_argument("-S", "--size", type=bl.parse_size, default=bl.parse_size("16K"), help="bytes per array (16K)")
    ap.add_argument("-d", "--datatype", type=bl.parse_dtype, default=np.dtype("float32"), help="dtype (float)")
    ap.add_argument("-n", "--iters", type=bl.positive_int, default=5, help="calls per timed round (5)")
    ap.add_argument("-w", "--warmup_iters", type=bl.nonnegative_int, default=2, help="untimed calls first (2)")
    ap.add_argument("-r", "--rounds", type=bl.positive_int, default=5, help="interleaved rounds (5)")
    ap.add_argument("--thresholds", default=None,
                    help="comma-separated fusion thresholds for the sweep (default: S, 4S, 16S, ... N*S)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--csv", metavar="PATH")
    ap.add_argument("--plot", metavar="PNG")
    args = ap.parse_args(argv)
    try:
        if args.size < args.datatype.itemsize:
            raise bl.CliError(f"-S {args.size} is smaller than one {args.datatype.name}")
        total = args.tensors * args.size
        if args.thresholds is None:
            args.thresholds = bl.size_list(args.size, total, 4)
            if args.thresholds[-1] != total:
                args.thresholds.append(total)  # always end with everything in one bucket
        else:
            try:
                args.thresholds = [bl.parse_size(t) for t in args.thresholds.split(",") if t.strip()]
            except Exception as exc:  # noqa: BLE001 - argparse's ArgumentTypeError, reworded
                raise bl.CliError(f"--thresholds: {exc}") from None
        bl.check_plot_possible(args.plot)
    except bl.CliError as exc:
        bl.fail(f"fusion.py: error: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpi4py import MPI

    import ringsync as rs

    rs.init()
    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    count = args.size // args.datatype.itemsize
    arrays = [np.full(count, 1, dtype=args.datatype) for _ in range(args.tensors)]  # separate allocations
    flat = np.full(count * args.tensors, 1, dtype=args.datatype)
    views = rs.FlatBuffer([(count,)] * args.tensors, dtype=args.datatype)  # adjacent: fused with no copy
    views.flat[...] = 1
    impls = {
        "one-by-one": lambda: [rs.allreduce_(a) for a in arrays],
        "grouped": lambda: rs.grouped_allreduce_(arrays),
        "grouped-views": lambda: rs.grouped_allreduce_(views.views),
        "flat": lambda: rs.allreduce_(flat),
    }
    for t in args.thresholds:
        impls[f"grouped@{bl.human(t)}"] = lambda t=t: rs.grouped_allreduce_(arrays, fusion_bytes=t)
    with np.errstate(over="ignore"):
        times = bl.interleaved(impls, rounds=args.rounds, iters=args.iters, warmup=args.warmup_iters,
                               barrier=comm.Barrier)
    worst = {}
    for name, seconds in times.items():
        mine = np.array(seconds)
        worst[name] = np.empty_like(mine)
        comm.Allreduce(mine, worst[name], op=MPI.MAX)
    med = {k: float(np.median(v)) for k, v in worst.items()}
    rows = []
    for name in impls:
        threshold = None
        if name.startswith("grouped@"):
            threshold = args.thresholds[list(impls).index(name) - 4]
        rows.append({"mode": name, "threshold_bytes": threshold, "tensors": args.tensors,
                     "bytes_each": args.size, "ranks": p, "time_ms": med[name] * 1e3,
                     "min_ms": float(np.min(worst[name])) * 1e3,
                     "over_flat": med[name] / med["flat"],
                     "speedup_vs_one_by_one": med["one-by-one"] / med[name]})
    if rank == 0:
        print(f"# fusion: {args.tensors} x {bl.human(args.size)} {args.datatype.name} on {p} ranks "
              f"({bl.human(args.tensors * args.size)} in all); {args.iters} calls x {args.rounds} "
              f"interleaved rounds, medians")
        print(f"# {'mode':>16} {'time(ms)':>10} {'min(ms)':>10} {'/flat':>7} {'vs 1-by-1':>9}")
        for r in rows:
            print(f"  {r['mode']:>16} {r['time_ms']:>10.3f} {r['min_ms']:>10.3f} {r['over_flat']:>7.2f} "
                  f"{r['speedup_vs_one_by_one']:>8.1f}x", flush=True)
        meta = {"benchmark": "fusion", "ranks": p, "dtype": args.datatype.name, "iters": args.iters,
                "rounds": args.rounds, "machine": bl.machine()}
        bl.write_results(args, meta, rows, lambda ax: draw(ax, rows, args, p))
    return 0


def draw(ax, rows: list[dict], args, p: int) -> None:
    """Grouped time against fusion threshold; one-by-one and flat as horizontal lines."""
    sweep = [r for r in rows if r["threshold_bytes"] is not None]
    ax.plot([r["threshold_bytes"] for r in sweep], [r["time_ms"] for r in sweep], marker="o", label="grouped")
    for name, style in (("one-by-one", "--"), ("flat", ":")):
        ax.axhline(next(r["time_ms"] for r in rows if r["mode"] == name), linestyle=style, label=name, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("fusion threshold (bytes)")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(f"{args.tensors} x {bl.human(args.size)} arrays, {p} ranks")
    ax.grid(True, alpha=0.3)
    ax.legend()


if __name__ == "__main__":
    sys.exit(main())

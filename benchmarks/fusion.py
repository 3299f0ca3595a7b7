"""Tensor fusion: N arrays of S bytes all-reduced one by one, grouped, and as one flat buffer.

    mpiexec -n 2 python benchmarks/fusion.py -N 256 -S 16K --json out.json --plot out.png

  one-by-one  rs.allreduce_ on each array: N all-reduces, N latencies
  grouped     rs.grouped_allreduce_ on N separate arrays: packed into fusion buckets
              (default threshold), reduced, unpacked
  grouped-views  the same on N adjacent views of one rs.FlatBuffer (as the trainer's
              gradients): reduced where they lie, no packing
  flat        rs.allreduce_ on one buffer of N*S bytes: the bound fusion aims at
  horovod-cpu Horovod's CPU path, the peer: the N arrays packed into one reusable fusion
              buffer (np.concatenate(..., out=buf)), MPI's own Allreduce in place, unpacked
and a threshold sweep: grouped with fusion thresholds from S up to N*S, showing how many
buckets pay off. All run interleaved (round-robin per round); medians over rounds, and each
mode's time over horovod-cpu's (/hvd-cpu: below 1 is faster than Horovod's CPU path).
Before timing, every mode but the sweep is checked once on random data against a float64
reference sum (the `check` column): equal up to float rounding.
"""
from __future__ import annotations

import itertools
import os
import sys
import zlib
from collections.abc import Callable

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


def horovod_cpu(comm, arrays: list[np.ndarray]) -> Callable[[], None]:
    """Horovod's CPU all-reduce of separate arrays: pack into one fusion buffer (allocated once
    and reused, as Horovod's), MPI_Allreduce in place, unpack back into the arrays."""
    from mpi4py import MPI

    buf = np.empty(sum(a.size for a in arrays), dtype=arrays[0].dtype)
    bounds = np.cumsum([0] + [a.size for a in arrays])
    parts = [buf[lo:hi] for lo, hi in itertools.pairwise(bounds)]

    def call() -> None:
        np.concatenate(arrays, out=buf)
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        for a, part in zip(arrays, parts):
            np.copyto(a, part)
    return call


def check(fn: Callable[[], None], targets: list[np.ndarray], comm) -> str:
    """Run fn once on random data in `targets`; 'ok' if the sums match a float64 reference up to
    float rounding and are the same on every rank. Leaves the targets holding ones."""
    from mpi4py import MPI

    rng = np.random.default_rng([11, comm.Get_rank()])
    for a in targets:
        a[...] = rng.standard_normal(a.size) if a.dtype.kind == "f" else rng.integers(0, 4, a.size)
    wide = np.concatenate([a.ravel() for a in targets]).astype(np.float64)
    ref, scale = np.empty_like(wide), np.empty_like(wide)
    comm.Allreduce(wide, ref, op=MPI.SUM)
    comm.Allreduce(np.abs(wide), scale, op=MPI.SUM)
    fn()
    got = np.concatenate([a.ravel() for a in targets]).astype(np.float64)
    eps = np.finfo(targets[0].dtype).eps if targets[0].dtype.kind == "f" else 0.0
    close = bool(np.all(np.abs(got - ref) <= 2 * comm.Get_size() * eps * scale))
    same = len(set(comm.allgather(zlib.crc32(got.tobytes())))) == 1
    ok = comm.allreduce(int(close and same), op=MPI.MIN)
    for a in targets:
        a[...] = 1
    return "ok" if ok else ("WRONG" if not close else "differs-across-ranks")


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
        "horovod-cpu": horovod_cpu(comm, arrays),
    }
    targets = {"one-by-one": arrays, "grouped": arrays, "grouped-views": list(views.views), "flat": [flat],
               "horovod-cpu": arrays}
    verdicts = {name: check(fn, targets[name], comm) for name, fn in impls.items()}
    thresholds = {}
    for t in args.thresholds:
        name = f"grouped@{bl.human(t)}"
        impls[name], thresholds[name] = (lambda t=t: rs.grouped_allreduce_(arrays, fusion_bytes=t)), t
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
        rows.append({"mode": name, "threshold_bytes": thresholds.get(name), "tensors": args.tensors,
                     "bytes_each": args.size, "ranks": p, "time_ms": med[name] * 1e3,
                     "min_ms": float(np.min(worst[name])) * 1e3,
                     "over_flat": med[name] / med["flat"],
                     "over_horovod_cpu": med[name] / med["horovod-cpu"],
                     "speedup_vs_one_by_one": med["one-by-one"] / med[name],
                     "check": verdicts.get(name, "-")})
    if rank == 0:
        print(f"# fusion: {args.tensors} x {bl.human(args.size)} {args.datatype.name} on {p} ranks "
              f"({bl.human(args.tensors * args.size)} in all); {args.iters} calls x {args.rounds} "
              f"interleaved rounds, medians; /hvd-cpu: time over horovod-cpu's (below 1: faster)")
        print(f"# {'mode':>16} {'time(ms)':>10} {'min(ms)':>10} {'/flat':>7} {'/hvd-cpu':>8} {'vs 1-by-1':>9} "
              f"{'check':>6}")
        for r in rows:
            print(f"  {r['mode']:>16} {r['time_ms']:>10.3f} {r['min_ms']:>10.3f} {r['over_flat']:>7.2f} "
                  f"{r['over_horovod_cpu']:>8.2f} {r['speedup_vs_one_by_one']:>8.1f}x {r['check']:>6}", flush=True)
        for name in ("grouped", "grouped-views"):
            ratio = med["horovod-cpu"] / med[name]
            print(f"# {name} vs horovod-cpu: {ratio:.2f}x "
                  f"({'faster' if ratio >= 1 else 'SLOWER: ringsync loses here'})")
        meta = {"benchmark": "fusion", "ranks": p, "dtype": args.datatype.name, "iters": args.iters,
                "rounds": args.rounds, "machine": bl.machine()}
        bl.write_results(args, meta, rows, lambda ax: draw(ax, rows, args, p))
    wrong = [name for name, v in verdicts.items() if v != "ok"]
    return 1 if wrong else 0


def draw(ax, rows: list[dict], args, p: int) -> None:
    """Grouped time against fusion threshold; one-by-one and flat as horizontal lines."""
    sweep = [r for r in rows if r["threshold_bytes"] is not None]
    ax.plot([r["threshold_bytes"] for r in sweep], [r["time_ms"] for r in sweep], marker="o", label="grouped")
    for name, style, color in (("one-by-one", "--", "gray"), ("flat", ":", "gray"), ("horovod-cpu", "-.", "tab:red")):
        ax.axhline(next(r["time_ms"] for r in rows if r["mode"] == name), linestyle=style, label=name, color=color)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("fusion threshold (bytes)")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(f"{args.tensors} x {bl.human(args.size)} arrays, {p} ranks")
    ax.grid(True, alpha=0.3)
    ax.legend()


if __name__ == "__main__":
    sys.exit(main())

"""All-reduce bandwidth and latency sweep, nccl-tests style, with the peers measured in the same run.

    mpiexec -n 2 python benchmarks/allreduce_sweep.py -b 4K -e 64M -f 4 -d float --json out.json --plot out.png

For each size it prints time (median and min over interleaved rounds), algbw = bytes/time
and busbw = algbw * 2(p-1)/p for:
  ringsync  the library's front door, rs.allreduce_ (algorithm chosen by size)
  teaching  ring.py's plain ring, called directly
  mpi       MPI's own Allreduce (the peer)
  gloo      torch.distributed with the gloo backend (only when torch is importable)
  ceiling   the transport ceiling: 2(p-1) ring Sendrecv of N/p bytes + (p-1) adds of N/p,
            the data movement and arithmetic any ring all-reduce has to do, done plainly
and each one's speed-up over MPI (t_mpi / t) and time over the ceiling (t / t_ceiling).
--device gpu sweeps CuPy buffers instead: ringsync's two device transports (staged through
pinned host memory; CUDA-aware, where the MPI is) and MPI's Allreduce (benchmarks/gpu_impls.py).
Buffers hold zeros while timed (an add costs the same whatever the values); -c 1 checks
every implementation once on random data against MPI's Allreduce, and across ranks.
"""
from __future__ import annotations

import os
import socket
import sys
import zlib
from collections.abc import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl
import gpu_impls

IMPLS = ("ringsync", "zerocopy", "teaching", "mpi", "gloo", "ceiling")


def parse_args(argv: list[str] | None = None):
    ap = bl.Parser(prog="allreduce_sweep.py", description=__doc__.splitlines()[0])
    bl.add_size_range(ap, "4K", "64M", 4)
    ap.add_argument("-d", "--datatype", type=bl.parse_dtype, default=np.dtype("float32"), help="float, half, double, int32... (float)")
    ap.add_argument("-n", "--iters", type=bl.positive_int, default=20, help="calls per timed round (20)")
    ap.add_argument("-w", "--warmup_iters", type=bl.nonnegative_int, default=5, help="untimed calls first (5)")
    ap.add_argument("-r", "--rounds", type=bl.positive_int, default=5, help="interleaved rounds; median and min over them (5)")
    ap.add_argument("-c", "--check", type=bl.nonnegative_int, default=1, help="1: check results against MPI's Allreduce (1)")
    ap.add_argument("--impls", default=None, help=f"comma-separated subset of {','.join(IMPLS)} "
                    "(--device gpu: of staged,cuda-aware,mpi); default all")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: CuPy buffers (see above)")
    ap.add_argument("--max-seconds", type=bl.nonnegative_float, default=0.0,
                    help="cap on timed calls per size and implementation: fewer iters for slow ones (0: none)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--csv", metavar="PATH")
    ap.add_argument("--plot", metavar="PNG")
    args = ap.parse_args(argv)
    try:
        args.sizes = bl.size_list(args.minbytes, args.maxbytes, args.stepfactor)
        names = gpu_impls.NAMES if args.device == "gpu" else IMPLS
        args.impls = [s.strip() for s in (args.impls or ",".join(names)).split(",") if s.strip()]
        bad = [s for s in args.impls if s not in names]
        if bad or not args.impls:
            raise bl.CliError(f"--impls: unknown {bad or args.impls!r}; choose from {','.join(names)}")
        if args.maxbytes < args.datatype.itemsize:
            raise bl.CliError(f"-e {args.maxbytes} is smaller than one {args.datatype.name}")
        bl.check_plot_possible(args.plot)
    except bl.CliError as exc:
        bl.fail(f"allreduce_sweep.py: error: {exc}")
    return args


# --- the implementations, each a function of the buffer --------------------------------------

def make_ceiling(comm, buf: np.ndarray) -> Callable[[], None]:
    """The transport ceiling: the ring's sends and adds, unsegmented, on preallocated buffers."""
    p, r = comm.Get_size(), comm.Get_rank()
    right, left = (r + 1) % p, (r - 1) % p
    m = -(-buf.size // p)
    # np.full writes every page: an untouched np.zeros buffer reads as the kernel's one shared
    # zero page, always in cache, which would make the ceiling unfairly fast.
    send, recv = (np.full(m, 0, dtype=buf.dtype) for _ in range(2))   # zeros: sums stay finite

    def ceiling() -> None:
        for _ in range(p - 1):
            comm.Sendrecv(send, dest=right, recvbuf=recv, source=left)
            # Add into the buffer that is sent, as a ring must: its sums are what its neighbour
            # reads next. Writing cache lines another core has just read costs a coherence
            # round trip per line (at 64 KB on 2 ranks: 33 us against 14 us for adding into a
            # private buffer), a cost no ring can avoid, so the ceiling pays it too.
            np.add(send, recv, out=send)
        for _ in range(p - 1):
            comm.Sendrecv(send, dest=right, recvbuf=recv, source=left)
    return ceiling


class Gloo:
    """torch.distributed with gloo on the same ranks, over TCP on localhost (or $MASTER_ADDR)."""

    def __init__(self, comm) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        torch.set_num_threads(1)  # one core per rank, as for the others
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = None
        if comm.Get_rank() == 0:
            with socket.socket() as s:
                s.bind((addr, 0))
                port = s.getsockname()[1]
        port = comm.bcast(port, root=0)
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}",
                                rank=comm.Get_rank(), world_size=comm.Get_size())

    def supports(self, dtype: np.dtype) -> bool:
        return dtype.name in ("float16", "float32", "float64", "int8", "int32", "int64", "uint8")

    def call(self, buf: np.ndarray) -> Callable[[], None]:
        tensor = self.torch.from_numpy(buf)  # shares buf's memory
        return lambda: self.dist.all_reduce(tensor)

    def close(self) -> None:
        self.dist.destroy_process_group()


def implementations(names: list[str], comm, buf: np.ndarray, gloo: Gloo | None):
    """name -> a no-argument function that all-reduces `buf` in place (sum)."""
    from mpi4py import MPI

    import ringsync as rs
    from ringsync.algorithms.ring import chunk_bounds, ring_allreduce_
    from ringsync.context import world

    w = world()
    found: dict[str, Callable[[], None]] = {}
    for name in names:
        if name == "ringsync":
            found[name] = lambda: rs.allreduce_(buf)
        elif name == "teaching":
            scratch = np.empty(max(1, chunk_bounds(buf.size, w.size)[0][1]), buf.dtype)
            found[name] = lambda s=scratch: ring_allreduce_(buf, w.comm, np.add, scratch=s)
        elif name == "mpi":
            found[name] = lambda: comm.Allreduce(MPI.IN_PLACE, buf)  # in place, like the others
        elif name == "gloo" and gloo is not None and gloo.supports(buf.dtype):
            found[name] = gloo.call(buf)
        elif name == "ceiling":
            found[name] = make_ceiling(comm, buf)
        elif name == "zerocopy" and w.node is not None and w.single_node:
            # the same bytes in a shared FlatBuffer: the others read it in place (no copy-in)
            shared = rs.FlatBuffer([buf.shape], buf.dtype, shared=True)
            found[name] = lambda v=shared.views: rs.grouped_allreduce_(v)
            found[name].buffer = shared
    return found


def check(name: str, fn: Callable[[], None], comm, buf: np.ndarray) -> str:
    """Run fn once on random data; 'ok' if it matches MPI's Allreduce and is the same on all ranks."""
    from mpi4py import MPI

    if name == "ceiling":
        return "-"
    if hasattr(fn, "buffer"):           # zerocopy: its own (shared) buffer
        buf = fn.buffer.flat
    rng = np.random.default_rng([7, comm.Get_rank()])
    if buf.dtype.kind == "f":
        buf[...] = rng.standard_normal(buf.size)
    else:
        buf[...] = rng.integers(0, 4, size=buf.size)
    wide = buf.astype(np.float64)
    ref, scale = np.empty_like(wide), np.empty_like(wide)
    comm.Allreduce(wide, ref, op=MPI.SUM)
    comm.Allreduce(np.abs(wide), scale, op=MPI.SUM)
    fn()
    eps = np.finfo(buf.dtype).eps if buf.dtype.kind == "f" else 0.0
    close = bool(np.all(np.abs(buf.astype(np.float64) - ref) <= 2 * comm.Get_size() * eps * scale))
    digest = zlib.crc32(buf.tobytes())
    same = len(set(comm.allgather(digest))) == 1
    ok = comm.allreduce(int(close and same), op=MPI.MIN)
    buf[...] = 0
    return "ok" if ok else ("WRONG" if not close else "differs-across-ranks")


def slowest_rank(comm, seconds: list[float]) -> np.ndarray:
    """Per round, the largest time over the ranks."""
    from mpi4py import MPI

    mine = np.array(seconds, dtype=np.float64)
    worst = np.empty_like(mine)
    comm.Allreduce(mine, worst, op=MPI.MAX)
    return worst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mpi4py import MPI

    import ringsync as rs

    rs.init()
    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    gloo = cp = None
    if args.device == "gpu":
        try:
            cp, line = gpu_impls.setup(comm)
        except (rs.GPUUnavailable, ValueError) as exc:
            bl.fail(f"allreduce_sweep.py: error: --device gpu: {exc}", rank)
        if rank == 0:
            print(f"# {line}")
    if "gloo" in args.impls:
        try:
            gloo = Gloo(comm)
        except ImportError:
            gloo = None
    dtype = args.datatype
    factor = bl.busbw_factor(p)
    rows = []
    meta = {"benchmark": "allreduce_sweep", "ranks": p, "dtype": dtype.name, "iters": args.iters,
            "warmup": args.warmup_iters, "rounds": args.rounds, "machine": bl.machine(),
            "gloo": bool(gloo), "device": args.device, "torch": bl._version("torch") if gloo else None,
            "ringsync_env": bl.ringsync_env()}
    if rank == 0:
        print(f"# ringsync all-reduce sweep: {p} ranks, {dtype.name}, {args.iters} calls x {args.rounds} "
              f"interleaved rounds (+{args.warmup_iters} warm-up); times are medians over rounds")
        print(f"# {meta['machine']['cpu']}, {meta['machine']['cores']} cores; {meta['machine']['mpi']}"
              f"; gloo: {'torch ' + str(meta['torch']) if gloo else 'not measured (torch not importable)'}")
        print(f"# {'size':>10} {'count':>10} {'type':>8} {'impl':>9} {'time(us)':>10} {'min(us)':>10} "
              f"{'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'vs_mpi':>7} {'/ceiling':>8} {'check':>6}")
    for nbytes in args.sizes:
        count = nbytes // dtype.itemsize
        if count == 0:
            continue
        if cp is not None:
            buf = gpu_impls.zeros(cp, count, dtype)
            impls = gpu_impls.implementations(args.impls, comm, buf)
            verdicts = {name: (gpu_impls.check(fn, comm, buf) if args.check else "-") for name, fn in impls.items()}
        else:
            buf = np.full(count, 0, dtype=dtype)  # written, so every page is real (see make_ceiling)
            impls = implementations(args.impls, comm, buf, gloo)
            verdicts = {name: (check(name, fn, comm, buf) if args.check else "-") for name, fn in impls.items()}
        iters = args.iters
        if args.max_seconds > 0:
            # Estimate the slowest implementation from one call each, then cap the calls.
            probe = bl.interleaved(impls, rounds=1, iters=1, warmup=0, barrier=comm.Barrier)
            slowest = comm.allreduce(max(v[0] for v in probe.values()), op=MPI.MAX)
            iters = max(1, min(iters, int(args.max_seconds / max(slowest, 1e-9) / args.rounds)))
        times = bl.interleaved(impls, rounds=args.rounds, iters=iters, warmup=args.warmup_iters,
                               barrier=comm.Barrier)
        # The slowest rank's time is the collective's time.
        times = {k: slowest_rank(comm, v) for k, v in times.items()}
        med = {k: float(np.median(v)) for k, v in times.items()}
        for name in impls:
            t = med[name]
            algbw = nbytes / t / 1e9
            row = {"size": nbytes, "count": count, "type": dtype.name, "impl": name, "ranks": p,
                   "iters": iters, "time_us": t * 1e6, "min_us": float(np.min(times[name])) * 1e6,
                   "rounds_us": [round(float(x) * 1e6, 2) for x in times[name]],
                   "algbw_GBps": algbw, "busbw_GBps": algbw * factor,
                   "speedup_vs_mpi": med["mpi"] / t if "mpi" in med else None,
                   "over_ceiling": t / med["ceiling"] if "ceiling" in med else None,
                   "check": verdicts[name]}
            rows.append(row)
            if rank == 0:
                vs = f"{row['speedup_vs_mpi']:.2f}x" if row["speedup_vs_mpi"] else "-"
                oc = f"{row['over_ceiling']:.2f}" if row["over_ceiling"] else "-"
                print(f"  {nbytes:>10} {count:>10} {dtype.name:>8} {name:>9} {t * 1e6:>10.1f} "
                      f"{row['min_us']:>10.1f} {algbw:>11.3f} {algbw * factor:>11.3f} {vs:>7} {oc:>8} "
                      f"{verdicts[name]:>6}", flush=True)
        for fn in impls.values():
            if hasattr(fn, "buffer"):
                fn.buffer.close()           # collective, as its making was
    if gloo is not None:
        gloo.close()
    if rank == 0:
        bl.write_results(args, meta, rows, lambda ax: draw(ax, rows, p, dtype.name))
    wrong = [r for r in rows if r["check"] not in ("ok", "-")]
    return 1 if wrong else 0


def draw(ax, rows: list[dict], p: int, dtype: str) -> None:
    """busbw against size, one line per implementation."""
    for name in dict.fromkeys(r["impl"] for r in rows):
        mine = [r for r in rows if r["impl"] == name]
        if mine:
            ax.plot([r["size"] for r in mine], [r["busbw_GBps"] for r in mine], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("buffer size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"all-reduce, {p} ranks, {dtype} (median of interleaved rounds)")
    ax.grid(True, alpha=0.3)
    ax.legend()


if __name__ == "__main__":
    sys.exit(main())

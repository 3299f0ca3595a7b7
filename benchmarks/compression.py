"""Gradient compression against its all-reduce: time per compressor, bytes on the wire, and the link rate where it pays.

    mpiexec -n 4 python benchmarks/compression.py -b 1M -e 64M -f 4 --rounds 10 --out results/compression
    sudo python benchmarks/compression.py --cluster 2x2 --rates 1gbit,2gbit,3gbit,5gbit,10gbit --out results/compression_2x2

What is timed: one `DistributedOptimizer(SGD(params), compression=c).synchronize()` per call,
the real path from float32 gradients in to float32 gradients out (compress, all-reduce(s),
decompress; op average), one call per compressor in turn in every round (interleaved, so drift
in the machine's load hits all alike), after `--warmup` untimed calls. A round's time is the
slowest rank's; the table gives the median (and min) over `--rounds` rounds, per size S and
compressor (`--compressors`, default none,fp16,bf16,powersgd:1,powersgd:4):

  time      median seconds of one synchronize()
  vs_none   none's time / this time: above 1, the compressor is faster than sending float32
  payload   bytes each rank hands to the all-reduce per call (compression_report()); the ring
            moves 2(p-1)/p of it per rank
  compress, decompress   the same engine's work alone, its all-reduce replaced by nothing: for
            fp16/bf16, the pre-scaled cast into the payload / the check and cast back; for
            PowerSGD, P = M Q, Gram-Schmidt, Q = Mᵀ P̂ and the error feedback / P̂ Q̄ᵀ. none: -
  err       |result - exact mean| / |exact mean| of one call from a cold start (float64
            reference): what the compressor loses (PowerSGD on random data: most of it)

The gradients: one float32 matrix of S/4 values, n x m as square as S allows (n the largest
divisor of S/4 not above its square root: 1M is 512x512, 4M 1024x1024, 16M 2048x2048, 64M
4096x4096), so PowerSGD compresses it whole (M = P Qᵀ, P n x r, Q m x r). Standard normal
values, different on every rank, copied in before every call (untimed). PowerSGD runs with
start_iter=0 (every call compressed) and its default error feedback (on); fp16/bf16 without.

--cluster HxR (root): builds H emulated hosts of R ranks (ringsync.cluster) per `--rates` link
rate, runs the above across them, and counts the bytes each host's link carries for one call
per compressor at `--wire-size` (16M), next to what a ring across h hosts must carry,
2(h-1)/h x payload. It reports fp16's speedup over none at 16 MB per rate, the wire-byte
ratio, and the crossover: the link rate below which fp16 beats none, interpolated (in log
rate) between the rates measured. Writes --out PREFIX.{txt,json,png} (each atomically).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
from pathlib import Path

# One BLAS thread per rank unless told otherwise (as benchlib.run_job gives its jobs), set before
# NumPy loads its BLAS: PowerSGD's matmuls would otherwise wake a BLAS thread per core in every
# rank, and those spin on after each call, starving ranks that wait in MPI (measured on 2 cores,
# 2 ranks: none's 1M synchronize() took 16 ms after a PowerSGD call instead of 0.15 ms).
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
for _var in BLAS_THREADS:
    os.environ.setdefault(_var, "1")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchlib as bl

DEFAULT_COMPRESSORS = "none,fp16,bf16,powersgd:1,powersgd:4"
DEFAULT_RATES = "1gbit,2gbit,3gbit,5gbit,10gbit"
PROG = "compression.py"


def parse_args(argv: list[str] | None = None):
    ap = bl.Parser(prog=PROG, description=__doc__.splitlines()[0])
    bl.add_size_range(ap, "1M", "64M", 4)
    ap.add_argument("--compressors", default=None,
                    help=f"comma-separated: none, fp16, bf16, powersgd:R ({DEFAULT_COMPRESSORS}; "
                         "bf16 left out, with a note, when ml_dtypes is missing and it was not asked for)")
    ap.add_argument("-r", "--rounds", type=bl.positive_int, default=10,
                    help="interleaved rounds, one call per compressor each; median and min over them (10)")
    ap.add_argument("-w", "--warmup", type=bl.positive_int, default=2, help="untimed calls per compressor first (2)")
    ap.add_argument("--seed", type=bl.nonnegative_int, default=0, help="of the random gradients (0)")
    ap.add_argument("--json", metavar="PATH", help="the results as JSON")
    ap.add_argument("--out", metavar="PREFIX", help="write PREFIX.txt, PREFIX.json and PREFIX.png")
    ap.add_argument("--cluster", metavar="HxR", help="across H emulated hosts of R ranks each (root)")
    ap.add_argument("--rates", default=None, help=f"with --cluster: link rates ({DEFAULT_RATES}); none: unshaped")
    ap.add_argument("--wire-size", type=bl.parse_size, default=None,
                    help="bytes of the one call per compressor whose link bytes are counted (16M); "
                         "needs several hosts (--cluster passes it to its launches)")
    ap.add_argument("--timeout", type=bl.positive_int, default=1800, help="with --cluster: seconds per launch (1800)")
    args = ap.parse_args(argv)
    try:
        args.sizes = bl.size_list(args.minbytes, args.maxbytes, args.stepfactor)
        odd = [s for s in args.sizes if s % 4]
        if odd:
            raise bl.CliError(f"sizes must be whole float32 gradients (multiples of 4 bytes), got {odd[0]}")
        args.compressors, args.skipped = parse_compressors(args.compressors)
        if args.cluster is not None:
            args.shape = bl.parse_shape(args.cluster)
            args.rate_list = bl.parse_rates(args.rates or DEFAULT_RATES)
            if args.wire_size is None:
                args.wire_size = 16 << 20
        elif args.rates is not None:
            raise bl.CliError("--rates needs --cluster")
        if args.wire_size is not None and args.wire_size % 4:
            raise bl.CliError(f"--wire-size must be a multiple of 4 bytes, got {args.wire_size}")
        bl.check_plot_possible(args.out + ".png" if args.out else None)
    except bl.CliError as exc:
        bl.fail(f"{PROG}: error: {exc}")
    return args


def parse_compressors(text: str | None) -> tuple[list[tuple[str, object]], list[str]]:
    """[(name, compressor)] in the order given, and the names left out (bf16 by default without
    ml_dtypes). PowerSGD gets start_iter=0: every timed call is a compressed one."""
    from ringsync.training.compression import PowerSGD, parse_compression

    names = [s.strip() for s in (text or DEFAULT_COMPRESSORS).split(",") if s.strip()]
    if not names:
        raise bl.CliError("--compressors: none given")
    if len(set(names)) != len(names):
        raise bl.CliError(f"--compressors: a name given twice in {text!r}")
    found, skipped = [], []
    for name in names:
        try:
            c = parse_compression(name)
        except ValueError as exc:
            raise bl.CliError(f"--compressors: {exc}") from None
        except ImportError as exc:
            if text is None:            # the default list: go on without bf16, and say so
                skipped.append(name)
                continue
            raise bl.CliError(f"--compressors: {name}: {str(exc).splitlines()[0]}") from None
        if isinstance(c, PowerSGD):
            c = dataclasses.replace(c, start_iter=0)
        found.append((name, c))
    return found, skipped


def matrix_shape(nbytes: int) -> tuple[int, int]:
    """n x m float32 values, n the largest divisor of nbytes/4 not above its square root."""
    count = nbytes // 4
    n = math.isqrt(count)
    while count % n:
        n -= 1
    return n, count // n


# --- the measurement, on every rank (mode a) --------------------------------------------------

class Setup:
    """One size: the gradients (a Params store of one matrix), one SGD, a DistributedOptimizer
    per compressor over it, and this rank's random gradients to copy in before each call."""

    def __init__(self, nbytes: int, compressors: list[tuple[str, object]], seed: int, rank: int) -> None:
        import ringsync as rs
        from ringsync.training.nn import Params

        self.shape = matrix_shape(nbytes)
        self.params = Params([("weight", self.shape)], np.float32)
        self.source = np.random.default_rng([seed, rank]).standard_normal(self.shape[0] * self.shape[1],
                                                                          dtype=np.float32)
        sgd = rs.SGD(self.params, lr=0.0)
        self.opts = {name: rs.DistributedOptimizer(sgd, compression=c) for name, c in compressors}

    def refill(self) -> None:
        np.copyto(self.params.flat_grad, self.source)

    def close(self) -> None:
        self.params.close()


def local_engine(compressor, shape: tuple[int, int], p: int):
    """A function that runs the engine synchronize() uses for `compressor` on `grad` (n x m,
    float32) with its all-reduce replaced by nothing, returning (compress s, decompress s):
    the time before the all-reduce(s) and between them, and the time after the last one."""
    from ringsync import ops
    from ringsync.training.compression import CastEngine, PowerSGD, PowerSGDEngine

    if compressor.name == "none":
        return None
    stamps: list[float] = []

    def reduce(flat, shapes, op) -> None:       # no communication: only when it was called
        stamps.append(time.perf_counter())

    if isinstance(compressor, PowerSGD):
        engine = PowerSGDEngine(compressor, [shape], np.dtype(np.float32))

        def run(grad: np.ndarray) -> tuple[float, float]:
            stamps.clear()
            t0 = time.perf_counter()
            engine.step_([grad], ops.Average, reduce)
            t1 = time.perf_counter()
            if len(stamps) < 2:                 # (nothing compressed: every value sent as it is)
                return t1 - t0, 0.0
            return stamps[-1] - t0, t1 - stamps[-1]
        return run
    cast = CastEngine(compressor, shape[0] * shape[1], np.dtype(np.float32))

    def run_cast(grad: np.ndarray) -> tuple[float, float]:
        stamps.clear()
        t0 = time.perf_counter()
        cast.reduce_bucket_(grad.reshape(-1), 0, (shape,), ops.Average, p, reduce)
        t1 = time.perf_counter()
        return stamps[0] - t0, t1 - stamps[0]
    return run_cast


def relative_error(setup: Setup, exact: np.ndarray) -> float:
    out = setup.params.flat_grad.astype(np.float64)
    return float(np.linalg.norm(out - exact) / max(np.linalg.norm(exact), 1e-300))


def measure_size(comm, args, nbytes: int) -> list[dict]:
    """Every compressor at one size: the timed synchronize() rounds, then the engines alone."""
    from mpi4py import MPI

    p, rank = comm.Get_size(), comm.Get_rank()
    setup = Setup(nbytes, args.compressors, args.seed, rank)
    try:
        exact = np.empty(setup.source.size, np.float64)
        comm.Allreduce(setup.source.astype(np.float64), exact, op=MPI.SUM)
        exact /= p
        errors = {}
        for name, opt in setup.opts.items():       # warm-up; the first call's error (cold start)
            for i in range(args.warmup):
                setup.refill()
                opt.synchronize()
                if i == 0:
                    errors[name] = comm.allreduce(relative_error(setup, exact), op=MPI.MAX)
        del exact
        times: dict[str, list[float]] = {name: [] for name in setup.opts}
        for _ in range(args.rounds):
            for name, opt in setup.opts.items():
                setup.refill()
                comm.Barrier()
                t0 = time.perf_counter()
                opt.synchronize()
                times[name].append(time.perf_counter() - t0)
        reports = {name: opt.compression_report() for name, opt in setup.opts.items()}
        # the engines alone, every rank at once (as in a step: the memory bandwidth is shared)
        engines = {name: local_engine(c, setup.shape, p) for name, c in args.compressors}
        local: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in engines}
        grad = setup.params.grad["weight"]
        for _ in range(max(1, args.warmup // 2)):
            for name, run in engines.items():
                if run is not None:
                    setup.refill()
                    run(grad)
        for _ in range(args.rounds):
            for name, run in engines.items():
                if run is None:
                    continue
                setup.refill()
                comm.Barrier()
                c, d = run(grad)
                local[name][0].append(c)
                local[name][1].append(d)
    finally:
        setup.close()
    rows = []
    for name, _ in args.compressors:
        t = bl.slowest(comm, times[name])
        comp = bl.slowest(comm, local[name][0]) if local[name][0] else None
        decomp = bl.slowest(comm, local[name][1]) if local[name][1] else None
        rep = reports[name]
        rows.append({"size": nbytes, "compressor": name, "signature": rep["compression"], "ranks": p,
                     "matrix": list(setup.shape), "time_us": float(np.median(t)) * 1e6,
                     "min_us": float(np.min(t)) * 1e6, "rounds_us": [round(float(x) * 1e6, 2) for x in t],
                     "payload_bytes": int(rep["compressed_step_bytes"]),
                     "uncompressed_bytes": int(rep["uncompressed_bytes_per_step"]),
                     "compression_ratio": rep["uncompressed_bytes_per_step"] / rep["compressed_step_bytes"],
                     "fp16_fallbacks": int(rep["fp16_fallbacks"]),
                     "compress_us": float(np.median(comp)) * 1e6 if comp is not None else None,
                     "decompress_us": float(np.median(decomp)) * 1e6 if decomp is not None else None,
                     "rel_error": errors[name]})
    none = next((r["time_us"] for r in rows if r["compressor"] == "none"), None)
    for r in rows:
        r["vs_none"] = none / r["time_us"] if none else None
    return rows


def wire_bytes(comm, args) -> list[dict]:
    """Bytes on each host's link (its eth0, as its network namespace counts them) for one
    synchronize() per compressor at --wire-size, next to 2(h-1)/h x payload."""
    from link_bytes import eth0_bytes
    from mpi4py import MPI

    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    leader = local.Get_rank() == 0
    hosts = comm.allreduce(1 if leader else 0)
    if hosts < 2:
        bl.fail(f"{PROG}: error: --wire-size needs ranks on several hosts (--cluster); found one", comm.Get_rank())
    setup = Setup(args.wire_size, args.compressors, args.seed, comm.Get_rank())
    rows = []
    try:
        for name, opt in setup.opts.items():
            setup.refill()
            opt.synchronize()                   # the handshake, the connections, the buffers
            setup.refill()
            comm.Barrier()
            before = eth0_bytes() if leader else (0, 0)
            comm.Barrier()
            opt.synchronize()
            comm.Barrier()
            after = eth0_bytes() if leader else (0, 0)
            moved = comm.gather((after[0] - before[0], after[1] - before[1]) if leader else None, root=0)
            payload = int(opt.compression_report()["compressed_step_bytes"])
            if comm.Get_rank() == 0:
                per_host = [m for m in moved if m is not None]
                expected = 2 * (hosts - 1) / hosts * payload
                rows.append({"size": args.wire_size, "compressor": name, "hosts": hosts, "payload_bytes": payload,
                             "expected": expected, "sent": [s for s, _ in per_host],
                             "received": [r for _, r in per_host]})
    finally:
        setup.close()
    return rows


def one_host(args, argv: list[str]) -> int:
    from mpi4py import MPI

    import ringsync as rs

    rs.init()
    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    meta = {"benchmark": "compression", "ranks": p, "rounds": args.rounds, "warmup": args.warmup,
            "compressors": [name for name, _ in args.compressors], "skipped": args.skipped,
            "signatures": {name: c.signature() for name, c in args.compressors},
            "command": " ".join([PROG, *argv]), "machine": bl.machine(), "ringsync_env": bl.ringsync_env(),
            "blas_threads": {v: os.environ.get(v) for v in BLAS_THREADS}}
    lines = header(meta)
    if rank == 0:
        print("\n".join(lines), flush=True)
    rows = []
    for nbytes in args.sizes:
        found = measure_size(comm, args, nbytes)
        rows += found
        if rank == 0:
            printed = [row_line(r) for r in found]
            lines += printed
            print("\n".join(printed), flush=True)
    wire = wire_bytes(comm, args) if args.wire_size is not None else []
    if rank == 0:
        if wire:
            printed = wire_lines(wire)
            lines += printed
            print("\n".join(printed), flush=True)
        doc = {"meta": meta, "results": rows, "wire": wire}
        if args.json:
            bl.write_json(args.json, doc)
        if args.out:
            bl.write_atomic(args.out + ".txt", "\n".join(lines) + "\n")
            bl.write_json(args.out + ".json", doc)
            bl.save_plot(args.out + ".png", lambda ax: draw_sizes(ax, rows, p))
    return 0


# --- text and plots --------------------------------------------------------------------------

def header(meta: dict) -> list[str]:
    m = meta["machine"]
    lines = [f"# {meta['command']}",
             (f"# gradient compression: {meta['ranks']} ranks, DistributedOptimizer.synchronize() (op average) "
              f"per compressor, {meta['rounds']} interleaved rounds (+{meta['warmup']} warm-up); medians, "
              "slowest rank"),
             f"# {m['cpu']}, {m['cores']} cores; {m['mpi']}",
             ("# gradients: one float32 matrix n x m per size (as square as it allows), random, copied in "
              "before each call; vs_none = none's time / this time"),
             *(f"#   {name}: {sig}" for name, sig in meta["signatures"].items())]
    if meta["skipped"]:
        lines.append(f"# left out: {', '.join(meta['skipped'])} (ml_dtypes is not installed: "
                     "pip install 'ringsync[bf16]')")
    lines.append(f"# {'size':>9} {'matrix':>10} {'compressor':>11} {'time(us)':>10} {'min(us)':>10} "
                 f"{'vs_none':>7} {'payload(B)':>11} {'ratio':>7} {'compress':>9} {'decompr':>9} {'err':>8}")
    return lines


def _us(x: float | None) -> str:
    return f"{x:>9.0f}" if x is not None else f"{'-':>9}"


def row_line(r: dict) -> str:
    vs = f"{r['vs_none']:>6.2f}x" if r["vs_none"] else f"{'-':>7}"
    shape = f"{r['matrix'][0]}x{r['matrix'][1]}"
    fb = f" ({r['fp16_fallbacks']} fallbacks)" if r["fp16_fallbacks"] else ""
    return (f"  {bl.human(r['size']):>9} {shape:>10} {r['compressor']:>11} {r['time_us']:>10.0f} {r['min_us']:>10.0f} "
            f"{vs} {r['payload_bytes']:>11} {r['compression_ratio']:>6.1f}x {_us(r['compress_us'])} "
            f"{_us(r['decompress_us'])} {r['rel_error']:>8.1e}{fb}")


def wire_lines(wire: list[dict]) -> list[str]:
    if not wire:
        return []
    lines = [(f"# bytes per host link, one synchronize() of {bl.human(wire[0]['size'])} per compressor, "
              f"{wire[0]['hosts']} hosts: expected 2(h-1)/h x payload each way; measured sent/received per host"),
             f"# {'compressor':>11} {'payload(B)':>11} {'expected(B)':>12} {'measured (x expected)':>30} {'vs none':>8}"]
    none = next((w for w in wire if w["compressor"] == "none"), None)
    for w in wire:
        ratios = " ".join(f"{s / w['expected']:.3f}/{r / w['expected']:.3f}" for s, r in zip(w["sent"], w["received"]))
        vs = f"{sum(w['sent']) / sum(none['sent']):>8.3f}" if none and sum(none["sent"]) else f"{'-':>8}"
        lines.append(f"  {w['compressor']:>11} {w['payload_bytes']:>11} {w['expected']:>12.0f} {ratios:>30} {vs}")
    return lines


def draw_sizes(ax, rows: list[dict], p: int) -> None:
    """synchronize() time against size per compressor; the engine's own work dashed."""
    for i, name in enumerate(dict.fromkeys(r["compressor"] for r in rows)):
        mine = [r for r in rows if r["compressor"] == name]
        color = f"C{i}"
        ax.plot([r["size"] for r in mine], [r["time_us"] / 1e3 for r in mine], marker="o", color=color, label=name)
        local = [r for r in mine if r["compress_us"] is not None]
        if local:
            ax.plot([r["size"] for r in local], [(r["compress_us"] + r["decompress_us"]) / 1e3 for r in local],
                    "--", color=color, linewidth=0.8, label=f"{name}: compress+decompress alone")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("float32 gradient bytes")
    ax.set_ylabel("ms per synchronize()")
    ax.set_title(f"gradient compression, {p} ranks (median of interleaved rounds)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)


# --- across emulated hosts (mode b) ------------------------------------------------------------

def crossover(points: list[tuple[float, float]]) -> dict:
    """Where a speedup s(rate) over none crosses 1 going up in rate, interpolated linearly in
    log(rate): {"rate_bps": the highest such crossing or None, "crossings": all of them, "note"}.
    `points`: (rate in bits/s, speedup), any order."""
    pts = sorted(points)
    crossings = []
    for (r1, s1), (r2, s2) in itertools.pairwise(pts):
        if s1 > 1 >= s2:
            x = math.log(r1) + (s1 - 1) / (s1 - s2) * (math.log(r2) - math.log(r1))
            crossings.append(math.exp(x))
    if crossings:
        note = f"beats none below {crossings[-1] / 1e9:.2f} Gbit/s (interpolated)"
        if len(crossings) > 1:
            note += f"; crosses {len(crossings)} times (noise?)"
    elif not pts:
        note = "no shaped rates measured"
    elif all(s > 1 for _, s in pts):
        note = f"beats none at every rate measured (up to {pts[-1][0] / 1e9:g} Gbit/s): crossover above"
    elif all(s <= 1 for _, s in pts):
        note = f"never beats none at the rates measured (down to {pts[0][0] / 1e9:g} Gbit/s): crossover below"
    else:
        note = "faster only at higher rates: no crossover of the expected kind"
    return {"rate_bps": crossings[-1] if crossings else None, "crossings": crossings, "note": note}


def summarize(configs: list[dict], hosts: int, wire_size: int) -> tuple[dict, list[str]]:
    """fp16 against none per rate at 16 MB (else the largest size), the wire ratio, the crossover."""
    sizes = sorted({r["size"] for c in configs for r in c["results"]})
    ref = wire_size if wire_size in sizes else (sizes[-1] if sizes else None)
    per_rate, lines = [], []
    names = sorted({r["compressor"] for c in configs for r in c["results"]} - {"none"})
    for c in configs:
        at = {r["compressor"]: r for r in c["results"] if r["size"] == ref}
        wire = {w["compressor"]: sum(w["sent"]) for w in c["wire"]}
        entry = {"rate_bps": c["rate_bps"], "size": ref,
                 "speedup": {n: at[n]["vs_none"] for n in names if n in at and at[n]["vs_none"]},
                 "wire_ratio": {n: wire[n] / wire["none"] for n in wire if n != "none" and wire.get("none")}}
        per_rate.append(entry)
    summary = {"size": ref, "per_rate": per_rate, "crossover": {}}
    shaped = [e for e in per_rate if e["rate_bps"]]
    for n in names:
        summary["crossover"][n] = crossover([(e["rate_bps"], e["speedup"][n]) for e in shaped if n in e["speedup"]])
    if ref is None:
        return summary, lines
    lines.append(f"## summary: {hosts} hosts, speedup over none at {bl.human(ref)} (none's time / its time) "
                 f"and link bytes / none's (one call of {bl.human(wire_size)})")
    lines.append(f"# {'rate':>10} " + " ".join(f"{n:>11}" for n in names)
                 + "   " + " ".join(f"{'bytes ' + n:>16}" for n in names))
    for e in per_rate:
        rate = f"{e['rate_bps'] / 1e9:g} Gbit/s" if e["rate_bps"] else "unshaped"
        speed = " ".join(f"{e['speedup'][n]:>10.2f}x" if n in e["speedup"] else f"{'-':>11}" for n in names)
        wire = " ".join(f"{e['wire_ratio'][n]:>16.3f}" if n in e["wire_ratio"] else f"{'-':>16}" for n in names)
        lines.append(f"  {rate:>10} {speed}   {wire}")
    for n in names:
        lines.append(f"# crossover, {n}: {summary['crossover'][n]['note']}")
    if not any(r["compressor"] == "none" for c in configs for r in c["results"]):
        lines.append("# (none was not measured: no speedups, no crossover; add none to --compressors)")
    return summary, lines


def draw_rates(ax, summary: dict, hosts: int, per_host: int) -> None:
    """Each compressor's speedup over none at the reference size against the link rate."""
    shaped = [e for e in summary["per_rate"] if e["rate_bps"]]
    names = sorted({n for e in shaped for n in e["speedup"]})
    for i, n in enumerate(names):
        pts = [(e["rate_bps"] / 1e9, e["speedup"][n]) for e in shaped if n in e["speedup"]]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=f"C{i}", label=n)
        cross = summary["crossover"][n]["rate_bps"]
        if cross:
            ax.axvline(cross / 1e9, color=f"C{i}", linestyle=":", linewidth=0.8)
            ax.text(cross / 1e9, 1.02, f" {n}: {cross / 1e9:.2f}", fontsize=7, color=f"C{i}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate (Gbit/s)")
    ax.set_ylabel("speedup over none (none's time / its time)")
    ax.set_title(f"synchronize() of {bl.human(summary['size'])} across {hosts}x{per_host} emulated hosts",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def child_argv(args, out: Path) -> list[str]:
    """This script's one-host mode, run across the cluster, writing `out`."""
    return [str(HERE / "compression.py"), "-b", str(args.minbytes), "-e", str(args.maxbytes),
            "-f", str(args.stepfactor), "--rounds", str(args.rounds), "--warmup", str(args.warmup),
            "--seed", str(args.seed), "--compressors", ",".join(name for name, _ in args.compressors),
            "--wire-size", str(args.wire_size), "--json", str(out)]


def cluster_main(args, argv: list[str]) -> int:
    import json

    from ringsync.cluster import Cluster, ClusterError, ClusterSpec, launch

    hosts, per_host = args.shape
    configs, text = [], [f"# {' '.join([PROG, *argv])}"]
    with bl.cluster_jobs(PROG, "ringsync-compression-") as (mpi, folder):
        for rate in args.rate_list:
            tag = f"{hosts}x{per_host}-{rate or 'unshaped'}"
            with Cluster.up(ClusterSpec([per_host] * hosts, rate_bps=rate)) as cluster:
                out = folder / f"{tag}.json"
                done = launch.run(cluster, [sys.executable, *child_argv(args, out)], timeout=args.timeout)
                if done.returncode != 0 or not out.exists():
                    raise ClusterError(f"{PROG} across {tag} failed ({done.returncode}): "
                                       f"{done.stderr.strip()[-500:]}")
                doc = json.loads(out.read_text())
                config = {"mpi": mpi, "hosts": hosts, "ranks_per_host": per_host, "rate_bps": rate,
                          "burst_bytes": cluster.spec.burst_bytes, "latency_ms": cluster.spec.latency_ms,
                          "mtu": cluster.spec.mtu, "meta": doc["meta"], "results": doc["results"],
                          "wire": doc["wire"]}
            configs.append(config)
            block = config_lines(config)
            text += ["", *block]
            print("\n".join(block), flush=True)
    summary, lines = summarize(configs, hosts, args.wire_size)
    text += ["", *lines]
    print("\n".join(lines), flush=True)
    doc = {"benchmark": "compression", "cluster": f"{hosts}x{per_host}", "configs": configs, "summary": summary}
    if args.json:
        bl.write_json(args.json, doc)
    if args.out:
        bl.write_atomic(args.out + ".txt", "\n".join(text) + "\n")
        bl.write_json(args.out + ".json", doc)
        bl.save_plot(args.out + ".png", lambda ax: draw_rates(ax, summary, hosts, per_host))
    return 0


def config_lines(c: dict) -> list[str]:
    rate = c["rate_bps"]
    lines = [(f"## {c['hosts']} hosts x {c['ranks_per_host']} ranks, "
              f"{'%g Gbit/s' % (rate / 1e9) if rate else 'unshaped'} links ({c['mpi']}), "
              f"tbf burst {c['burst_bytes']} B, queue {c['latency_ms']} ms, mtu {c['mtu']}")]
    lines += [line for line in header(c["meta"]) if not line.startswith(f"# {PROG}")]
    lines += [row_line(r) for r in c["results"]]
    lines += wire_lines(c["wire"])
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.cluster is not None:
        return cluster_main(args, argv)
    return one_host(args, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Overlap of backward with communication: step time with DistributedOptimizer(overlap=True) against the same buckets after backward.

    mpiexec -n 2 python benchmarks/overlap.py --out results/overlap
    sudo python benchmarks/overlap.py --cluster 2x1 --rates 1gbit --out results/overlap_2x1

What is timed, per model, in one launch: two copies of the same MLP (same seed, same widths,
same gradient buckets), each with its own DistributedOptimizer(SGD(params, lr=0)):

  on    overlap=True: backward starts each bucket's all-reduce on the communication thread as
        soon as the bucket's last gradient is written; synchronize() waits for what is left
  off   overlap=False, buckets="backward": the same buckets, reduced one after another after
        backward (the same bits; the baseline)
  alone off's synchronize() by itself, after a barrier, no compute: the all-reduce alone

Each rank trains on one synthetic batch of its own (standard normal, drawn once). A step is
forward (with the loss), backward, synchronize(), update, each timed apart (time.perf_counter),
after an untimed barrier, the ranks starting together. The three run interleaved: rounds of
--block steps (or calls) of each, the order rotating every round, --steps of each in all after
--warmup untimed ones, so drift in the machine's load hits all alike. Every figure is the
slowest rank's per step (the largest over the ranks), then the median over the steps; the
step times also with their interquartile range. The table, per model:

  step_off, step_on  a whole step, overlap off / on: median [25th-75th percentile], ms
  backward           backward alone, overlap off (no communication running), ms
  allreduce_alone    the all-reduce alone, ms (the same buckets as in a step)
  exposed_on         synchronize() with overlap on: the wait for the buckets still in flight
                     after backward, ms
  comm_on            the communication thread's busy time per step with overlap on, ms (the
                     all-reduce while competing with backward; ringsync.timing's overlap block)
  hidden             the part of comm_on that ran before backward ended (ringsync.timing's
                     hidden_fraction: hidden / (hidden + exposed), over all on steps and ranks)
  efficiency         (step_off - step_on) / min(backward, allreduce_alone): the time overlap
                     saved, over the most it could save; the smaller term is marked *

Models (--models): "sized", an MLP whose gradient all-reduce takes about as long as its
backward on the setup at hand, and "digits", ringsync-train's default model (64-128-64-10,
17,226 float32 parameters) at its default batch (32 per rank), on synthetic data. For an MLP
both backward (4 x batch x parameters flops) and the all-reduce (4 x parameters bytes) grow
with the parameter count, so their ratio does not depend on the widths but on the batch per
rank, the cores' flop rate and the link: --batch auto (the default) picks the sized model's
batch per launch, from the all-reduce alone and backward measured at up to three batches
(untimed, shown and recorded in the JSON); --batch N fixes it. --hidden sets the widths
(default 2048,2048,2048 on 1024 features: 10.5 M parameters, 40 MiB of float32 gradients, big
enough that per-call overheads do not matter, small enough for 40 steps of each at 1 Gbit/s in
a minute or two).

Buckets: overlap's buckets run from the last parameter to the first, the first one up to
RINGSYNC_FIRST_BUCKET_BYTES (1 MiB), the others up to the fusion threshold. The library's
64 MiB would put all of the sized model's 40 MiB in one bucket, complete only when backward
ends: nothing to overlap. --fusion-mb layer (the default) sets the threshold to the model's
largest layer (its weight and bias, which a bucket never splits) instead: a bucket per layer
(sized: 4, the first the 80 KB output layer; digits: 3). --fusion-mb env takes
RINGSYNC_FUSION_THRESHOLD (64 MiB unset: what ringsync-train --overlap does; digits is then
one bucket, nothing to overlap); a number is MiB, as ringsync-train's --fusion-mb.

--cluster HxR (root): builds H emulated hosts of R ranks (ringsync.cluster) per --rates link
rate (1gbit), runs the above across them. Writes --out PREFIX.{txt,json,png} (each atomically).
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

# One BLAS thread per rank unless told otherwise (as benchlib.run_job gives its jobs), set before
# NumPy loads its BLAS: backward's matmuls would otherwise wake a BLAS thread per core in every
# rank, and spinning BLAS threads starve the communication thread and ranks waiting in MPI.
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
for _var in BLAS_THREADS:
    os.environ.setdefault(_var, "1")

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import benchlib as bl

PROG = "overlap.py"
MODELS = ("sized", "digits")
DIGITS_SIZES = (64, 128, 64, 10)      # ringsync-train's default model (--dataset digits)
DIGITS_BATCH = 32                     # ringsync-train's default --batch-size
DEFAULT_RATES = "1gbit"
CONFIGS = ("off", "on", "alone")
PHASES = ("forward", "backward", "sync", "update", "step")
MAX_BATCH = 8192
FEW_STEPS = 30                        # below this, a smoke run: said so in the header


def parse_args(argv: list[str] | None = None):
    ap = bl.Parser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {','.join(MODELS)} (both)")
    ap.add_argument("--hidden", default="2048,2048,2048", help="the sized model's hidden widths (2048,2048,2048)")
    ap.add_argument("--features", type=bl.positive_int, default=1024, help="the sized model's inputs (1024)")
    ap.add_argument("--classes", type=bl.positive_int, default=10, help="the sized model's outputs (10)")
    ap.add_argument("--batch", default="auto",
                    help="the sized model's samples per rank: a number, or auto (backward about as long "
                         "as the all-reduce alone, measured in each launch; the default)")
    ap.add_argument("--digits-batch", type=bl.positive_int, default=DIGITS_BATCH,
                    help=f"the digits model's samples per rank ({DIGITS_BATCH}, ringsync-train's default)")
    ap.add_argument("--fusion-mb", default="layer",
                    help="the fusion threshold (the buckets' cap): layer (the model's largest layer: "
                         "a bucket per layer; the default), env (RINGSYNC_FUSION_THRESHOLD, 64 MiB "
                         "unset), or MiB")
    ap.add_argument("--steps", type=bl.positive_int, default=40, help="timed steps per configuration (40)")
    ap.add_argument("--warmup", type=bl.nonnegative_int, default=5, help="untimed steps per configuration first (5)")
    ap.add_argument("--block", type=bl.positive_int, default=5,
                    help="steps of one configuration in a row, before the next one's (5)")
    ap.add_argument("--seed", type=bl.nonnegative_int, default=0, help="of the weights and the batches (0)")
    ap.add_argument("--json", metavar="PATH", help="the results as JSON")
    ap.add_argument("--out", metavar="PREFIX", help="write PREFIX.txt, PREFIX.json and PREFIX.png")
    ap.add_argument("--cluster", metavar="HxR", help="across H emulated hosts of R ranks each (root)")
    ap.add_argument("--rates", default=None, help=f"with --cluster: link rates ({DEFAULT_RATES}); none: unshaped")
    ap.add_argument("--timeout", type=bl.positive_int, default=1800, help="with --cluster: seconds per launch (1800)")
    args = ap.parse_args(argv)
    try:
        args.model_list = parse_models(args.models)
        args.hidden_list = parse_widths(args.hidden)
        args.batch_value = parse_batch(args.batch)
        args.fusion = parse_fusion(args.fusion_mb)
        if args.cluster is not None:
            args.shape = bl.parse_shape(args.cluster)
            args.rate_list = bl.parse_rates(args.rates or DEFAULT_RATES)
        elif args.rates is not None:
            raise bl.CliError("--rates needs --cluster")
        bl.check_plot_possible(args.out + ".png" if args.out else None)
    except bl.CliError as exc:
        bl.fail(f"{PROG}: error: {exc}")
    return args


def parse_models(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in MODELS]
    if bad or not names:
        raise bl.CliError(f"--models: unknown {bad[0] if bad else text!r}; choose from {','.join(MODELS)}")
    if len(set(names)) != len(names):
        raise bl.CliError(f"--models: {text!r} names one twice")
    return names


def parse_widths(text: str) -> list[int]:
    try:
        widths = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise bl.CliError(f"--hidden: not comma-separated widths: {text!r} (e.g. 2048,2048,2048)") from None
    if not widths or min(widths) < 1:
        raise bl.CliError(f"--hidden: widths must be whole numbers >= 1, got {text!r}")
    return widths


def parse_batch(text: str) -> int | None:
    """None for auto, else the batch."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise bl.CliError(f"--batch: a whole number or auto, got {text!r}") from None
    if not 1 <= value <= MAX_BATCH:
        raise bl.CliError(f"--batch: must be in 1..{MAX_BATCH}, got {value}")
    return value


def parse_fusion(text: str) -> str | int:
    """'layer', 'env', or bytes."""
    t = text.strip().lower()
    if t in ("layer", "env"):
        return t
    try:
        mib = float(t)
    except ValueError:
        raise bl.CliError(f"--fusion-mb: layer, env or a number of MiB, got {text!r}") from None
    if not (mib >= 0 and np.isfinite(mib)):
        raise bl.CliError(f"--fusion-mb: must be a finite number >= 0, got {text!r}")
    return int(mib * 2**20)


def model_sizes(args, model: str) -> list[int]:
    if model == "digits":
        return list(DIGITS_SIZES)
    return [args.features, *args.hidden_list, args.classes]


def param_count(sizes: list[int]) -> int:
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


def fusion_bytes_for(fusion: str | int, sizes: list[int]) -> int | None:
    """The fusion_bytes= both optimizers get (None: RINGSYNC_FUSION_THRESHOLD's)."""
    if fusion == "env":
        return None
    if fusion == "layer":       # the largest layer's weight and bias (float32): a bucket each
        return max(a * b + b for a, b in itertools.pairwise(sizes)) * 4
    return int(fusion)


def quartiles(values) -> tuple[float, float, float]:
    q1, med, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(q1), float(med), float(q3)


def efficiency(step_off: float, step_on: float, backward: float, alone: float) -> float | None:
    """(step_off - step_on) / min(backward, alone): the time saved over the most overlap can save."""
    bound = min(backward, alone)
    return (step_off - step_on) / bound if bound > 0 else None


def summarize(slow: dict[str, dict[str, np.ndarray]], comm_on: np.ndarray | None,
              hidden_fraction: float | None) -> dict:
    """The table's figures (seconds) from the slowest rank's per-step times: slow[config][phase]."""
    out: dict = {}
    for config in ("off", "on"):
        for phase in PHASES:
            q1, med, q3 = quartiles(slow[config][phase])
            out[f"{phase}_{config}_s"] = med
            out[f"{phase}_{config}_iqr_s"] = [q1, q3]
    q1, med, q3 = quartiles(slow["alone"]["sync"])
    out["allreduce_alone_s"], out["allreduce_alone_iqr_s"] = med, [q1, q3]
    out["backward_s"] = out["backward_off_s"]
    out["exposed_on_s"] = out["sync_on_s"]
    out["comm_on_s"] = float(np.median(comm_on)) if comm_on is not None and comm_on.size else None
    out["hidden_fraction"] = hidden_fraction
    # the exposed wait against the all-reduce alone: 1 - exposed / alone (a second view of what was hidden)
    out["hidden_vs_alone"] = 1 - out["exposed_on_s"] / med if med > 0 else None
    out["efficiency"] = efficiency(out["step_off_s"], out["step_on_s"], out["backward_s"], med)
    out["bound"] = "backward" if out["backward_s"] <= med else "allreduce_alone"
    out["saved_s"] = out["step_off_s"] - out["step_on_s"]
    return out


# --- the measurement, on every rank (one launch) ---------------------------------------------

class Pair:
    """One model twice (same seed: the same weights), overlap on and off, and this rank's batch."""

    def __init__(self, sizes: list[int], fusion_bytes: int | None, seed: int) -> None:
        import ringsync as rs
        from ringsync.training.nn import MLP

        # The gradients in the node's shared memory, as ringsync-train keeps them (--sync bsp,
        # no compression): the all-reduce on one node reads the other ranks' in place.
        self.models, self.opts = {}, {}
        for config, overlap in (("on", True), ("off", False)):
            model = MLP(sizes, seed=seed, shared_grads=True)
            self.models[config] = model
            self.opts[config] = rs.DistributedOptimizer(rs.SGD(model.params, lr=0.0), fusion_bytes=fusion_bytes,
                                                        overlap=overlap, buckets="backward")
        plans = {c: opt.bucket_plan() for c, opt in self.opts.items()}
        if plans["on"] != plans["off"]:
            raise RuntimeError(f"overlap on and off made different buckets: {plans}")
        self.plan = plans["on"]
        self.sizes = sizes
        self.x = self.labels = None

    def set_batch(self, batch: int, seed: int, rank: int) -> None:
        rng = np.random.default_rng([seed, rank, batch])
        self.x = rng.standard_normal((batch, self.sizes[0]), dtype=np.float32)
        self.labels = rng.integers(0, self.sizes[-1], size=batch)

    def step(self, config: str) -> tuple[float, float, float, float, float]:
        """One training step: (forward, backward, sync, update, step) seconds on this rank."""
        from ringsync import timing
        from ringsync.training.nn import softmax_cross_entropy

        model, opt = self.models[config], self.opts[config]
        t0 = time.perf_counter()
        logits = model.forward(self.x)
        _, dlogits = softmax_cross_entropy(logits, self.labels)
        t1 = time.perf_counter()
        model.backward(dlogits)             # (on: launches the buckets as it goes)
        t2 = time.perf_counter()
        timing.compute_done()               # the communication thread's time after this: exposed
        opt.synchronize()                   # (on: waits for the buckets still in flight)
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0

    def alone(self) -> float:
        """off's all-reduce by itself (after a barrier, by the caller)."""
        t0 = time.perf_counter()
        self.opts["off"].synchronize()
        return time.perf_counter() - t0

    def close(self) -> None:
        for model in self.models.values():
            model.params.close()


def calibrate(comm, pair: Pair, seed: int, reps: int = 3) -> tuple[int, dict]:
    """The batch whose backward (overlap off) takes about as long as the all-reduce alone: the
    all-reduce measured once, backward at a probe batch of 64, then at the batch that suggests
    (backward grows about linearly with the batch, less so for small ones), up to three
    times, until the suggestion moves by 10% or less. The same batch on every rank."""
    rank = comm.Get_rank()
    model = pair.models["off"]
    from ringsync.training.nn import softmax_cross_entropy

    pair.alone()                                    # (first call: connections, buffers)
    times = []
    for _ in range(reps):
        comm.Barrier()
        times.append(pair.alone())
    alone = float(np.median(bl.slowest(comm, times)))
    batch, tried = 64, []
    for _ in range(3):
        pair.set_batch(batch, seed, rank)
        times = []
        for _ in range(reps + 1):
            logits = model.forward(pair.x)
            _, dlogits = softmax_cross_entropy(logits, pair.labels)
            comm.Barrier()
            t0 = time.perf_counter()
            model.backward(dlogits)
            times.append(time.perf_counter() - t0)
        backward = float(np.median(bl.slowest(comm, times[1:])))
        tried.append({"batch": batch, "backward_s": backward})
        suggested = int(np.clip(round(batch * alone / backward), 1, MAX_BATCH)) if backward > 0 else MAX_BATCH
        close = abs(suggested - batch) <= 0.1 * batch
        batch = suggested
        if close:
            break
    return batch, {"allreduce_alone_s": alone, "tried": tried, "batch": batch, "capped": batch == MAX_BATCH}


def measure_model(comm, args, model: str) -> dict:
    """Every configuration of one model, interleaved; the row of the table (and its steps)."""
    from ringsync import timing
    from ringsync.context import world

    rank, p = comm.Get_rank(), comm.Get_size()
    sizes = model_sizes(args, model)
    fusion_bytes = fusion_bytes_for(args.fusion, sizes)
    pair = Pair(sizes, fusion_bytes, args.seed)
    try:
        calibration = None
        if model == "sized" and args.batch_value is None:
            batch, calibration = calibrate(comm, pair, args.seed)
        else:
            batch = args.digits_batch if model == "digits" else args.batch_value
        pair.set_batch(batch, args.seed, rank)
        for config in ("off", "on"):
            for _ in range(args.warmup):
                comm.Barrier()
                pair.step(config)
        for _ in range(args.warmup):
            comm.Barrier()
            pair.alone()
        # timing's recorder around every timed step (both configurations alike, so that its
        # probes cost both the same): its overlap block gives the communication thread's time
        # per step, hidden (before compute_done) and exposed. every=0: no gathering until finish().
        timing.start("passive", every=0, timeline="")
        mine: dict[str, list[tuple]] = {c: [] for c in CONFIGS}
        labels: list[str] = []                    # the configuration of each recorded step
        rounds = -(-args.steps // args.block)
        for r in range(rounds):
            n = min(args.block, args.steps - r * args.block)
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            for config in order:
                for _ in range(n):
                    comm.Barrier()
                    if config == "alone":
                        mine["alone"].append((0.0, 0.0, pair.alone(), 0.0, 0.0))
                        continue
                    timing.begin_step()
                    mine[config].append(pair.step(config))
                    timing.end_step()
                    labels.append(config)
        report = timing.finish()
        slow = {c: dict(zip(PHASES, bl.slowest(comm, np.array(mine[c]).T))) for c in CONFIGS}
        comm_on, hidden = None, None
        if report is not None and "overlap" in report:
            on = [k for k, c in enumerate(labels) if c == "on"]
            per_step = report["overlap"]["per_step"]
            comm_s = np.asarray(per_step["comm_s"], dtype=np.float64)[:, on]
            hidden_s = np.asarray(per_step["hidden_s"], dtype=np.float64)[:, on]
            comm_on = comm_s.max(axis=0)
            hidden = float(hidden_s.sum() / comm_s.sum()) if comm_s.sum() > 0 else None
        figures = summarize(slow, comm_on, hidden)
        opt = pair.opts["on"]
        itemsize = pair.models["on"].params.flat_grad.dtype.itemsize
        settings = world().settings
        row = {"model": model, "sizes": sizes, "params": param_count(sizes), "ranks": p, "batch_per_rank": batch,
               "grad_bytes": int(pair.models["on"].params.flat_grad.nbytes),
               "buckets": len(pair.plan), "bucket_bytes": [(hi - lo) * itemsize for lo, hi in pair.plan],
               "first_bucket_bytes": settings.first_bucket_bytes,
               "fusion_threshold": fusion_bytes if fusion_bytes is not None else settings.fusion_threshold,
               "fusion_mb_arg": args.fusion_mb, "overlap_on": opt.overlap, "buckets_off": pair.opts["off"].buckets,
               "steps": args.steps, "warmup": args.warmup, "block": args.block, "calibration": calibration,
               **figures,
               "per_step_ms": {c: {ph: [round(float(v) * 1e3, 4) for v in slow[c][ph]] for ph in PHASES}
                               for c in ("off", "on")},
               "allreduce_alone_ms": [round(float(v) * 1e3, 4) for v in slow["alone"]["sync"]],
               "comm_on_ms": [round(float(v) * 1e3, 4) for v in comm_on] if comm_on is not None else None}
    finally:
        pair.close()
    return row


def one_host(args, argv: list[str]) -> int:
    from mpi4py import MPI

    import ringsync as rs
    from ringsync.context import world

    try:
        rs.init()
    except Exception as exc:  # noqa: BLE001 - ValueError for a bad RINGSYNC_*; reported in one line
        bl.fail(f"{PROG}: error: ringsync.init(): {exc}")
    comm = MPI.COMM_WORLD
    p, rank = comm.Get_size(), comm.Get_rank()
    if p < 2:
        bl.fail(f"{PROG}: error: needs at least 2 ranks (mpiexec -n 2 python benchmarks/{PROG}), got 1", rank)
    settings = world().settings
    meta = {"benchmark": "overlap", "ranks": p, "steps": args.steps, "warmup": args.warmup, "block": args.block,
            "models": args.model_list, "seed": args.seed, "command": " ".join([PROG, *argv]),
            "machine": bl.machine(), "ringsync_env": bl.ringsync_env(),
            "settings": {"first_bucket_bytes": settings.first_bucket_bytes,
                         "fusion_threshold_env": settings.fusion_threshold, "transport": settings.transport,
                         "allreduce": settings.allreduce},
            "blas_threads": {v: os.environ.get(v) for v in BLAS_THREADS}}
    lines = header(meta)
    if rank == 0:
        print("\n".join(lines), flush=True)
    rows = []
    for model in args.model_list:
        row = measure_model(comm, args, model)
        rows.append(row)
        if rank == 0:
            printed = model_lines(row)
            lines += printed
            print("\n".join(printed), flush=True)
    table = table_lines(rows)
    if rank == 0:
        lines += table
        print("\n".join(table), flush=True)
        doc = {"meta": meta, "results": rows}
        if args.json:
            bl.write_json(args.json, doc)
        if args.out:
            bl.write_atomic(args.out + ".txt", "\n".join(lines) + "\n")
            bl.write_json(args.out + ".json", doc)
            bl.save_plot(args.out + ".png", lambda ax: draw(ax, rows, f"{p} ranks, one host"))
    rs.shutdown()
    return 0


# --- text and plots --------------------------------------------------------------------------

def header(meta: dict) -> list[str]:
    m, s = meta["machine"], meta["settings"]
    lines = [f"# {meta['command']}",
             (f"# overlap of backward with communication: {meta['ranks']} ranks; DistributedOptimizer(SGD(lr=0)) "
              "overlap=True (on) against overlap=False, buckets='backward' (off: the same buckets after backward) "
              "and off's all-reduce alone"),
             (f"# {meta['steps']} timed steps each (+{meta['warmup']} warm-up), interleaved in blocks of "
              f"{meta['block']}; per step the slowest rank's time; median [25th-75th percentile]"),
             f"# {m['cpu']}, {m['cores']} cores; {m['mpi']}",
             (f"# RINGSYNC_FIRST_BUCKET_BYTES {s['first_bucket_bytes']}, RINGSYNC_FUSION_THRESHOLD "
              f"{s['fusion_threshold_env']} (the buckets' cap: per model below), transport {s['transport']}, "
              f"allreduce {s['allreduce']}")]
    if meta["steps"] < FEW_STEPS:
        lines.append(f"# ({meta['steps']} steps: a smoke run, not a measurement; use --steps {FEW_STEPS} or more)")
    return lines


def _ms(x: float | None, width: int = 9) -> str:
    return f"{x * 1e3:>{width}.3f}" if x is not None else f"{'-':>{width}}"


def _iqr(r: dict, key: str) -> str:
    lo, hi = r[f"{key}_iqr_s"]
    return f"{r[f'{key}_s'] * 1e3:.3f} [{lo * 1e3:.3f}-{hi * 1e3:.3f}]"


def _pct(x: float | None) -> str:
    return f"{100 * x:.0f}%" if x is not None else "-"


def model_lines(r: dict) -> list[str]:
    """One model's configuration and its phases, off and on."""
    cal = r["calibration"]
    how = ""
    if cal is not None:
        tried = ", ".join(f"{t['batch']}: {t['backward_s'] * 1e3:.1f} ms" for t in cal["tried"])
        how = (f" (auto: all-reduce alone {cal['allreduce_alone_s'] * 1e3:.1f} ms; backward at batch {tried}"
               f"{'; capped' if cal['capped'] else ''})")
    buckets = ", ".join(bl.human(b) if b >= 1024 else str(b) for b in r["bucket_bytes"])
    lines = [(f"## {r['model']}: MLP {'-'.join(map(str, r['sizes']))}, {r['params']} parameters "
              f"({r['grad_bytes'] / 2**20:.2f} MiB float32 gradients), batch {r['batch_per_rank']}/rank{how}"),
             (f"#   {r['buckets']} buckets, last layer first: {buckets} B (first bucket cap {r['first_bucket_bytes']}, "
              f"fusion threshold {r['fusion_threshold']} = --fusion-mb {r['fusion_mb_arg']})"),
             f"#   {'config':>6} {'step(ms) [IQR]':>30} {'forward':>9} {'backward':>9} {'sync':>9} {'update':>9}"]
    for config in ("off", "on"):
        lines.append(f"    {config:>6} {_iqr(r, 'step_' + config):>30} {_ms(r[f'forward_{config}_s'])} "
                     f"{_ms(r[f'backward_{config}_s'])} {_ms(r[f'sync_{config}_s'])} {_ms(r[f'update_{config}_s'])}")
    lines.append(f"    {'alone':>6} {_iqr(r, 'allreduce_alone'):>30}   (the all-reduce by itself, after a barrier)")
    return lines


def table_lines(rows: list[dict], rate_key: bool = False) -> list[str]:
    """The summary: a row per model (and link rate)."""
    lines = [("# summary, ms (slowest rank per step, medians); efficiency = (step_off - step_on) / "
              "min(backward, allreduce_alone), the smaller marked *"),
             (f"# {'rate':>8} " if rate_key else "# ") + f"{'model':>7} {'step_off [IQR]':>28} {'step_on [IQR]':>28} "
             f"{'backward':>10} {'allreduce_alone':>16} {'exposed_on':>10} {'comm_on':>9} {'hidden':>6} {'efficiency':>10}"]
    for r in rows:
        star_b = "*" if r["bound"] == "backward" else " "
        star_a = "*" if r["bound"] == "allreduce_alone" else " "
        rate = ""
        if rate_key:
            rate = f"{r['rate_bps'] / 1e9:g}gbit" if r.get("rate_bps") else "unshaped"
            rate = f"{rate:>8} "
        lines.append(f"  {rate}{r['model']:>7} {_iqr(r, 'step_off'):>28} {_iqr(r, 'step_on'):>28} "
                     f"{_ms(r['backward_s'])}{star_b} {_ms(r['allreduce_alone_s'], 15)}{star_a} "
                     f"{_ms(r['exposed_on_s'], 10)} {_ms(r['comm_on_s'])} {_pct(r['hidden_fraction']):>6} "
                     f"{_pct(r['efficiency']):>10}")
    return lines


def draw(ax, rows: list[dict], where: str) -> None:
    """Per model (and rate): the step off and on (with their IQR), backward, the all-reduce
    alone and the exposed wait, each over the step time with overlap off (medians)."""
    bars = (("step_off", "step, overlap off", "C7"), ("step_on", "step, overlap on", "C0"),
            ("backward", "backward (off)", "C1"), ("allreduce_alone", "all-reduce alone", "C3"),
            ("exposed_on", "exposed wait (on)", "C2"))
    width, top = 0.16, 1.0
    for i, r in enumerate(rows):
        base = r["step_off_s"]
        for j, (key, label, color) in enumerate(bars):
            x, h = i + (j - 2) * width, r[f"{key}_s"] / base
            err = None
            if f"{key}_iqr_s" in r:
                lo, hi = (v / base for v in r[f"{key}_iqr_s"])
                err = [[max(h - lo, 0.0)], [max(hi - h, 0.0)]]
                top = max(top, hi)
            ax.bar(x, h, width=width, color=color, yerr=err, capsize=2, label=label if i == 0 else None)
            top = max(top, h)
    names = []
    for i, r in enumerate(rows):
        ax.text(i, top * 1.04, f"efficiency {_pct(r['efficiency'])}", ha="center", fontsize=7)
        names.append(r["model"] + (f"\n{r['rate_bps'] / 1e9:g} Gbit/s" if r.get("rate_bps") else ""))
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("time / step time with overlap off (medians)")
    ax.set_title(f"overlap of backward with the gradient all-reduce, {where} (whiskers: IQR)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))


# --- across emulated hosts ------------------------------------------------------------------------

def child_argv(args, out: Path) -> list[str]:
    """This script's one-launch mode, run across the cluster, writing `out`."""
    return [str(HERE / PROG), "--models", ",".join(args.model_list), "--hidden", ",".join(map(str, args.hidden_list)),
            "--features", str(args.features), "--classes", str(args.classes), "--batch", args.batch,
            "--digits-batch", str(args.digits_batch), "--fusion-mb", args.fusion_mb, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--block", str(args.block), "--seed", str(args.seed), "--json", str(out)]


def cluster_main(args, argv: list[str]) -> int:
    import json

    from ringsync.cluster import Cluster, ClusterError, ClusterSpec, launch

    hosts, per_host = args.shape
    configs, text, rows = [], [f"# {' '.join([PROG, *argv])}"], []
    with bl.cluster_jobs(PROG, "ringsync-overlap-") as (mpi, folder):
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
                          "mtu": cluster.spec.mtu, "meta": doc["meta"], "results": doc["results"]}
            configs.append(config)
            rows += [{**r, "rate_bps": rate} for r in doc["results"]]
            block = config_lines(config)
            text += ["", *block]
            print("\n".join(block), flush=True)
    if len(configs) > 1:
        summary = table_lines(rows, rate_key=True)
        text += ["", *summary]
        print("\n".join(summary), flush=True)
    doc = {"benchmark": "overlap", "cluster": f"{hosts}x{per_host}", "configs": configs}
    if args.json:
        bl.write_json(args.json, doc)
    if args.out:
        bl.write_atomic(args.out + ".txt", "\n".join(text) + "\n")
        bl.write_json(args.out + ".json", doc)
        bl.save_plot(args.out + ".png", lambda ax: draw(ax, rows, f"{hosts}x{per_host} emulated hosts"))
    return 0


def config_lines(c: dict) -> list[str]:
    rate = c["rate_bps"]
    lines = [(f"## {c['hosts']} hosts x {c['ranks_per_host']} ranks, "
              f"{'%g Gbit/s' % (rate / 1e9) if rate else 'unshaped'} links ({c['mpi']}), "
              f"tbf burst {c['burst_bytes']} B, queue {c['latency_ms']} ms, mtu {c['mtu']}")]
    lines += [line for line in header(c["meta"]) if not line.startswith(f"# {PROG}")]
    for r in c["results"]:
        lines += model_lines(r)
    lines += table_lines(c["results"])
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.cluster is not None:
        return cluster_main(args, argv)
    return one_host(args, argv)


if __name__ == "__main__":
    sys.exit(main())

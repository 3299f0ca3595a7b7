"""Weak scaling of the trainer: samples/s on 1, 2 and 4 ranks with a fixed per-rank batch.

    python benchmarks/scaling.py --ranks 1,2,4 --batch-size 256 --steps 60 --json out.json --plot out.png

Run it directly (not under mpiexec): it launches `mpiexec -n K python -m ringsync.training.train`
for each K, round-robin over K for --rounds rounds (drift hits every K alike), and reads
samples_per_second from each run's report. Efficiency(K) = rate(K) / (K * rate(1)): 1.0
is perfect weak scaling. Each rank gets one BLAS thread (OMP_NUM_THREADS=1 unless set).
On a machine with fewer cores than ranks the ranks share cores,
and efficiency says more about the machine than about ringsync; the output says so.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl


def parse_args(argv: list[str] | None = None):
    ap = bl.Parser(prog="scaling.py", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,4", help="rank counts, comma-separated (1,2,4)")
    ap.add_argument("--batch-size", type=bl.positive_int, default=256, help="samples per rank per step (256)")
    ap.add_argument("--steps", type=bl.positive_int, default=60, help="training steps per run (60)")
    ap.add_argument("--rounds", type=bl.positive_int, default=3, help="interleaved rounds; median over them (3)")
    ap.add_argument("--hidden", default="512,512", help="MLP hidden widths (512,512)")
    ap.add_argument("--features", type=bl.positive_int, default=256, help="synthetic features (256)")
    ap.add_argument("--mpiexec", default=bl.default_mpiexec(), help="launcher command (the venv's mpiexec)")
    ap.add_argument("--timeout", type=bl.positive_int, default=300, help="seconds per training run (300)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--csv", metavar="PATH")
    ap.add_argument("--plot", metavar="PNG")
    args = ap.parse_args(argv)
    try:
        try:
            args.ranks = [bl.positive_int(k) for k in args.ranks.split(",") if k.strip()]
        except Exception:  # noqa: BLE001 - argparse's ArgumentTypeError, reworded
            raise bl.CliError(f"--ranks must be whole numbers >= 1, got {args.ranks!r}") from None
        if not args.ranks:
            raise bl.CliError("--ranks is empty")
        if 1 not in args.ranks:
            args.ranks = [1] + args.ranks  # efficiency needs the 1-rank rate
        bl.check_plot_possible(args.plot)
    except bl.CliError as exc:
        bl.fail(f"scaling.py: error: {exc}", rank=0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    samples = max(args.ranks) * args.batch_size * 50  # 50 steps per epoch at the largest K
    train_args = ["--dataset", "synthetic", "--samples", str(samples), "--features", str(args.features),
                  "--hidden", args.hidden, "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
                  "--epochs", str(10 ** 6), *bl.final_curve_only(args.steps)]
    rates: dict[int, list[float]] = {k: [] for k in args.ranks}
    reports: dict[int, dict] = {}
    for _ in range(args.rounds):
        for k in args.ranks:
            try:
                report = bl.run_train(args.mpiexec, k, train_args, timeout=args.timeout)
            except RuntimeError as exc:
                print(f"scaling.py: {exc}", file=sys.stderr)
                return 1
            rates[k].append(report["samples_per_second"])
            reports[k] = report
    base = float(np.median(rates[1]))
    rows = []
    for k in args.ranks:
        rate = float(np.median(rates[k]))
        rows.append({"ranks": k, "batch_per_rank": args.batch_size, "global_batch": k * args.batch_size,
                     "steps": args.steps, "samples_per_s": rate, "min_samples_per_s": float(np.min(rates[k])),
                     "max_samples_per_s": float(np.max(rates[k])), "speedup": rate / base,
                     "efficiency": rate / (k * base),
                     "allreduce_ms_per_step": _phase(reports[k], "allreduce")})
    cores = os.cpu_count() or 1
    print(f"# weak scaling: MLP {args.features}-{args.hidden.replace(',', '-')}, batch {args.batch_size}/rank, "
          f"{args.steps} steps, median of {args.rounds} interleaved rounds; {cores} cores")
    print(f"# {'ranks':>5} {'samples/s':>11} {'speedup':>8} {'efficiency':>10} {'allreduce ms/step':>17}")
    for r in rows:
        ar = f"{r['allreduce_ms_per_step']:.3f}" if r["allreduce_ms_per_step"] is not None else "-"
        note = "  (more ranks than cores: ranks share cores)" if r["ranks"] > cores else ""
        print(f"  {r['ranks']:>5} {r['samples_per_s']:>11.0f} {r['speedup']:>7.2f}x {r['efficiency']:>10.2f} "
              f"{ar:>17}{note}", flush=True)
    meta = {"benchmark": "scaling", "train_args": train_args, "rounds": args.rounds, "machine": bl.machine()}
    bl.write_results(args, meta, rows, lambda ax: draw(ax, rows))
    return 0


def _phase(report: dict, name: str) -> float | None:
    """Mean over ranks of a phase's ms/step from the report's per-rank records, if present."""
    values = [r.get(f"{name}_ms_per_step") for r in report.get("ranks", [])]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def draw(ax, rows: list[dict]) -> None:
    """samples/s against ranks, with perfect scaling as a dashed line."""
    ks = [r["ranks"] for r in rows]
    base = rows[0]["samples_per_s"] / rows[0]["ranks"]
    ax.plot(ks, [r["samples_per_s"] for r in rows], marker="o", label="ringsync-train")
    ax.plot(ks, [k * base for k in ks], linestyle="--", color="gray", label="perfect scaling")
    for r in rows:
        ax.annotate(f"{r['efficiency']:.0%}", (r["ranks"], r["samples_per_s"]), textcoords="offset points",
                    xytext=(4, -12))
    ax.set_xticks(ks)
    ax.set_xlabel("ranks")
    ax.set_ylabel("samples/s")
    ax.set_title("weak scaling, fixed per-rank batch")
    ax.grid(True, alpha=0.3)
    ax.legend()


if __name__ == "__main__":
    sys.exit(main())

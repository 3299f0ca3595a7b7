"""Straggler cost: a delay injected on one rank against step time and the wait it causes the others.

    python benchmarks/straggler.py --ranks 4 --slow-rank 2 --max-delay 0.05 --points 5 --plot out.png

Run it directly (not under mpiexec): for each delay d in 0 .. --max-delay it launches
`mpiexec -n P python -m ringsync.training.train --straggler RANK:d` (delays round-robin over
--rounds rounds) and reads the timing report: step time, each rank's attributed wait,
and the straggler cost (rank-seconds spent waiting, and the fraction of wall time lost).
In a synchronous step every other rank should wait about d per step; the plot shows the
measured step time and wait against that ideal.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl


def parse_args(argv: list[str] | None = None):
    ap = bl.Parser(prog="straggler.py", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=bl.positive_int, default=2, help="ranks (2)")
    ap.add_argument("--slow-rank", type=bl.nonnegative_int, default=None, help="the delayed rank (the last)")
    ap.add_argument("--max-delay", type=bl.nonnegative_float, default=0.02, help="largest delay, seconds (0.02)")
    ap.add_argument("--points", type=bl.positive_int, default=4, help="delays from 0 to --max-delay (4)")
    ap.add_argument("--steps", type=bl.positive_int, default=40, help="training steps per run (40)")
    ap.add_argument("--rounds", type=bl.positive_int, default=1, help="interleaved rounds; median over them (1)")
    ap.add_argument("--batch-size", type=bl.positive_int, default=64, help="samples per rank per step (64)")
    ap.add_argument("--mpiexec", default=bl.default_mpiexec(), help="launcher command (the venv's mpiexec)")
    ap.add_argument("--timeout", type=bl.positive_int, default=300, help="seconds per training run (300)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--csv", metavar="PATH")
    ap.add_argument("--plot", metavar="PNG")
    args = ap.parse_args(argv)
    try:
        if args.ranks < 2:
            raise bl.CliError(f"--ranks must be >= 2 to have someone wait, got {args.ranks}")
        if args.slow_rank is None:
            args.slow_rank = args.ranks - 1
        if args.slow_rank >= args.ranks:
            raise bl.CliError(f"--slow-rank must be < --ranks ({args.ranks}), got {args.slow_rank}")
        bl.check_plot_possible(args.plot)
    except bl.CliError as exc:
        bl.fail(f"straggler.py: error: {exc}", rank=0)
    return args


def summarize(report: dict, slow: int, delay: float) -> dict:
    """The figures of one run: per-step time and waits, the straggler cost."""
    steps = max(int(report.get("steps_this_run", report["steps"])), 1)
    ranks = report["ranks"]
    others = [r for r in ranks if r["rank"] != slow]
    st = report["straggler"]
    return {
        "delay_s": delay, "ranks": len(ranks), "slow_rank": slow,
        "step_ms": 1e3 * report["train_seconds"] / steps,
        "others_wait_ms_per_step": 1e3 * float(np.mean([r["wait_s"] for r in others])) / steps,
        "slow_wait_ms_per_step": 1e3 * ranks[slow]["wait_s"] / steps,
        "slow_rank_reported": st["slowest_rank"], "cost_s": st["cost_s"], "cost_fraction": st["cost_fraction"],
        "steps_slowest": ranks[slow].get("steps_slowest"), "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not bl.train_supports("--straggler"):
        print("straggler.py: this ringsync-train has no --straggler option (timing work not merged)",
              file=sys.stderr)
        return 1
    delays = [float(d) for d in np.linspace(0.0, args.max_delay, args.points)] if args.points > 1 else [args.max_delay]
    samples = args.ranks * args.batch_size * 50
    base = ["--dataset", "synthetic", "--samples", str(samples), "--batch-size", str(args.batch_size),
            "--max-steps", str(args.steps), "--epochs", str(10 ** 6), *bl.final_curve_only(args.steps)]
    runs: dict[float, list[dict]] = {d: [] for d in delays}
    for _ in range(args.rounds):
        for d in delays:
            extra = ["--straggler", f"{args.slow_rank}:{d:g}"] if d > 0 else []
            try:
                report = bl.run_train(args.mpiexec, args.ranks, base + extra, timeout=args.timeout)
                runs[d].append(summarize(report, args.slow_rank, d))
            except (RuntimeError, KeyError) as exc:
                print(f"straggler.py: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
    rows = []
    for d in delays:
        row = dict(runs[d][-1])
        for key in ("step_ms", "others_wait_ms_per_step", "slow_wait_ms_per_step", "cost_s", "cost_fraction"):
            row[key] = float(np.median([r[key] for r in runs[d]]))
        rows.append(row)
    print(f"# straggler: rank {args.slow_rank} of {args.ranks} delayed by d per step; {args.steps} steps, "
          f"median of {args.rounds} round(s)")
    print(f"# {'delay(ms)':>9} {'step(ms)':>9} {'others wait(ms/step)':>20} {'slow wait(ms/step)':>18} "
          f"{'cost(rank-s)':>12} {'cost frac':>9} {'named slowest':>13}")
    for r in rows:
        print(f"  {r['delay_s'] * 1e3:>9.1f} {r['step_ms']:>9.2f} {r['others_wait_ms_per_step']:>20.2f} "
              f"{r['slow_wait_ms_per_step']:>18.2f} {r['cost_s']:>12.3f} {r['cost_fraction']:>9.2f} "
              f"{r['slow_rank_reported']:>13}", flush=True)
    meta = {"benchmark": "straggler", "train_args": base, "rounds": args.rounds, "machine": bl.machine()}
    bl.write_results(args, meta, rows, lambda ax: draw(ax, rows))
    return 0


def draw(ax, rows: list[dict]) -> None:
    """Step time and the others' wait per step against the injected delay, with the ideal."""
    d = [1e3 * r["delay_s"] for r in rows]
    ax.plot(d, [r["step_ms"] for r in rows], marker="o", label="step time")
    ax.plot(d, [r["others_wait_ms_per_step"] for r in rows], marker="s", label="others' wait per step")
    ax.plot(d, [r["slow_wait_ms_per_step"] for r in rows], marker="^", label="slow rank's wait per step")
    ax.plot(d, d, linestyle="--", color="gray", label="ideal wait = delay")
    ax.plot(d, [rows[0]["step_ms"] + x for x in d], linestyle=":", color="gray", label="step(0) + delay")
    ax.set_xlabel(f"delay injected on rank {rows[0]['slow_rank']} (ms per step)")
    ax.set_ylabel("ms per step")
    ax.set_title(f"straggler cost, {rows[0]['ranks']} ranks")
    ax.grid(True, alpha=0.3)
    ax.legend()


if __name__ == "__main__":
    sys.exit(main())

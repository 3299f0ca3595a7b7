"""The sync-vs-async lab: every --sync mode on one trainer, same seed, data and hyperparameters.

    python benchmarks/sync_vs_async.py --out benchmarks/results        (what `make sync-lab` runs)
    python benchmarks/sync_vs_async.py --modes bsp,async --epochs 2 --out /tmp/lab

Run it directly (not under mpiexec). For each scenario (--straggler RANK:SECONDS on one
rank, and exponential --jitter of mean m on every rank) it launches
`mpiexec -n P python -m ringsync.training.train --sync MODE ...` for every mode and reads the reports:
time, steps and samples to --target accuracy, final accuracy, seconds per epoch, wait per
step, samples/s, staleness and the dropped fraction. Samples are gradient evaluations: a
bsp step costs P x batch of them, an async update one worker's batch, so the table compares
modes in samples and epochs, never in raw steps. The jitter scenario also runs bsp and
backup without injection, so the time jitter adds to a step can be set beside the theory:
m * H_P for bsp (the largest of P draws), m * (H_P - H_B) for backup:B (the (P-B)-th).

Writes sync_vs_async.{txt,json,csv} and, per scenario, loss against wall time and loss
against steps (in samples, so one axis fits every mode), one line per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl
import numpy as np

import ringsync as rs
from ringsync import timing
from ringsync.training import sync, train
from ringsync.training.sync import parse_sync

MODES = "bsp,backup:1,local:4,ssp:2,async"


def parse_args(argv: list[str] | None = None):
    ap = bl.Parser(prog="sync_vs_async.py", description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=bl.positive_int, default=4, help="ranks (4)")
    ap.add_argument("--modes", default=MODES, help=f"comma-separated --sync modes ({MODES})")
    ap.add_argument("--straggler", default="1:0.02", help="the straggler scenario's RANK:SECONDS (1:0.02)")
    ap.add_argument("--jitter", default="exp:0.005", help="the jitter scenario's distribution (exp:0.005)")
    ap.add_argument("--epochs", type=bl.positive_int, default=20, help="epochs per run (20)")
    ap.add_argument("--jitter-steps", type=bl.positive_int, default=100,
                    help="steps per block of the bsp/backup step-time jobs (100)")
    ap.add_argument("--rounds", type=bl.positive_int, default=3,
                    help="rounds of those blocks, alternating without and with jitter; medians (3)")
    ap.add_argument("--batch-size", type=bl.positive_int, default=32, help="samples per rank per step (32)")
    ap.add_argument("--lr", type=bl.nonnegative_float, default=0.1, help="learning rate, every mode (0.1)")
    ap.add_argument("--momentum", type=bl.nonnegative_float, default=0.5, help="momentum, every mode (0.5)")
    ap.add_argument("--seed", type=bl.nonnegative_int, default=0, help="seed, every mode (0)")
    ap.add_argument("--target", type=bl.nonnegative_float, default=0.95, help="target test accuracy (0.95)")
    ap.add_argument("--mpiexec", default=bl.default_mpiexec(), help="launcher command (the venv's mpiexec)")
    ap.add_argument("--timeout", type=bl.positive_int, default=120, help="seconds per training run (120)")
    ap.add_argument("--out", metavar="DIR", help="write the table, JSON, CSV and plots here")
    ap.add_argument("--step-job", metavar="MODE", help=argparse.SUPPRESS)      # internal: see step_job()
    ap.add_argument("--train-args", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        args.modes = [parse_sync(m).text for m in args.modes.split(",") if m.strip()]
        if args.target > 1:
            raise ValueError(f"--target must be at most 1, got {args.target}")
        if args.out:
            bl.check_plot_possible(args.out)
    except (ValueError, bl.CliError) as exc:
        bl.fail(f"sync_vs_async.py: error: {exc}", rank=0)
    return args


def harmonic(k: int) -> float:
    """H_k = 1 + 1/2 + ... + 1/k (H_0 = 0)."""
    return sum(1.0 / i for i in range(1, k + 1))


def summarize(doc: dict, scenario: str) -> dict:
    """One table row from a ringsync-train report."""
    ps = doc["sync"].startswith(("ssp", "async"))
    units = max(doc["steps_this_run"], 1)
    if ps:        # per worker update: the workers' own wait
        workers = [r for r in doc["ranks"] if r.get("role") == "worker"]
        wait_ms = 1e3 * sum(r["wait_s"] for r in workers) / max(sum(r["units"] for r in workers), 1)
    else:         # per step, mean over ranks
        wait_ms = 1e3 * sum(r.get("wait_s", 0.0) for r in doc["ranks"]) / len(doc["ranks"]) / units
    staleness = doc.get("staleness") or {}
    dropped = doc.get("dropped_gradients") or {}
    return {
        "scenario": scenario, "mode": doc["sync"], "epochs": doc["epochs"],
        "wall_s": round(doc["train_seconds"], 3),
        "s_per_epoch": round(doc["train_seconds"] / doc["epochs"], 4) if doc["epochs"] else None,
        "unit": "update" if ps else "step", "units": doc["steps"],
        "samples_per_unit": doc["global_batch"],
        "step_ms": round(1e3 * doc["train_seconds"] / units, 3),
        "time_to_target_s": doc["time_to_accuracy_s"], "units_to_target": doc["steps_to_accuracy"],
        "samples_to_target": doc["samples_to_accuracy"],
        "epochs_to_target": (round(doc["samples_to_accuracy"] / doc["train_samples"], 3)
                             if doc["samples_to_accuracy"] is not None else None),
        "final_accuracy": round(doc["test_accuracy"], 4), "final_loss": round(doc["final_loss"], 4),
        "wait_ms_per_unit": round(wait_ms, 3), "samples_per_s": round(doc["samples_per_second"], 1),
        "staleness_mean": staleness.get("mean"), "staleness_max": staleness.get("max"),
        "dropped_fraction": dropped.get("fraction"),
        "param_divergence_mean": (doc.get("param_divergence") or {}).get("mean"),
        "curve": doc["curve"],
    }


def fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> list[str]:
    lines = [(f"{'mode':>10} {'wall s':>7} {'s/epoch':>8} {'to target s':>11} {'samples to tgt':>14} "
             f"{'epochs to tgt':>13} {'final acc':>9} {'wait ms/unit':>12} {'unit ms':>8} {'samples/s':>9} "
             f"{'stale mean/max':>14} {'dropped':>7}")]
    for r in rows:
        stale = ("-" if r["staleness_mean"] is None else f"{r['staleness_mean']:.2f}/{r['staleness_max']}")
        lines.append(f"{r['mode']:>10} {r['wall_s']:>7.2f} {fmt(r['s_per_epoch'], '.3f'):>8} "
                     f"{fmt(r['time_to_target_s'], '.2f'):>11} {fmt(r['samples_to_target']):>14} "
                     f"{fmt(r['epochs_to_target'], '.2f'):>13} {r['final_accuracy']:>9.4f} "
                     f"{r['wait_ms_per_unit']:>12.2f} {r['step_ms']:>8.2f} {r['samples_per_s']:>9.0f} "
                     f"{stale:>14} {fmt(r['dropped_fraction'], '.3f'):>7}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.step_job:
        return step_job(args)
    p = args.ranks
    base = ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
            "--momentum", str(args.momentum), "--seed", str(args.seed),
            "--target-accuracy", str(args.target)]
    scenarios = [("straggler", ["--straggler", args.straggler]), ("jitter", ["--jitter", args.jitter])]
    out: list[str] = [(f"# sync-vs-async lab: {p} ranks, digits, batch {args.batch_size} per rank (per worker "
                      f"update), lr {args.lr}, momentum {args.momentum}, seed {args.seed}, {args.epochs} epochs, "
                      f"target accuracy {args.target}"),
                      ("# unit: a step (bsp, backup, local: every rank's batch) or an update (ssp, async: one "
                      "worker's batch); samples = gradient evaluations")]
    rows: list[dict] = []
    try:
        for name, flags in scenarios:
            out.append(f"\n## {name}: {' '.join(flags)}")
            done = []
            for mode in args.modes:
                doc = bl.run_train(args.mpiexec, p, base + flags + ["--sync", mode], timeout=args.timeout)
                done.append(summarize(doc, name))
                print(f"  {name} {mode}: {done[-1]['wall_s']:.2f} s, accuracy {done[-1]['final_accuracy']:.4f}",
                      file=sys.stderr, flush=True)
            out.extend(table(done))
            rows.extend(done)
        jitter = jitter_steps(args, base)
    except RuntimeError as exc:
        print(f"sync_vs_async.py: {exc}", file=sys.stderr)
        return 1
    out.append("")
    out.extend(jitter["lines"])
    text = "\n".join(out) + "\n"
    print(text, end="")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        bl.write_atomic(os.path.join(args.out, "sync_vs_async.txt"), text)
        meta = {"benchmark": "sync_vs_async", "ranks": p, "train_args": base, "scenarios": dict(scenarios),
                "machine": bl.machine(), "ringsync_env": bl.ringsync_env()}
        bl.write_json(os.path.join(args.out, "sync_vs_async.json"),
                      {"meta": meta, "results": rows, "jitter_step_time": jitter["rows"]})
        bl.write_csv(os.path.join(args.out, "sync_vs_async.csv"),
                     [{k: v for k, v in r.items() if k != "curve"} for r in rows])
        for name, _ in scenarios:
            mine = [r for r in rows if r["scenario"] == name]
            for axis in ("wall", "steps"):
                bl.save_plot(os.path.join(args.out, f"sync_vs_async_{name}_{axis}.png"),
                             lambda ax, mine=mine, axis=axis, name=name: draw(ax, mine, axis, name))
    return 0


def jitter_steps(args, base: list[str]) -> dict:
    """bsp and backup:1 step times with and without the jitter, beside m H_p and m (H_p - H_B).

    One job per mode (--step-job, below) alternates blocks of steps without and with the
    jitter in the same processes, so the machine's load, which drifts, hits both alike; the
    added time is the median over rounds of (jitter block - the block just before it).
    """
    kind, _, scale = args.jitter.partition(":")
    p, m = args.ranks, float(scale)
    rows = []
    for mode in ("bsp", "backup:1"):
        b = parse_sync(mode).value or 0
        blocks = step_job_run(args, base, mode)
        none, jit = np.array(blocks["none"]), np.array(blocks["jitter"])
        theory = 1e3 * m * (harmonic(p) - harmonic(b)) if kind == "exp" else None
        rows.append({"mode": mode, "step_ms_no_jitter": round(float(np.median(none)), 3),
                     "step_ms_jitter": round(float(np.median(jit)), 3),
                     "added_ms": round(float(np.median(jit - none)), 3), "rounds_ms": blocks,
                     "theory_ms": None if theory is None else round(theory, 3),
                     "formula": "m*H_p" if b == 0 else f"m*(H_p - H_{b})"})
    lines = [(f"## step time added by jitter {args.jitter} on {p} ranks: {args.rounds} rounds of "
              f"{args.jitter_steps} steps without, then {args.jitter_steps} with it, in one job per mode; medians"),
             f"{'mode':>10} {'no jitter ms':>12} {'jitter ms':>10} {'added ms':>9} {'theory ms':>10} {'ratio':>6}  formula"]
    for r in rows:
        ratio = "-" if not r["theory_ms"] else f"{r['added_ms'] / r['theory_ms']:.2f}"
        lines.append(f"{r['mode']:>10} {r['step_ms_no_jitter']:>12.2f} {r['step_ms_jitter']:>10.2f} "
                     f"{r['added_ms']:>9.2f} {fmt(r['theory_ms'], '.2f'):>10} {ratio:>6}  {r['formula']}")
    return {"rows": rows, "lines": lines}


def step_job_run(args, base: list[str], mode: str) -> dict:
    """Launch this script as `--step-job MODE` on args.ranks ranks; return its block times."""
    argv = [os.path.abspath(__file__), "--step-job", mode, "--jitter", args.jitter,
            "--jitter-steps", str(args.jitter_steps), "--rounds", str(args.rounds), "--train-args=" + " ".join(base)]
    out = bl.run_job(args.mpiexec, args.ranks, argv, args.timeout, f"{mode} step-time job")
    lines = [x for x in out.splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"the {mode} step-time job printed no result")
    return json.loads(lines[-1])


def step_job(args) -> int:
    """(Under mpiexec.) Alternate blocks of steps without and with the jitter; rank 0 prints
    {"none": [ms per step, ...], "jitter": [...]} as one JSON line."""
    targs = train.parse_args(["--quiet", "--epochs", "1000", *args.train_args.split(), "--sync", args.step_job])
    rs.init()
    sync.check_args(targs, rs.size(), train.fail)
    trainer = train.Trainer(targs, train.load_data(targs))
    mode = sync.SyncRun(targs, trainer)
    blocks: dict[str, list[float]] = {"none": [], "jitter": []}
    for k in range(-1, args.rounds):                   # round -1 warms up, untimed
        for label, jitter in (("none", None), ("jitter", args.jitter)):
            timing.start("off", every=0, timeline="", jitter=jitter, seed=targs.seed + k + 1)
            rs.barrier()
            steps = args.jitter_steps if k >= 0 else 20
            t0, target = time.perf_counter(), trainer.step + steps
            while trainer.step < target:
                trainer.train_step(*trainer.batch(trainer.step))
            seconds = time.perf_counter() - t0
            timing.finish()
            if k >= 0:
                blocks[label].append(round(1e3 * seconds / steps, 4))
    mode.finish(0.0)
    if rs.rank() == 0:
        print(json.dumps(blocks), flush=True)
    return 0


def draw(ax, rows: list[dict], axis: str, scenario: str) -> None:
    """Train loss against wall time, or against steps counted in samples, one line per mode."""
    for r in rows:
        curve = r["curve"]
        x = [c["wall_s"] for c in curve] if axis == "wall" else [c["samples"] for c in curve]
        ax.plot(x, [c["train_loss"] for c in curve], marker=".", label=r["mode"])
    ax.set_xlabel("wall time (s)" if axis == "wall" else
                  "steps, counted in samples (a bsp step = ranks x batch; an async update = one batch)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(f"sync vs async, {scenario}: loss against {'wall time' if axis == 'wall' else 'steps'}")
    ax.grid(True, alpha=0.3)
    ax.legend()


if __name__ == "__main__":
    sys.exit(main())

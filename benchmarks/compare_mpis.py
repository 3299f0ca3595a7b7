"""ringsync against each MPI's own Allreduce, side by side: one Markdown table from several runs.

    python benchmarks/compare_mpis.py --out benchmarks/results/allreduce_vs_mpis.md \\
        mpich=benchmarks/results/mpich openmpi=benchmarks/results/openmpi

Each LABEL=DIR is one `make bench` run on one MPI (make bench-one): DIR/allreduce.json (the
sweep) is required; DIR/latency.json (4 KB alone), DIR/fusion.json and DIR/train_step.json
are summarised when present. Per size the table gives, for each run, ringsync's median time,
that MPI's Allreduce median time, and MPI/ringsync = t_MPI / t_ringsync (above 1: ringsync
is faster). Both were measured in the same processes, interleaved round by round, so the
ratio is the figure to read; absolute times from different runs met different machine load.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl

PROG = "compare_mpis.py"


def parse_args(argv: list[str] | None = None):
    ap = bl.Parser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=DIR", help="a run's label and its results folder")
    ap.add_argument("--out", metavar="PATH.md", help="write the table here (atomically); it is printed anyway")
    args = ap.parse_args(argv)
    try:
        runs = []
        for text in args.runs:
            label, sep, folder = text.partition("=")
            if not sep or not label.strip() or not folder.strip():
                raise bl.CliError(f"{text!r}: give LABEL=DIR, e.g. mpich=benchmarks/results/mpich")
            if label in (r[0] for r in runs):
                raise bl.CliError(f"label {label!r} given twice")
            runs.append((label.strip(), folder.strip()))
        args.runs = [(label, folder, load(folder)) for label, folder in runs]
    except bl.CliError as exc:
        bl.fail(f"{PROG}: error: {exc}", rank=0)
    return args


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise bl.CliError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise bl.CliError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise bl.CliError(f"{path} has no results list (not a benchmark's --json output)")
    return data


def load(folder: str) -> dict:
    """A run's JSON files: allreduce (required), latency, fusion, train_step (if present)."""
    run = {"allreduce": _read(os.path.join(folder, "allreduce.json"))}
    impls = {r.get("impl") for r in run["allreduce"]["results"]}
    if not {"ringsync", "mpi"} <= impls:
        raise bl.CliError(f"{folder}/allreduce.json lacks ringsync or mpi rows (has {sorted(map(str, impls))})")
    for name in ("latency", "fusion", "train_step"):
        path = os.path.join(folder, f"{name}.json")
        if os.path.exists(path):
            run[name] = _read(path)
    return run


def _times(data: dict) -> dict[tuple[int, str], dict]:
    return {(r["size"], r["impl"]): r for r in data["results"]}


def _us(t: float | None) -> str:
    return "-" if t is None else (f"{t:.1f}" if t < 1e4 else f"{t:.0f}")


def table(runs: list[tuple[str, str, dict]]) -> str:
    lines = ["# ringsync vs each MPI's own Allreduce", ""]
    for label, folder, run in runs:
        meta = run["allreduce"].get("meta", {})
        m = meta.get("machine", {})
        lines.append(f"- **{label}** ({folder}): {m.get('mpi', '?')}; {meta.get('ranks', '?')} ranks, "
                     f"{meta.get('dtype', '?')}, {meta.get('rounds', '?')} interleaved rounds, "
                     f"{m.get('date_utc', '?')}; RINGSYNC_* set: {meta.get('ringsync_env') or 'none'}")
    lines += ["", ("Times are medians over interleaved rounds (the slowest rank's), in microseconds. "
                   "MPI/ringsync = t_MPI / t_ringsync, both from the same run: above 1, ringsync is faster; "
                   "below 1, **ringsync loses**."), ""]
    head = ["size"]
    for label, _, _ in runs:
        head += [f"ringsync on {label} (us)", f"{label} Allreduce (us)", f"{label}/ringsync"]
    lines += ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    per_run = [_times(run["allreduce"]) for _, _, run in runs]
    sizes = sorted({size for t in per_run for size, _ in t})
    losses = []
    for size in sizes:
        cells = [bl.human(size)]
        for (label, _, _), t in zip(runs, per_run):
            rs_row, mpi_row = t.get((size, "ringsync")), t.get((size, "mpi"))
            if rs_row is None or mpi_row is None:
                cells += ["-", "-", "-"]
                continue
            ratio = mpi_row["time_us"] / rs_row["time_us"]
            bad = rs_row.get("check") not in ("ok", "-", None)
            cells += [_us(rs_row["time_us"]) + (" (WRONG)" if bad else ""), _us(mpi_row["time_us"]),
                      f"{ratio:.2f}" if ratio >= 1 else f"**{ratio:.2f}**"]
            if ratio < 1:
                losses.append(f"{bl.human(size)} on {label} ({ratio:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "ringsync slower than the MPI's Allreduce at: " + (", ".join(losses) if losses else "no size"), ""]
    extra = [line for label, _, run in runs for line in _extras(label, run)]
    if extra:
        lines += ["## Other parts of the same runs", ""] + extra + [""]
    return "\n".join(lines)


def _extras(label: str, run: dict) -> list[str]:
    """One line each from latency.json, fusion.json and train_step.json, when present."""
    out = []
    if "latency" in run:
        t = _times(run["latency"])
        for size in sorted({s for s, _ in t}):
            if (size, "ringsync") in t and (size, "mpi") in t:
                rs_t, mpi_t = t[(size, "ringsync")]["time_us"], t[(size, "mpi")]["time_us"]
                out.append(f"- {label}, {bl.human(size)} latency alone: ringsync {rs_t:.1f} us, {label} "
                           f"Allreduce {mpi_t:.1f} us, {label}/ringsync {mpi_t / rs_t:.2f}")
    if "fusion" in run:
        rows = {r["mode"]: r for r in run["fusion"]["results"]}
        if "horovod-cpu" in rows:
            r0 = next(iter(rows.values()))
            hvd = rows["horovod-cpu"]["time_ms"]
            parts = [f"{m} {rows[m]['time_ms']:.2f} ms ({hvd / rows[m]['time_ms']:.2f}x)"
                     for m in ("grouped", "grouped-views", "flat") if m in rows]
            out.append(f"- {label}, fusion {r0['tensors']} x {bl.human(r0['bytes_each'])}: horovod-cpu (pack, "
                       f"{label} Allreduce, unpack) {hvd:.2f} ms; " + ", ".join(parts)
                       + " (x: horovod-cpu's time over the mode's; above 1 is faster)")
    if "train_step" in run:
        for r in run["train_step"]["results"]:
            out.append(f"- {label}, trainer step, {r['model']} ({r['grad_bytes'] / 2**20:.2f} MB of gradients), "
                       f"RINGSYNC_TRANSPORT={r['transport']}: step {r['step_ms']:.2f} ms, gradient all-reduce "
                       f"alone {r['allreduce_alone_ms']:.3f} ms ({r['allreduce_alone_over_base']:.2f}x {r['vs']})")
        for t, why in run["train_step"]["meta"].get("failures", {}).items():
            out.append(f"- {label}, trainer step, RINGSYNC_TRANSPORT={t}: not measured ({why})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    text = table(args.runs)
    print(text, end="")
    if args.out:
        bl.write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

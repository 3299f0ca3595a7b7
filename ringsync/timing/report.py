"""`ringsync-report PATH.json [--plot out.png]`: print a run's straggler report, and plot it.

Reads the report JSON that `ringsync-train --report PATH.json` writes (per-rank compute_s, wait_s,
allreduce_s, steps_slowest, and the `straggler` block). The plot needs matplotlib:
`pip install 'ringsync[plot]'`. Bad input exits with status 2 and a one-line reason.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from .. import cli
from ..files import atomic_write
from .straggler import format_report

PHASES = (("compute_s", "compute", "tab:blue"), ("wait_s", "wait", "tab:red"),
          ("allreduce_s", "all-reduce", "tab:green"))


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


def load(path: str) -> dict[str, Any]:
    """Read a report JSON and check it holds a straggler report; UsageError saying why not."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("straggler"), dict):
        raise UsageError(f"{path} has no 'straggler' block (was timing on? RINGSYNC_TIMING=off writes none)")
    ranks = doc.get("ranks")
    need = [k for k, _, _ in PHASES] + ["steps_slowest"]
    if not isinstance(ranks, list) or not ranks or not all(
            isinstance(r, dict) and all(isinstance(r.get(k), (int, float)) for k in need) for r in ranks):
        raise UsageError(f"{path}: 'ranks' must be a list of objects with {', '.join(need)}")
    st = doc["straggler"]
    if isinstance(st.get("slowest_rank"), bool) or not isinstance(st.get("slowest_rank"), int):
        raise UsageError(f"{path}: straggler.slowest_rank is missing or not a whole number")
    for key in ("cost_s", "cost_fraction"):
        if not isinstance(st.get(key), (int, float)):
            raise UsageError(f"{path}: straggler.{key} is missing or not a number")
    return doc


def plot(doc: dict[str, Any], out: str) -> None:
    """Per-rank stacked compute/wait/all-reduce bars, and each rank's wait per step; atomic write."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'ringsync[plot]'") from None
    ranks, st = doc["ranks"], doc["straggler"]
    waits = st.get("wait_per_step_s") or []
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=(1, 2))
    x = list(range(len(ranks)))
    bottom = [0.0] * len(ranks)
    for key, label, color in PHASES:
        values = [r[key] for r in ranks]
        bars.bar(x, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    bars.set_xticks(x, [str(r.get("rank", i)) for i, r in enumerate(ranks)])
    bars.set(xlabel="rank", ylabel="seconds (run total)",
             title=f"slowest rank {st['slowest_rank']}: cost {st['cost_s']:.2f} rank-s "
                   f"({100 * st['cost_fraction']:.0f}%)")
    bars.set_ylim(0, 1.2 * max(bottom + [1e-9]))      # headroom for the legend
    bars.legend(loc="upper center", ncol=3, fontsize="small")
    for r, row in enumerate(waits):
        lines.plot([1e3 * w for w in row], label=f"rank {r}", lw=1)
    lines.set(xlabel="step", ylabel="wait (ms)", title="wait per step")
    if waits:
        lines.legend(fontsize="small")
    fig.tight_layout()
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = cli.OneLineParser(prog="ringsync-report",
                               description="Print a run's straggler report, and plot it (--plot).")
    parser.add_argument("path", help="report JSON written by ringsync-train --report PATH.json")
    parser.add_argument("--plot", metavar="OUT.png", help="also draw the report to this image")
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:          # --help, or a usage error already printed in one line
        return int(done.code or 0)
    try:
        doc = load(args.path)
        if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
            raise UsageError(f"--plot {args.plot}: its folder does not exist")
        if args.plot and os.path.isdir(args.plot):
            raise UsageError(f"--plot {args.plot}: is a folder; name the image file")
        report = {"ranks": doc["ranks"],
                  "straggler": {"mode": "?", "steps": 0, "wall_s": 0.0, **doc["straggler"]}}
        if not 0 <= report["straggler"]["slowest_rank"] < len(doc["ranks"]):
            raise UsageError(f"{args.path}: straggler.slowest_rank is not one of the ranks")
        print(format_report(report))
        if args.plot:
            plot(doc, args.plot)
            print(f"plot written to {args.plot}")
    except UsageError as exc:
        print(f"ringsync-report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two versions of ringsync, A and B, timed in alternating launches: is B slower anywhere?

    python benchmarks/ab_versions.py --a /path/to/old-checkout --b . --launches 6 \
        --sizes 4K,256K,4M,64M [--mpi openmpi] [--json out.json]

Two versions cannot share one process, so the comparison interleaves launches instead: A, B,
A, B, ... each launch running that version's benchmarks/allreduce_sweep.py (ringsync and MPI's
Allreduce, 2 ranks) at the given sizes. Per size it prints the median over launches of each version's
time, and the median of B/A: for the raw times, and for each launch's time over MPI's
Allreduce measured in that same launch (which cancels most of a shared machine's drift).
A ratio above 1 means B is slower.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import benchlib as bl


def one_launch(code: Path, sizes: list[int], args, tmp: Path) -> dict[int, tuple[float, float]]:
    """{size: (ringsync's median us, MPI's median us)} from one sweep with `code`'s ringsync."""
    mpiexec, python = bl.wheel_launcher(args.mpi, str(ROOT))
    out = tmp / "sweep.json"
    env = dict(os.environ, PYTHONPATH=str(code), OMPI_MCA_mpi_yield_when_idle="1", OMPI_MCA_btl="^ofi")
    times: dict[int, dict[str, float]] = {}
    for size in sizes:                 # one size per call: the sweep takes a geometric range
        cmd = [*mpiexec, "-n", str(args.ranks), python, str(code / "benchmarks" / "allreduce_sweep.py"),
               "-b", str(size), "-e", str(size), "-n", str(args.iters), "-w", "5", "-r", str(args.rounds),
               "--impls", "ringsync,mpi", "--max-seconds", "2", "--json", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        for row in json.loads(out.read_text())["results"]:
            times.setdefault(row["size"], {})[row["impl"]] = row["time_us"]
    return {s: (t["ringsync"], t["mpi"]) for s, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = bl.Parser(prog="ab_versions.py", description=__doc__.splitlines()[0])
    ap.add_argument("--a", type=Path, required=True, help="checkout of version A (the baseline)")
    ap.add_argument("--b", type=Path, default=ROOT, help="checkout of version B (default: this one)")
    ap.add_argument("--sizes", default="4K,256K,4M,64M", help="comma-separated sizes (4K,256K,4M,64M)")
    ap.add_argument("--launches", type=bl.positive_int, default=6, help="launches per version (6)")
    ap.add_argument("--ranks", type=bl.positive_int, default=2)
    ap.add_argument("--iters", type=bl.positive_int, default=50, help="calls per round (50)")
    ap.add_argument("--rounds", type=bl.positive_int, default=5, help="rounds per launch (5)")
    ap.add_argument("--mpi", choices=["mpich", "openmpi"], default="mpich")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    try:
        sizes = [bl.parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as exc:
        ap.error(f"--sizes: {exc}")
    for name in ("a", "b"):
        if not (getattr(args, name) / "ringsync" / "__init__.py").exists():
            ap.error(f"--{name}: {getattr(args, name)} holds no ringsync/ checkout")
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.launches):
            for name, code in (("A", args.a), ("B", args.b)) if k % 2 == 0 else (("B", args.b), ("A", args.a)):
                runs[name].append(one_launch(code.resolve(), sizes, args, Path(tmp)))
    rows = []
    print(f"# {args.mpi}, {args.ranks} ranks, {args.launches} alternating launches per version;"
          f" A = {args.a}, B = {args.b}")
    print(f"{'size':>8} {'A us':>9} {'B us':>9} {'B/A':>6} {'B/A vs MPI':>11}   B/A per launch pair")
    for s in sizes:
        a = [r[s][0] for r in runs["A"]]
        b = [r[s][0] for r in runs["B"]]
        raw = [y / x for x, y in zip(a, b)]
        rel = [(rb[s][0] / rb[s][1]) / (ra[s][0] / ra[s][1]) for ra, rb in zip(runs["A"], runs["B"])]
        row = {"size": s, "a_us": statistics.median(a), "b_us": statistics.median(b),
               "ratio": statistics.median(raw), "ratio_vs_mpi": statistics.median(rel), "ratios": raw}
        rows.append(row)
        print(f"{bl.human(s):>8} {row['a_us']:9.1f} {row['b_us']:9.1f} {row['ratio']:6.3f} "
              f"{row['ratio_vs_mpi']:11.3f}   {' '.join(f'{x:.2f}' for x in raw)}")
    if args.json:
        bl.write_json(args.json, {"mpi": args.mpi, "a": str(args.a), "b": str(args.b), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

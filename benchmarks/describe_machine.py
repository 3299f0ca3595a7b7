"""Write MACHINE.md: what a benchmark result set was measured on (CPU, cores, memory, OS, MPI, versions, load).

    python benchmarks/describe_machine.py benchmarks/results/MACHINE.md
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("describe_machine.py: error: give one output path (e.g. benchmarks/results/MACHINE.md)",
              file=sys.stderr)
        return 2
    m = bl.machine()
    mem = memory_gib()
    lines = [
        "# Machine these results were measured on", "",
        f"- date (UTC): {m['date_utc']}",
        f"- CPU: {m['cpu']}, {m['cores']} cores visible",
        f"- memory: {mem:.1f} GiB" if mem else "- memory: unknown",
        f"- OS: {m['platform']}",
        f"- MPI: {m['mpi']} (mpi4py {m['mpi4py']})",
        f"- Python {m['python']}, NumPy {m['numpy']}, torch {bl._version('torch') or 'not installed (no gloo peer)'}",
        f"- load average at the start (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in m['load_avg'] or [])}",
        "",
        "All figures are medians of interleaved rounds (every implementation once per round), so",
        "drift in the machine's load hits them alike; ratios are more trustworthy than absolute times.",
        "Regenerate the whole set with `make bench` (about 2-5 minutes on 2 cores).",
    ]
    bl.write_atomic(argv[0], "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

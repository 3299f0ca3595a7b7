"""Does a crashing rank's message reach the user? Launch many crash jobs and count the lost ones.

    python tests/loops/crash_messages.py --jobs 40 --parallel 2 [--mpi openmpi] [--code DIR]

Each job has 2 ranks; rank 1 raises after a first all-reduce, so ringsync's abort hook prints
"uncaught exception on rank 1" and aborts the job. Half the jobs also freeze the launcher
process that reads rank 1's output (its parent: Hydra's proxy, Open MPI's prterun) for 0.5 s
just before the crash: a busy launcher, on purpose, which is when the message used to be lost
(issue 23, item 1). `--code DIR` runs another checkout's ringsync (a `git worktree` of an
older main) to show the loss there. Prints one line per kind of job: lost / launched.
Exit status 1 if any message was lost.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
from benchlib import wheel_launcher
from test_crash_messages import FROZEN_LAUNCHER

# The same job without the frozen launcher: a plain crash.
PLAIN = FROZEN_LAUNCHER.replace("if rs.rank() == 1:", "if False:").replace(
    "    raise RuntimeError", "if rs.rank() == 1:\n    raise RuntimeError")


def one_job(cmd: list[str], env: dict) -> bool:
    """True if the rank's message arrived."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
        return False
    return "uncaught exception on rank 1" in res.stderr and "boom while the launcher is frozen" in res.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=40, help="jobs of each kind (40)")
    ap.add_argument("--parallel", type=int, default=2, help="jobs at once (2)")
    ap.add_argument("--mpi", choices=["mpich", "openmpi"], default="mpich")
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout whose ringsync runs")
    args = ap.parse_args(argv)
    mpiexec, python = wheel_launcher(args.mpi, str(ROOT))
    env = dict(os.environ, PYTHONPATH=str(args.code.resolve()), OMPI_MCA_mpi_yield_when_idle="1",
               OMPI_MCA_btl="^ofi")
    lost_any = False
    with tempfile.TemporaryDirectory() as tmp:
        for kind, job in (("plain crash", PLAIN), ("launcher frozen 0.5 s", FROZEN_LAUNCHER)):
            script = Path(tmp) / f"job_{len(job)}.py"
            script.write_text(job)
            cmd = [*mpiexec, "-n", "2", python, str(script)]
            with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
                arrived = list(pool.map(one_job, [cmd] * args.jobs, [env] * args.jobs))
            lost = arrived.count(False)
            lost_any |= lost > 0
            print(f"{args.mpi}, {kind}: {lost} of {args.jobs} messages lost (code: {args.code})")
    return 1 if lost_any else 0


if __name__ == "__main__":
    sys.exit(main())

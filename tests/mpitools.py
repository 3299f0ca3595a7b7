"""Test helpers: launch subprocess MPI jobs, and make every rank pass or fail together."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def mpiexec_command() -> list[str]:
    """The launcher the suite was told to use (Makefile sets it), else the venv's mpiexec."""
    cmd = os.environ.get("RINGSYNC_TEST_MPIEXEC")
    if cmd:
        return shlex.split(cmd)
    beside_python = Path(sys.executable).parent / "mpiexec"
    found = str(beside_python) if beside_python.exists() else shutil.which("mpiexec")
    if not found:
        pytest.skip("no mpiexec found: install an MPI (pip install mpich)")
    return [found]


def run_mpi(nranks: int, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python args...` on `nranks` ranks in a fresh MPI job; never longer than `timeout`."""
    cmd = mpiexec_command() + ["-n", str(nranks), sys.executable, *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


# What MPI launchers and runtimes add to a job's output, as seen from both wheels:
# Open MPI frames its notices in lines of dashes ("prterun detected that one or more processes
# exited with non-zero status", "MPI_ABORT was invoked on rank 1"), tags runtime errors
# "[host:pid] PMIX ERROR: ...", and may end stderr with a NUL byte. MPICH's Hydra writes
# "[proxy:0:0@host] ..." and "[mpiexec@host] ..." lines, a "BAD TERMINATION" block (lines
# starting with "=") followed by three lines of advice, and "Abort(3) on node 1 ..." on MPI_Abort.
LAUNCHER_FRAME = re.compile(r"-{20,}")
LAUNCHER_LINE = re.compile(
    r"(prterun|mpirun|mpiexec|prte)\b|\[proxy:|\[mpiexec@|=|\[[\w.-]+:\d+\] |Abort\(\d+\) on node "
    r"|YOUR APPLICATION TERMINATED WITH|This typically refers to a problem with your application"
    r"|Please see the FAQ page for debugging")


def program_lines(text: str) -> list[str]:
    """The program's own non-blank lines in a launched job's stdout or stderr, without the
    notices the MPI launcher or runtime adds (framed blocks and tagged lines, as above)."""
    lines, in_frame = [], False
    for line in text.splitlines():
        bare = line.strip().strip("\0")
        if LAUNCHER_FRAME.fullmatch(bare):
            in_frame = not in_frame
        elif bare and not in_frame and not LAUNCHER_LINE.match(line):
            lines.append(line)
    return lines


def assert_everywhere(ok: bool, message: str = "") -> None:
    """Assert `ok` on all ranks at once, so one rank's failure cannot leave the others hanging."""
    from mpi4py import MPI

    verdicts = MPI.COMM_WORLD.allgather(bool(ok))
    bad = [r for r, v in enumerate(verdicts) if not v]
    assert not bad, f"failed on ranks {bad}: {message}"


def fingerprint(arr) -> tuple:
    """`arr`'s bytes (as a SHA-256 digest), shape and dtype: equal on two ranks exactly when
    the arrays are, and a few dozen bytes to send however large the array."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest(), arr.shape, str(arr.dtype)


def same_bits_everywhere(arr) -> bool:
    """True if `arr` has identical bytes, shape and dtype on every rank."""
    from mpi4py import MPI

    mine = fingerprint(arr)
    return all(m == mine for m in MPI.COMM_WORLD.allgather(mine))


class Verdicts:
    """Checks made on this rank, asserted on every rank at once by one collective (check()).

    A test that checks after every call pays a sync point per check, and on a loaded machine
    each sync point waits for every rank to get a core: collected, a test's checks cost one.
        v = Verdicts()
        v.expect(np.array_equal(got, want), f"{op} {dtype}: not the oracle's result")
        v.same_bits(got, f"{op} {dtype}")          # bitwise identical on every rank
        v.check()                                  # collective: every rank raises, or none
    """

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.prints: list[tuple[str, tuple]] = []

    def expect(self, ok: bool, message: str) -> None:
        if not ok:
            self.failed.append(message)

    def same_bits(self, arr, what: str) -> None:
        self.prints.append((what, fingerprint(arr)))

    def check(self) -> None:
        """Raise on every rank with each failed check and its ranks, if any rank had one."""
        from mpi4py import MPI

        everyone = MPI.COMM_WORLD.allgather((self.failed, self.prints))
        self.failed, self.prints = [], []
        problems: dict[str, list[int]] = {}
        for rank, (failed, _) in enumerate(everyone):
            for message in failed:
                problems.setdefault(message, []).append(rank)
        counts = [len(prints) for _, prints in everyone]
        if len(set(counts)) > 1:
            problems[f"ranks made different numbers of same-bits checks: {counts}"] = []
        else:
            for k, (what, _) in enumerate(everyone[0][1]):
                groups: dict[tuple, list[int]] = {}       # ranks by the bits they hold
                for rank, (_, prints) in enumerate(everyone):
                    groups.setdefault(prints[k][1], []).append(rank)
                if len(groups) > 1:
                    problems[f"{what}: results are not bitwise identical across ranks, "
                             f"which hold {len(groups)} different results: {sorted(groups.values())}"] = []
        assert not problems, "; ".join(f"{m} (ranks {r})" if r else m for m, r in problems.items())


@contextlib.contextmanager
def ringsync_settings(**env: str) -> Iterator[None]:
    """Run the block with ringsync re-initialized under these RINGSYNC_* variables (init()
    reads and compares them), then restore the environment and re-initialize. Collective."""
    import ringsync

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    ringsync.shutdown()
    try:
        ringsync.init()
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        ringsync.shutdown()
        ringsync.init()


def exact_integer_allreduce(x: np.ndarray, op: str) -> np.ndarray:
    """The oracle for integer dtypes, computed with NumPy from every rank's gathered input.

    MPI libraries differ on integer overflow (Open MPI's Allreduce saturates uint16 sums, MPICH
    and NumPy wrap), so the reference is exact arithmetic in Python ints, in rank order: "sum"
    wraps modulo 2**bits into x's dtype, "average" is the floor of the exact mean (no overflow),
    "min"/"max" as NumPy.
    """
    from mpi4py import MPI

    if x.dtype.kind not in "iu":
        raise TypeError(f"exact_integer_allreduce: integer dtypes only, got {x.dtype}")
    parts = [np.asarray(part, dtype=object) for part in MPI.COMM_WORLD.allgather(np.asarray(x))]
    if op in ("min", "max"):
        exact = (np.minimum if op == "min" else np.maximum).reduce(parts)
    elif op in ("sum", "average"):
        exact = parts[0]
        for part in parts[1:]:
            exact = exact + part
        if op == "average":
            exact = exact // len(parts)   # the floor of the exact mean: always in range
        info = np.iinfo(x.dtype)
        exact = (exact - info.min) % (1 << (8 * x.dtype.itemsize)) + info.min
    else:
        raise ValueError(f"exact_integer_allreduce: op {op!r}")
    return np.asarray(exact, dtype=object).astype(x.dtype).reshape(x.shape)


@contextlib.contextmanager
def shared_folder(prefix: str) -> Iterator[str]:
    """A folder every rank of COMM_WORLD sees (rank 0 makes it: the ranks share this machine),
    removed when every rank is done with it. Collective."""
    import tempfile

    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    path = comm.bcast(tempfile.mkdtemp(prefix=prefix) if comm.rank == 0 else None)
    try:
        yield path
    finally:
        comm.Barrier()
        if comm.rank == 0:
            shutil.rmtree(path, ignore_errors=True)

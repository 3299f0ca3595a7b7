"""Test helpers: launch subprocess MPI jobs, and make every rank pass or fail together."""
from __future__ import annotations

import contextlib
import os
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


def assert_everywhere(ok: bool, message: str = "") -> None:
    """Assert `ok` on all ranks at once, so one rank's failure cannot leave the others hanging."""
    from mpi4py import MPI

    verdicts = MPI.COMM_WORLD.allgather(bool(ok))
    bad = [r for r, v in enumerate(verdicts) if not v]
    assert not bad, f"failed on ranks {bad}: {message}"


def same_bits_everywhere(arr) -> bool:
    """True if `arr` has identical bytes, shape and dtype on every rank."""
    from mpi4py import MPI

    mine = (np.ascontiguousarray(arr).tobytes(), arr.shape, arr.dtype.str)
    return all(m == mine for m in MPI.COMM_WORLD.allgather(mine))


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

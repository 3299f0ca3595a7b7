"""An uncaught exception on one rank must end the whole job quickly, never hang it."""
import time

from mpitools import run_mpi

CRASH_ON_RANK_1 = """
import ringsync as rs
rs.init()
if rs.rank() == 1:
    raise RuntimeError("boom from the test")
rs.barrier()   # the other ranks wait here for rank 1, which never comes
print("unreachable")
"""


def test_uncaught_exception_aborts_every_rank_quickly(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_ON_RANK_1)
    start = time.monotonic()
    result = run_mpi(3, [str(script)], timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 30
    assert "uncaught exception on rank 1 of 3" in result.stderr
    assert "boom from the test" in result.stderr
    assert "unreachable" not in result.stdout


def test_ring_demo_runs_and_matches_mpi():
    result = run_mpi(4, ["examples/ring_demo.py", "--length", "6"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "matches MPI's own Allreduce on every rank: yes" in result.stdout
    assert " 1111" in result.stdout   # all four ranks' contributions, spelled out

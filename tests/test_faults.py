"""Fault tests in their own MPI jobs: stalls diagnosed, crashes end the job, NaNs named."""
import time

from mpitools import run_mpi

STALL = """
import os, time
os.environ.update(RINGSYNC_STALL_WARNING_S="0.5", RINGSYNC_CHECK_FINITE="1")
import numpy as np
import ringsync as rs
rs.init()
if rs.rank() == 2:
    time.sleep(3)                  # the straggler: the others wait for it in allreduce
rs.allreduce(np.ones(4))
x = np.ones(3)
if rs.rank() == 1:
    x[1] = np.inf
try:
    rs.allreduce(x, name="grad/w1")
except FloatingPointError as exc:
    print(f"rank {rs.rank()}: {exc}")
rs.barrier()
"""

TIMEOUT = """
import os, time
os.environ["RINGSYNC_STALL_TIMEOUT_S"] = "1"
import numpy as np
import ringsync as rs
rs.init()
if rs.rank() == 1:
    time.sleep(60)                 # hung: the inspector must end the job long before this
rs.allreduce(np.ones(4))
print("unreachable")
"""

CRASH_MID_LOOP = """
import numpy as np
import ringsync as rs
rs.init()
for step in range(100):
    if rs.rank() == 1 and step == 10:
        raise RuntimeError("boom at step 10")
    rs.allreduce(np.ones(256), op=rs.Average)
print("unreachable")
"""

CRASH_IN_THREAD = """
import threading
import numpy as np
import ringsync as rs
rs.init()
def work():
    raise KeyError("lost in a thread")
if rs.rank() == 0:
    threading.Thread(target=work).start()
rs.allreduce(np.ones(4))
import time; time.sleep(0 if rs.rank() else 30)
rs.barrier()
print("unreachable")
"""


def run_script(tmp_path, text, nranks, timeout=60):
    script = tmp_path / "job.py"
    script.write_text(text)
    start = time.monotonic()
    result = run_mpi(nranks, [str(script)], timeout=timeout)
    return result, time.monotonic() - start


def test_stall_warning_names_the_late_rank_and_nan_is_named_everywhere(tmp_path):
    result, _ = run_script(tmp_path, STALL, 3)
    assert result.returncode == 0, result.stderr
    assert "stall inspector: rank 0 has waited" in result.stderr, result.stderr
    assert "it is waiting for rank 2 (outside any collective" in result.stderr, result.stderr
    for r in range(3):
        assert (f"rank {r}: allreduce 'grad/w1' (call #2): NaN or Inf in the input on rank 1"
                in result.stdout), result.stdout


def test_stall_timeout_aborts_the_job_with_the_diagnosis(tmp_path):
    result, elapsed = run_script(tmp_path, TIMEOUT, 2)
    assert result.returncode != 0
    assert elapsed < 30
    assert "aborting the job: rank 0 has waited" in result.stderr, result.stderr
    assert "waiting for rank 1" in result.stderr, result.stderr
    assert "unreachable" not in result.stdout


def test_one_rank_raising_mid_loop_ends_the_job(tmp_path):
    result, elapsed = run_script(tmp_path, CRASH_MID_LOOP, 3)
    assert result.returncode != 0
    assert elapsed < 30
    assert "uncaught exception on rank 1 of 3" in result.stderr
    assert result.stderr.count("Traceback") == 1, result.stderr
    assert result.stderr.count("RuntimeError: boom at step 10") == 1, result.stderr
    assert "unreachable" not in result.stdout


def test_exception_in_a_thread_ends_the_job(tmp_path):
    result, elapsed = run_script(tmp_path, CRASH_IN_THREAD, 2)
    assert result.returncode != 0
    assert elapsed < 30
    assert "uncaught exception on rank 0 of 2 (thread" in result.stderr, result.stderr
    assert "lost in a thread" in result.stderr
    assert "unreachable" not in result.stdout

"""The asynchronous API (ringsync/handles.py) in MPI jobs of their own: what a test under
the suite's own mpiexec cannot do (start MPI at another thread level, leave a rank's
communication thread out of step for good).
"""
import re

import pytest
from mpitools import program_lines, run_mpi

THREAD_LEVEL = """
import sys
import mpi4py
mpi4py.rc.thread_level = sys.argv[1]       # before MPI starts
from mpi4py import MPI
import numpy as np
import ringsync as rs

rs.init()
r, p = rs.rank(), rs.size()
problems = []
names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled", MPI.THREAD_SERIALIZED: "serialized"}
if names.get(MPI.Query_thread()) != sys.argv[1]:
    problems.append(f"MPI gave thread level {MPI.Query_thread()}")
if not np.array_equal(rs.allreduce(np.full(4, r + 1.0)), np.full(4, p * (p + 1) / 2)):
    problems.append("blocking allreduce before")
calls = {"allreduce_async_": lambda: rs.allreduce_async_(np.ones(3)),
         "allreduce_async": lambda: rs.allreduce_async(np.ones(3)),
         "grouped_allreduce_async_": lambda: rs.grouped_allreduce_async_([np.ones(3)])}
for what, call in calls.items():
    try:
        call()
        problems.append(f"{what}: no error")
    except RuntimeError as exc:
        if "MPI_THREAD_MULTIPLE" not in str(exc) or f"MPI_THREAD_{sys.argv[1].upper()}" not in str(exc):
            problems.append(f"{what}: {exc}")
if rs.context.world().comm_thread is not None:
    problems.append("a communication thread was started")
x = np.full(5, float(r))
rs.allreduce_(x)
rs.barrier()
b = rs.broadcast(np.full(2, float(r)), root=p - 1)
if not (np.array_equal(x, np.full(5, p * (p - 1) / 2)) and np.array_equal(b, np.full(2, p - 1.0))):
    problems.append("blocking calls after the refusals")
rs.shutdown()
sys.stdout.write(f"rank {r}: {problems or 'ok'}\\n")
sys.stdout.flush()
"""


@pytest.mark.parametrize("level", ["serialized", "single"])
def test_async_calls_need_mpi_thread_multiple_and_blocking_ones_still_work(level):
    done = run_mpi(2, ["-c", THREAD_LEVEL, level], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(re.findall(r"rank \d: .*", done.stdout)) == ["rank 0: ok", "rank 1: ok"], done.stdout + done.stderr


OUT_OF_STEP_EVERYWHERE = """
import sys
import threading
import numpy as np
import ringsync as rs
from ringsync import handles

rs.init()
r, p = rs.rank(), rs.size()
problems = []

def outcome(call):
    try:
        call()
        return "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

def expect(call, says, what):
    got = outcome(call)
    if says not in got:
        problems.append(f"{what}: {got}")

def main_thread_waits_for_the_queue():
    # Open the gate once the main thread waits in wait_idle (a blocking call behind the queue).
    main = threading.main_thread().ident
    while True:
        frame = sys._current_frames().get(main)
        while frame is not None and frame.f_code.co_name != "wait_idle":
            frame = frame.f_back
        if frame is not None:
            gate.set()
            return
        threading.Event().wait(0.001)

def boom():
    gate.wait()
    return 1 // 0           # fails on this rank, inside the thread: the rank is out of step

x = np.full(6, float(r))
gate = threading.Event()
h0 = rs.allreduce_async_(x)
h1 = handles.start("boom", boom)
h2 = rs.allreduce_async_(np.ones(3))                 # not run
if sys.argv[1] == "in flight":      # a blocking call while the failing call is in the queue
    threading.Thread(target=main_thread_waits_for_the_queue, daemon=True).start()
    expect(lambda: rs.allreduce(np.ones(2)), "RuntimeError: an asynchronous call failed on this rank, so the "
           "ranks are out of step (ZeroDivisionError", "a blocking call behind the failed one")
else:
    gate.set()
if not (rs.synchronize(h0) is x and np.array_equal(x, np.full(6, p * (p - 1) / 2))):
    problems.append("the call before the failure")
expect(lambda: rs.synchronize(h1), "ZeroDivisionError", "the failed call")
expect(lambda: rs.synchronize(h2), "RuntimeError: allreduce_async_ was not run: an earlier asynchronous call "
       "failed on this rank (ZeroDivisionError", "the call after it")
expect(lambda: rs.synchronize(rs.allreduce_async(np.ones(2))), "RuntimeError: allreduce_async was not run",
       "a later call")
if sys.argv[1] == "idle":           # the next blocking call, made with no call in flight
    expect(lambda: rs.allreduce(np.ones(2)), "RuntimeError: an asynchronous call failed on this rank, so the "
           "ranks are out of step (ZeroDivisionError", "the next blocking call, with nothing in flight")
expect(rs.shutdown, "RuntimeError: shutdown() on rank", "shutdown()")
expect(rs.shutdown, "ranks are out of step (ZeroDivisionError", "shutdown() again")
if not rs.is_initialized():
    problems.append("shut down")
sys.stdout.write(f"rank {r}: {problems or 'ok'}\\n")
sys.stdout.flush()
"""


def out_of_step(ranks, mode):
    done = run_mpi(ranks, ["-c", OUT_OF_STEP_EVERYWHERE, mode], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(re.findall(r"rank \d: .*", done.stdout)) == [f"rank {q}: ok" for q in range(ranks)], \
        done.stdout + done.stderr


@pytest.mark.parametrize("ranks", [1, 2])
def test_an_error_in_the_thread_leaves_the_rank_out_of_step(ranks):
    """Every rank's thread fails (ZeroDivisionError): synchronize() re-raises it, the later
    calls are not run, a blocking call queued behind it raises, and shutdown() refuses."""
    out_of_step(ranks, "in flight")


def test_the_next_blocking_call_raises_even_with_nothing_in_flight():
    out_of_step(2, "idle")


OUT_OF_STEP_ON_ONE_RANK = """
import numpy as np
import ringsync as rs
from ringsync import handles

rs.init()
r = rs.rank()
def work():
    if r == 1:
        raise ZeroDivisionError("injected failure in the communication thread")
    return rs.allreduce(np.ones(1000))               # waits for rank 1, which never comes
h = handles.start("work", work)
rs.synchronize(h)                                    # rank 1: raises, uncaught
rs.barrier()
"""


def test_an_uncaught_error_from_synchronize_ends_the_job():
    # Rank 0 waits in synchronize() (its thread in an all-reduce rank 1 never makes): rank 1's
    # uncaught error must end the whole job, not leave rank 0 waiting.
    done = run_mpi(2, ["-c", OUT_OF_STEP_ON_ONE_RANK], timeout=60)
    assert done.returncode != 0
    assert "uncaught exception on rank 1" in done.stderr, done.stderr[-3000:]
    assert "injected failure in the communication thread" in done.stderr
    assert not [line for line in program_lines(done.stdout)], done.stdout


STALLED_ASYNC = """
import os, time
os.environ["RINGSYNC_STALL_WARNING_S"] = "0.5"
import numpy as np
import ringsync as rs
rs.init()
h = rs.allreduce_async_(np.ones(4), name="late") if rs.rank() == 0 else None
if rs.rank() == 1:
    time.sleep(3)                   # rank 0's call waits on its communication thread meanwhile
    h = rs.allreduce_async_(np.ones(4), name="late")
else:
    time.sleep(2.5)                 # rank 0's own thread computes: only its communication thread is inside
rs.synchronize(h)
rs.shutdown()
"""


def test_the_stall_inspector_sees_a_call_waiting_on_the_communication_thread():
    done = run_mpi(2, ["-c", STALLED_ASYNC], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"stall inspector: rank 0 has waited [\d.]+ s in allreduce 'late' \(call #\d+\): "
                     r"it is waiting for rank 1", done.stderr), done.stderr

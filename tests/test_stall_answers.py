"""The stall inspector reads each rank's answer to the query it has just sent (stall.py).

A rank that answers one diagnosis too late must not have that old answer read by the next
diagnosis as if it were fresh. The job below makes the race happen every time, with files as
the only clock: rank 1's inspector is kept from answering, and its main thread answers
queries itself, at chosen moments, while outside any collective.

  1. Rank 1 is late for call #2. Rank 0's first diagnosis gets no answer from it.
  2. Then rank 1 answers that first query (it was at call #1) and makes calls #2 to #4.
  3. Rank 1 is late for call #5. Rank 0's second diagnosis must say that rank 1 is outside
     any collective after call #4, from rank 1's answer to the second query, not after
     call #1 from its answer to the first.

Rank 0 writes each diagnosis to a file, so the test reads the program's own output.
"""
import time

from mpitools import run_mpi

PROLOGUE = """
import os, sys, time, pathlib
os.environ["RINGSYNC_STALL_WARNING_S"] = "0.4"
import numpy as np
from mpi4py import MPI
import ringsync as rs
from ringsync import stall
from ringsync.context import world

out = pathlib.Path(sys.argv[1])
rs.init()
inspector = world().inspector
answer_queries = inspector._answer_queries
"""

JOB = PROLOGUE + """

def wait_for(name, answer=False):
    deadline = time.monotonic() + 60
    while not (out / name).exists() and time.monotonic() < deadline:
        if answer:
            answer_queries()              # rank 1's main thread answers, outside any collective
        time.sleep(0.02)


if rs.rank() == 0:
    diagnose, made = inspector._diagnose, []

    def recorded(calls, waited):
        report = diagnose(calls, waited)
        made.append(report[0])
        (out / "part").write_text(report[0])
        (out / "part").rename(out / f"diagnosis{len(made)}")
        return report

    inspector._diagnose = recorded
else:
    inspector._answer_queries = lambda: None      # its inspector thread never answers
rs.allreduce(np.ones(4))                          # call #1
if rs.rank() == 1:
    wait_for("diagnosis1")                        # late for call #2, and silent
    while not inspector.comm.Iprobe(MPI.ANY_SOURCE, stall._QUERY):
        time.sleep(0.01)
    answer_queries()                              # answers the first query: at call #1
for _ in range(3):                                # calls #2 to #4
    rs.allreduce(np.ones(4))
if rs.rank() == 1:
    (out / "calls").write_text(str(world().checker.calls))
    wait_for("diagnosis2", answer=True)           # late for call #5; answers while late
rs.allreduce(np.ones(4))                          # call #5
rs.barrier()
print(f"rank {rs.rank()} done")
"""


def test_a_late_answer_to_an_earlier_query_is_not_read_as_the_current_one(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    start = time.monotonic()
    result = run_mpi(2, [str(script), str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 100
    first = (tmp_path / "diagnosis1").read_text()
    second = (tmp_path / "diagnosis2").read_text()
    calls = int((tmp_path / "calls").read_text())
    assert "no answer from ranks [1]" in first, first
    assert f"it is waiting for rank 1 (outside any collective, after call #{calls} for" in second, second
    assert "no answer" not in second and "already past" not in second, second


FINISHED_MEANWHILE = PROLOGUE + """if rs.rank() == 0:
    diagnose = inspector._diagnose

    def recorded(calls, waited):
        report = diagnose(calls, waited)
        (out / "diagnosed").write_text(report[0])
        return report

    inspector._diagnose = recorded
    inspector._log = lambda text: (out / "logged").write_text(text)
else:
    inspector._answer_queries = lambda: None      # its inspector thread never answers
rs.allreduce(np.ones(4))                          # call #1
if rs.rank() == 1:                                # late for call #2, until rank 0 asks
    while not inspector.comm.Iprobe(MPI.ANY_SOURCE, stall._QUERY):
        time.sleep(0.01)
rs.allreduce(np.ones(4))                          # call #2: over, while rank 0 still asks
if rs.rank() == 1:
    answer_queries()                              # after call #2: 'already past' it
else:
    deadline = time.monotonic() + 60
    while not (out / "diagnosed").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    inspector.stop()                              # its thread ends its round: logs or not
rs.barrier()
"""


def test_a_diagnosis_of_a_call_that_ended_while_the_others_were_asked_is_not_given(tmp_path):
    """Rank 0 asks in call #2; rank 1 arrives, the call ends, rank 1 answers from past it.
    That answer is true, but the diagnosis built on it ('already past it: ranks [1]', of a
    call both ranks were in) is about a stall that is over: it must not be logged."""
    script = tmp_path / "job.py"
    script.write_text(FINISHED_MEANWHILE)
    result = run_mpi(2, [str(script), str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "diagnosed").exists()
    assert not (tmp_path / "logged").exists(), (tmp_path / "logged").read_text()

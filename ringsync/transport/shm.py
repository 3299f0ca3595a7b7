"""Shared memory within a node: one segment per node, synchronized through counters in it.

Ranks on the same node can read each other's memory, so they need not send messages at all:
each rank copies its data into its own part of a shared segment, and the others read it
there. The memory is a POSIX shared-memory file (SharedWindow, below), mapped by every rank of
the node; ringsync provides the synchronization, because an MPI barrier costs several
microseconds and a counter in shared memory costs a fraction of one.

The segment, per rank of the node:

    control line 0, line 1     64 bytes each, one per episode parity: the stage (how many
                               sync points this rank has passed) and the agreement check's
                               trailer (agreement.py), in one cache line, so that one
                               transfer between cores brings both; line 0 also holds the
                               poison word (below)
    slot 0, slot 1             data, `slot_bytes` each, used on alternate episodes

An *episode* is one use of the slots: write into my slot, sync, read the others' slots
(and maybe sync and read again). A sync point is "publish my stage, then wait until every
rank of the node has published at least as far". Episodes alternate between slot 0 and
slot 1 (double buffering), so a rank may start writing its next episode while a slower
rank is still reading the previous one: before a rank can write the same slot again, it
must pass the next episode's first sync point, which every rank reaches only after it has
finished reading. So one episode needs one sync point per read phase, and none to free
the slots afterwards.

Memory order: on x86 nothing is needed. x86 keeps stores in order with stores and loads in
order with loads and with later stores (x86-TSO), which is all this publish-then-look
pattern needs, and each NumPy call is a compiler barrier. Elsewhere (FENCE) a sync point
fences before publishing its stage (my writes are visible before the counter says so) and
after seeing the others' (their writes are visible to my reads). Python has no fence of its
own, so there the fence is `Win.Sync()` on a tiny MPI window of this rank alone (a full
memory barrier in MPI's unified memory model): the one MPI window ringsync still makes, and
only on such processors.

Waiting: a rank spins briefly on the counters, then yields the core between looks. With
more ranks than cores (4 ranks on 2 cores), a rank that only spun would hold the very core
the rank it waits for needs. The asynchronous API's communication thread (handles.py) sleeps
between looks instead, its naps growing as transport/p2p.py's do: a yield would hand the core
back to it at once, taking it from its own rank's computing thread. A wait is an ordinary Python loop inside a collective, so the
stall inspector (stall.py) sees a stuck one like any other.

Poison: a rank that raises inside a collective (out of memory, a caught Ctrl-C, a bug) never
reaches the sync points its peers wait at. The front doors (collectives.py) catch such an
exception on its way out and poison the segment: the rank writes a word naming itself, the
collective and its call number into its control line, and from then on every sync point of
this rank raises PeerFailedError. A waiting rank looks at every rank's poison word between
yields (never while it spins: the fast path costs nothing), raises PeerFailedError with
the same message, and poisons its own line too; but not if the rank it waits for has
reached the sync point meanwhile (a waiter descheduled under load may look late): a failure
after this point (later in this call or in a later one) belongs to the next sync point,
where it raises. The segment stays poisoned for good: every later collective that syncs on
it raises at once, on every rank of the node. (shutdown() and init() make a new one.)
"""
from __future__ import annotations

import errno
import mmap
import os
import platform
import secrets
import tempfile
import time
from collections.abc import Sequence

import numpy as np
from mpi4py import MPI

from .p2p import NAP_MAX_S, NAP_MIN_S, hurry, is_patient

LINE_BYTES = 64             # a control line: the stage (int64), the trailer (32 bytes), the poison word
CONTROL_BYTES = 2 * LINE_BYTES
TRAILER_OFFSET, TRAILER_BYTES = 8, 32
POISON_OFFSET = TRAILER_OFFSET + TRAILER_BYTES     # an int64 in control line 0: 0 while healthy
# Where the processor may reorder memory operations beyond x86-TSO, sync points fence.
# (ringsync/__init__.py repeats this test: it must run before MPI starts.)
TSO_MACHINES = ("x86_64", "amd64", "i386", "i686")
FENCE = platform.machine().lower() not in TSO_MACHINES
SPINS_BEFORE_YIELD = 200    # ~20-40 us of looking before a waiting rank yields its core
DEFAULT_SLOT_BYTES = 1 << 20
PAGE = mmap.PAGESIZE        # each rank's part starts on a page of its own
SETUP_TAG = 0x5348          # SharedWindow's setup messages on the node communicator
NAME_BYTES = 256            # the file's path (or rank 0's error) in one fixed-size message

# The collectives a poison word can name (their index is stored), and its fields.
COLLECTIVES = ("a collective", "allreduce", "broadcast", "allgather", "barrier", "join")
_KIND_BITS, _RANK_BITS = 4, 24


class PeerFailedError(RuntimeError):
    """A rank of this node raised inside a collective, which therefore cannot complete.

    Raised on the other ranks of the node instead of waiting forever, and by every later
    collective that syncs on the node's shared memory (it stays poisoned for good).
    `rank` is the rank (of the World's communicator) that raised, `collective` and `call`
    name its call."""

    def __init__(self, word: int) -> None:
        self.word = word
        kind = (word & ((1 << _KIND_BITS) - 1)) - 1
        self.rank = (word >> _KIND_BITS) & ((1 << _RANK_BITS) - 1)
        self.call = word >> (_KIND_BITS + _RANK_BITS)
        self.collective = COLLECTIVES[kind] if 0 <= kind < len(COLLECTIVES) else COLLECTIVES[0]
        super().__init__(word)      # (args is the word: the error pickles and copies)

    def __str__(self) -> str:
        return (f"rank {self.rank} raised inside {self.collective} (call #{self.call}): the "
                f"collective cannot complete, and the node's shared memory stays unusable "
                f"(shutdown() and init() again to go on)")


def poison_word(collective: str, call: int, rank: int) -> int:
    """The poison word naming `rank`'s failed `collective`, its `call`-th (never 0)."""
    kind = COLLECTIVES.index(collective) if collective in COLLECTIVES else 0
    return max(call, 0) << (_KIND_BITS + _RANK_BITS) | (rank & ((1 << _RANK_BITS) - 1)) << _KIND_BITS | kind + 1


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

    Collective: every rank of the node must create it at the same point (and free it: see
    free()). `mine` is this rank's part; `peers[q]` is node rank q's (the same memory, mapped
    here). `same_size`: whether every rank asked for as many bytes as this one.

    The memory is one POSIX shared-memory file (in /dev/shm where there is one), not an MPI
    window: MPI libraries make windows their own way (Open MPI's wheel prints an error line
    about its UCX component on every rank whenever one is made, unless told otherwise before
    MPI starts, which a library imported after mpi4py cannot do). Node rank 0 creates the
    file under a name no other job can have (its pid and a random token), sized for every
    rank's part, each on pages of its own; every rank maps it; and once every rank has
    mapped it, rank 0 unlinks the name at once. The memory lives while a rank maps it, and
    the file system never keeps it: a job that crashes later leaves nothing in /dev/shm.
    Setup goes over plain point-to-point messages on `node_comm` (MPI's collectives are not
    used inside ringsync).
    """

    def __init__(self, node_comm: MPI.Comm, nbytes: int) -> None:
        self.comm = node_comm
        self.nbytes = int(nbytes)
        if self.nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self._mmap: mmap.mmap | None = None
        size, rank = node_comm.Get_size(), node_comm.Get_rank()
        sizes = np.zeros(size, dtype=np.int64)
        path = np.zeros(NAME_BYTES, dtype=np.uint8)     # the file's path, or rank 0's error
        status = np.zeros(1, dtype=np.int64)            # 0: fine; else, who failed (+1)
        if rank == 0:
            sizes[0] = self.nbytes
            for q in range(1, size):
                node_comm.Recv([sizes[q:q + 1], MPI.INT64_T], q, SETUP_TAG)
            name, error = _create(_layout(sizes)[1])
            path[:len(name)] = np.frombuffer(name.encode()[:NAME_BYTES], dtype=np.uint8)
            status[0] = error
            for q in range(1, size):
                node_comm.Send([sizes, MPI.INT64_T], q, SETUP_TAG)
                node_comm.Send([path, MPI.BYTE], q, SETUP_TAG)
                node_comm.Send([status, MPI.INT64_T], q, SETUP_TAG)
        else:
            node_comm.Send([np.array([self.nbytes], dtype=np.int64), MPI.INT64_T], 0, SETUP_TAG)
            node_comm.Recv([sizes, MPI.INT64_T], 0, SETUP_TAG)
            node_comm.Recv([path, MPI.BYTE], 0, SETUP_TAG)
            node_comm.Recv([status, MPI.INT64_T], 0, SETUP_TAG)
        text = bytes(path).rstrip(b"\0").decode(errors="replace")
        if status[0]:
            raise OSError(f"ringsync: node rank 0 could not create shared memory: {text}")
        # Every rank maps the file; rank 0 hears from each, unlinks the name, and tells all.
        offsets, total = _layout(sizes)
        failure = ""
        try:
            self._mmap = _attach(text, total)
        except OSError as exc:
            failure = f"node rank {rank}: {exc}"
        if rank == 0:
            verdicts = [failure]
            for q in range(1, size):
                node_comm.Recv([path, MPI.BYTE], q, SETUP_TAG)
                verdicts.append(bytes(path).rstrip(b"\0").decode(errors="replace"))
            _unlink(text)       # every rank has it mapped (or has given up): the name goes now
            failure = "; ".join(v for v in verdicts if v)
            path[:] = 0
            path[:min(len(failure.encode()), NAME_BYTES)] = np.frombuffer(failure.encode()[:NAME_BYTES], np.uint8)
            for q in range(1, size):
                node_comm.Send([path, MPI.BYTE], q, SETUP_TAG)
        else:
            path[:] = 0
            path[:min(len(failure.encode()), NAME_BYTES)] = np.frombuffer(failure.encode()[:NAME_BYTES], np.uint8)
            node_comm.Send([path, MPI.BYTE], 0, SETUP_TAG)
            node_comm.Recv([path, MPI.BYTE], 0, SETUP_TAG)
            failure = bytes(path).rstrip(b"\0").decode(errors="replace")
        if failure:
            self.free()
            raise OSError(f"ringsync: could not map the node's shared memory ({failure})")
        whole = np.frombuffer(self._mmap, dtype=np.uint8)
        self.same_size = bool((sizes == self.nbytes).all())
        self.peers: list[np.ndarray] = [whole[o:o + min(self.nbytes, int(n))] for o, n in zip(offsets, sizes)]
        self.mine = self.peers[rank]
        self.base = self.mine.__array_interface__["data"][0]

    @property
    def freed(self) -> bool:
        return self._mmap is None

    def offset_of(self, a: np.ndarray) -> int:
        """Where `a` starts within this rank's part, in bytes; -1 if `a` is not inside it."""
        start = a.__array_interface__["data"][0] - self.base
        return start if 0 <= start and start + a.nbytes <= self.nbytes else -1

    def free(self) -> None:
        """Unmap this rank's view of the memory (idempotent). Called by every rank of the node
        at the same point, as MPI windows were; it sends nothing, the name being long gone.

        Views still held elsewhere (a closed FlatBuffer's, kept by the user) keep the mapping
        alive until they go: mmap refuses to close under them, and then the last of them
        unmaps it, so a stale view reads stale numbers but never freed memory."""
        mm, self._mmap = self._mmap, None
        if mm is not None:
            self.peers, self.mine, self.base = [], None, 0
            try:
                mm.close()
            except BufferError:
                pass


def _layout(sizes: np.ndarray) -> tuple[list[int], int]:
    """Each rank's byte offset in the file (whole pages each, at least one) and the total."""
    offsets, at = [], 0
    for n in sizes.tolist():
        offsets.append(at)
        at += max(-(-int(n) // PAGE), 1) * PAGE
    return offsets, at


def _shm_directory() -> str:
    """Where the file goes: /dev/shm (memory) on Linux, else the temporary directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _create(total: int) -> tuple[str, int]:
    """(path, 0) of a new file of `total` bytes with a name unique to this job; or (why, 1).

    Every page is reserved now (posix_fallocate): a tmpfs file's pages are otherwise allocated
    when first touched, and one touched past a full /dev/shm kills the process with SIGBUS
    instead of raising. Reserving is the check that cannot race with other jobs filling it."""
    directory = _shm_directory()
    path = os.path.join(directory, f"ringsync-{os.getpid()}-{secrets.token_hex(8)}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, total)
            if hasattr(os, "posix_fallocate"):      # (Linux; elsewhere pages come on first touch)
                os.posix_fallocate(fd, 0, total)
        finally:
            os.close(fd)
    except OSError as exc:
        _unlink(path)
        if exc.errno == errno.ENOSPC:
            return f"{directory} has no room for the node's shared memory ({total} bytes)", 1
        return f"{path}: {exc}", 1
    return path, 0


def _attach(path: str, total: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class NodeSegment:
    """The reused shared segment of one node: control lines, two slots per rank, sync points."""

    def __init__(self, node_comm: MPI.Comm, slot_bytes: int = DEFAULT_SLOT_BYTES) -> None:
        self.comm = node_comm
        self.size, self.rank = node_comm.Get_size(), node_comm.Get_rank()
        self.slot_bytes = slot_bytes = (slot_bytes + 63) & ~63
        self.window = SharedWindow(node_comm, CONTROL_BYTES + 2 * slot_bytes)
        self._fence_window = None
        self.sync_memory = _no_fence
        if FENCE:       # a full memory barrier: MPI's, on a window of this rank alone (module docstring)
            self._fence_window = MPI.Win.Allocate(8, comm=MPI.COMM_SELF)
            self._fence_window.Lock_all(MPI.MODE_NOCHECK)
            self.sync_memory = self._fence_window.Sync
        parts = self.window.peers
        # stages[parity][q]: rank q's stage in its control line of that parity; trailers likewise
        # (memoryviews: reading or writing one item costs a third of a NumPy scalar's)
        self.stages = [[memoryview(part[k * LINE_BYTES:k * LINE_BYTES + 8]).cast("q") for part in parts]
                       for k in (0, 1)]
        self._others = [[line for q, line in enumerate(lines) if q != self.rank] for lines in self.stages]
        start = TRAILER_OFFSET
        self.trailers = [[memoryview(part[k * LINE_BYTES + start:k * LINE_BYTES + start + TRAILER_BYTES])
                          for part in parts] for k in (0, 1)]
        # poisons[q]: rank q's poison word (control line 0): 0, or who raised inside which call
        self.poisons = [memoryview(part[POISON_OFFSET:POISON_OFFSET + 8]).cast("q") for part in parts]
        # slots[parity][q]: rank q's data slot of that parity
        self.slots = [[part[CONTROL_BYTES + k * slot_bytes:CONTROL_BYTES + (k + 1) * slot_bytes]
                       for part in parts] for k in (0, 1)]
        self.stage = 0          # sync points passed by this rank (the same count on every rank)
        self.episode = 0        # episodes begun (the same count on every rank)
        self.failure = 0        # the poison word this rank has set or seen (0: healthy)
        self._typed: dict[tuple, list[np.ndarray]] = {}

    # -- episodes and sync points ----------------------------------------------------------

    def begin(self) -> int:
        """Start an episode; returns its slot parity (0 or 1)."""
        self.episode += 1
        return self.episode & 1

    def sync(self) -> None:
        """Publish that this rank has reached the next sync point; wait for every rank of the node.

        The stage goes into the control line of the current episode's parity (every rank is in
        the same episode), beside that episode's trailer. Raises PeerFailedError if a rank
        has poisoned the segment (module docstring)."""
        self.stage = target = self.stage + 1
        parity = self.episode & 1
        if FENCE:
            self.sync_memory()          # my writes first, then the counter that announces them
        self.stages[parity][self.rank][0] = target
        for other in self._others[parity]:
            if other[0] < target:
                self._wait_for(other, target)
        if FENCE:
            self.sync_memory()          # their writes, announced by their counters, are visible

    def _wait_for(self, counter: memoryview, target: int) -> None:
        """Until counter[0] >= target: spin a little, then yield the core between looks, and
        between yields look for a poison word (then, if the counter is still short of the
        target, raise PeerFailedError)."""
        spins, nap = 0, 0.0
        while counter[0] < target:
            spins += 1
            if spins > SPINS_BEFORE_YIELD:
                if nap and not hurry.waiting:
                    time.sleep(nap)         # the communication thread: leave the core (p2p.py)
                    nap = min(2 * nap, NAP_MAX_S)
                elif nap:
                    os.sched_yield()        # ... unless its caller waits for it (p2p.Hurry)
                elif spins == SPINS_BEFORE_YIELD + 1 and is_patient():
                    nap = NAP_MIN_S
                else:
                    os.sched_yield()
                for word in self.poisons:
                    if word[0]:
                        # A peer past this sync point may have failed since (later in this
                        # call, or in a later one): not this sync's failure, the next sync
                        # point's. (The word, then the counter: read in that order.)
                        if FENCE:
                            self.sync_memory()
                        if counter[0] < target:
                            self.poison(word[0])

    def poison(self, word: int) -> None:
        """Mark the segment failed for good with `word` (poison_word()), in this rank's control
        line too, so that ranks waiting on this one learn it; then raise PeerFailedError, as
        every later sync point on this rank will. (The front doors call it for an exception
        of their own and catch the error it raises; a waiter's comes out of sync().)"""
        if not self.failure:
            self.failure = word
            if self.poisons and not self.poisons[self.rank][0]:
                self.poisons[self.rank][0] = word
            self.sync = self._poisoned      # (an instance attribute: healthy syncs pay nothing)
        raise PeerFailedError(self.failure)

    def _poisoned(self) -> None:
        raise PeerFailedError(self.failure)

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
        """Release every view of the segment, then the memory (idempotent)."""
        self._typed.clear()
        for views in (*self.stages, *self.trailers, self.poisons):
            for view in views:
                view.release()          # (no export may outlive the mapping)
        self.stages, self._others, self.trailers, self.poisons, self.slots = [], [], [], [], []
        if self._fence_window is not None:
            self._fence_window.Unlock_all()
            self._fence_window.Free()
            self._fence_window = None
        self.window.free()


def _no_fence() -> None:
    """x86-TSO orders what a sync point needs (module docstring)."""


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

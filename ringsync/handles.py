"""Horovod's asynchronous API: start an all-reduce now, collect its result later.

    handle = rs.allreduce_async_(grad, op=rs.Average)    # returns at once
    ...                                                  # compute on meanwhile
    rs.synchronize(handle)                               # wait; returns grad, reduced

Each rank has one *communication thread*, started by its first asynchronous call. The calls
queue up and the thread runs them one after another, through the same front doors as the
blocking calls (collectives.py, fusion.py): the same agreement opening, algorithms and
transports. Meanwhile the caller's thread computes: that is the overlap (docs/overlap.md).

The rules:
  * Order. Ranks submit their asynchronous calls in the same order, as PyTorch DDP requires
    (Horovod instead matches tensors by name in a negotiation round; ringsync's opening
    compares each call with the same call on the other ranks). A rank that submits a
    different call gets MismatchError on every rank, from synchronize() on that handle.
    A rank that submits one call more than the others meets their next collective with
    it, blocking or not, or their shutdown(): it differs from that call (kind, size, name:
    the opening compares them) and every rank raises MismatchError. Only a surplus call
    identical to the others' next one cannot be told from it, as for blocking calls.
  * Blocking calls. A blocking collective made while asynchronous ones are in flight waits
    for them first (Checker.arm does, for every guarded call), so it runs after them, in
    submission order. With nothing in flight it never touches the thread.
  * Handles. poll(handle) says whether the call has finished, without waiting;
    synchronize(handle) waits, then returns the result or raises the call's error. Each
    handle is synchronized once; shutdown() with handles not synchronized raises on every rank.
  * Errors. MismatchError and FloatingPointError (RINGSYNC_CHECK_FINITE) are raised alike
    on every rank, and the calls after them run as usual. Any other error leaves this rank
    out of step with the others: the thread runs nothing more (each later handle raises,
    saying why), and the next blocking call raises too; uncaught, it ends the job as any
    uncaught exception does (context.py).
  * Threads. The communication thread makes MPI calls while the caller's thread may make
    its own: MPI_THREAD_MULTIPLE, which mpi4py asks for by default. init() notes the level
    MPI gave; an asynchronous call raises RuntimeError if it is lower.
  * Host arrays only: CuPy arrays are refused (TypeError); use the blocking calls for them.

The thread waits for messages with naps between tests (transport/p2p.py) and for work on a
condition variable: it never spins while the caller computes.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from . import ops, timing
from .agreement import BARRIER, MismatchError
from .collectives import (
    agree_or_settle,
    allreduce_,
    allreduce_fused_,
    arguments_checked,
    check_inplace,
    check_name,
)
from .context import world
from .fusion import FlatViews, check_group, checked_arrays, grouped_allreduce_
from .transport import gpu
from .transport.p2p import be_patient, hurry
from .transport.shm import PeerFailedError

if TYPE_CHECKING:
    from .context import World

# Raised alike on every rank, with the ranks still in step: later calls run as usual.
ALIKE_ERRORS = (MismatchError, FloatingPointError)


class Handle:
    """One asynchronous call: poll() it, then synchronize() it, once."""

    __slots__ = ("done", "error", "number", "owner", "result", "used", "what", "work")

    def __init__(self, number: int, what: str, work: Callable[[], Any], owner: CommThread) -> None:
        self.number, self.what, self.work, self.owner = number, what, work, owner
        self.done, self.used = False, False
        self.result: Any = None
        self.error: BaseException | None = None

    def __repr__(self) -> str:
        state = "synchronized" if self.used else "done" if self.done else "in flight"
        return f"<ringsync Handle #{self.number} {self.what} ({state})>"


class CommThread:
    """A rank's communication thread and its queue of asynchronous calls (see the module doc)."""

    def __init__(self, w: World) -> None:
        self.world = w
        self.cond = threading.Condition()
        self.queue: deque[Handle] = deque()
        self.pending = 0            # calls submitted and not finished (Checker.arm reads it)
        self.live: dict[int, Handle] = {}     # handles not synchronized yet, by number
        self.submitted = 0
        self.broken: BaseException | None = None    # this rank's first error raised alone
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="ringsync-communication", daemon=True)
        self.thread.start()
        self.ident = self.thread.ident

    def submit(self, what: str, work: Callable[[], Any]) -> Handle:
        """Queue `work` (a blocking front door's call) and return its handle."""
        with self.cond:
            self.submitted += 1
            handle = Handle(self.submitted, what, work, self)
            self.queue.append(handle)
            self.pending += 1
            self.live[handle.number] = handle
            self.cond.notify_all()
        return handle

    def _serve(self) -> None:
        be_patient()                # this thread's MPI waits nap: transport/p2p.py
        while True:
            with self.cond:
                while not self.queue:
                    if self.stopping:
                        return
                    self.cond.wait()
                handle = self.queue.popleft()
            t0 = timing.now()
            result, error = None, None
            try:
                if self.broken is not None:
                    raise RuntimeError(f"{handle.what} was not run: an earlier asynchronous call "
                                       f"failed on this rank ({type(self.broken).__name__}: {self.broken})")
                result = handle.work()
            except BaseException as exc:  # noqa: BLE001 - every error goes to its handle
                error = exc
                if not isinstance(exc, ALIKE_ERRORS) and self.broken is None:
                    self.broken = exc
            timing.thread_span(handle.what, t0, timing.now())
            with self.cond:
                handle.result, handle.error, handle.work = result, error, None
                handle.done = True
                self.pending -= 1
                self.cond.notify_all()

    def wait_idle(self) -> None:
        """Wait until every submitted call has finished (a blocking call runs after them);
        RuntimeError if one of them left this rank out of step with the others."""
        with self.cond:
            self._wait_until(lambda: not self.pending)
        if self.broken is not None:
            raise RuntimeError(f"an asynchronous call failed on this rank, so the ranks are out of "
                               f"step ({type(self.broken).__name__}: {self.broken}); synchronize() "
                               "on its handle raises it") from self.broken

    def wait(self, handle: Handle) -> None:
        with self.cond:
            self._wait_until(lambda: handle.done)

    def _wait_until(self, done: Callable[[], bool]) -> None:
        """(Holding the lock) sleep until done(); meanwhile the thread's waits hurry (p2p.Hurry)."""
        if done():
            return
        hurry.waiting += 1
        try:
            while not done():
                self.cond.wait()
        finally:
            hurry.waiting -= 1

    def stop(self) -> None:
        """End the thread (once idle). Idempotent."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join()


def _thread(w: World) -> CommThread:
    """The World's communication thread, started on first use."""
    t = w.comm_thread
    if t is None:
        if w.thread_level < MPI.THREAD_MULTIPLE:
            names = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED",
                     MPI.THREAD_SERIALIZED: "SERIALIZED"}
            raise RuntimeError("ringsync's asynchronous API needs MPI_THREAD_MULTIPLE (its "
                               "communication thread makes MPI calls while yours may), but MPI "
                               f"started with MPI_THREAD_{names.get(w.thread_level, w.thread_level)}: "
                               "leave mpi4py.rc.thread_level at its default, 'multiple'")
        t = w.comm_thread = w.checker.comm_thread = CommThread(w)
    return t


def _host_only(x: object, arg: str) -> None:
    if gpu.is_device_array(x):
        raise TypeError(f"{arg}: the asynchronous API takes host (NumPy) arrays; "
                        "reduce CuPy arrays with the blocking calls")


# --- the calls --------------------------------------------------------------------------------

def allreduce_async_(x: np.ndarray, op: str = ops.Sum, name: str | None = None) -> Handle:
    """Start reducing `x` in place across all ranks; synchronize(handle) returns `x`, reduced.

    `x` must be a writeable C-contiguous NumPy array, and must not be touched until then."""
    w = world()
    comm = _thread(w)
    with arguments_checked:         # (a refusal fails the others' matching call too)
        op = ops.resolve_op(op)
        _host_only(x, "x")
        check_inplace(x, "x")
        check_name(name)
    return comm.submit(f"allreduce_async_{f' {name!r}' if name else ''}",
                       lambda: allreduce_(x, op, name))


def allreduce_async(x: object, op: str = ops.Sum, name: str | None = None) -> Handle:
    """Start reducing a copy of `x` (any array-like, any layout; `x` is free at once);
    synchronize(handle) returns the reduced copy."""
    w = world()
    comm = _thread(w)
    with arguments_checked:
        op = ops.resolve_op(op)
        _host_only(x, "x")
        out = np.array(x, copy=True, order="C")
        ops.check_dtype(out.dtype, "x")
        check_name(name)
    return comm.submit(f"allreduce_async{f' {name!r}' if name else ''}",
                       lambda: allreduce_(out, op, name))


def grouped_allreduce_async_(arrays: Sequence[np.ndarray], op: str = ops.Sum,
                             fusion_bytes: int | None = None) -> Handle:
    """Start reducing every array in `arrays` in place, fused as grouped_allreduce_ fuses
    them; synchronize(handle) returns the list of arrays."""
    w = world()
    comm = _thread(w)
    with arguments_checked:
        op, _ = check_group(arrays, op, fusion_bytes)
        for i, a in enumerate(arrays):
            _host_only(a, f"arrays[{i}]")
        if not isinstance(arrays, FlatViews):
            arrays = checked_arrays(arrays)
    return comm.submit(f"grouped_allreduce_async_ ({len(arrays)} arrays)",
                       lambda: grouped_allreduce_(arrays, op, fusion_bytes))


def bucket_allreduce_async_(span: np.ndarray, op: str, shapes: tuple[tuple[int, ...], ...],
                            name: str | None = None) -> Handle:
    """Start reducing a gradient bucket (a span of a FlatBuffer holding tensors of `shapes`)
    in place: allreduce_fused_ on the thread. For DistributedOptimizer(overlap=True)."""
    return start(f"bucket of {len(shapes)} ({span.nbytes} B)",
                 lambda: allreduce_fused_(span, op, shapes, name))


def start(what: str, work: Callable[[], Any]) -> Handle:
    """Run `work`, a function made of ringsync's blocking front doors, on the communication
    thread (a compressed bucket: training/optim.py). Its arguments must be checked already:
    an error in it reaches synchronize(), not the other ranks' matching call."""
    return _thread(world()).submit(what, work)


def poll(handle: Handle) -> bool:
    """Whether the call behind `handle` has finished (never waits, never communicates)."""
    _check_handle(handle)
    return handle.done


def synchronize(handle: Handle) -> Any:
    """Wait for the call behind `handle`; return its result, or raise its error (each handle once)."""
    _check_handle(handle)
    owner = handle.owner
    owner.wait(handle)
    with owner.cond:
        if handle.used:         # (another thread was first)
            raise ValueError(f"{handle!r} was already synchronized; each handle is used once")
        handle.used = True
        del owner.live[handle.number]
    result, error = handle.result, handle.error
    handle.result = handle.error = None
    if error is not None:
        raise error
    return result


def _check_handle(handle: object) -> None:
    if not isinstance(handle, Handle):
        raise TypeError(f"handle must be a ringsync Handle, got {type(handle).__name__}")
    if handle.used:
        raise ValueError(f"{handle!r} was already synchronized; each handle is used once")
    w = world()
    if handle.owner is not w.comm_thread:
        raise ValueError(f"{handle!r} belongs to a ringsync that has been shut down")


# --- shutdown ---------------------------------------------------------------------------------

def close(w: World) -> None:
    """shutdown()'s first part (collective): wait for the calls in flight, then make sure no
    rank leaves handles behind: every rank raises if one does, with the World still open
    (synchronize them, then shutdown() again). Then the thread ends."""
    t = w.comm_thread
    outstanding, failed = 0, 0
    if t is not None:
        with t.cond:
            t._wait_until(lambda: not t.pending)
            outstanding = len(t.live)
            failed = sum(1 for h in t.live.values() if h.error is not None)
        if t.broken is not None:
            # This rank is out of step with the others: a comparison could wait for ever.
            raise RuntimeError(f"shutdown() on rank {w.rank}: an asynchronous call failed here, so the "
                               f"ranks are out of step ({type(t.broken).__name__}: {t.broken})") from t.broken
    # (the opening's name, compared across ranks: at most agreement.NAME_BYTES shown)
    what = f"shutdown, {outstanding} handle(s) unsynchronized" if outstanding else "shutdown"
    what += f", {failed} failed" if failed else ""
    if w.checker.enabled and not (w.node is not None and w.node.failure):
        try:
            agree_or_settle(w.checker.arm(BARRIER, name=what))    # ranks that differ: MismatchError
        except PeerFailedError:
            pass    # the node's shared memory is poisoned (a rank failed): no comparing; close
    if outstanding:
        raise RuntimeError(f"shutdown() on rank {w.rank} with {outstanding} asynchronous handle(s) not "
                           f"synchronized{f' ({failed} of them failed)' if failed else ''}: "
                           "synchronize() every handle before shutdown()")
    if t is not None:
        t.stop()
        w.comm_thread = w.checker.comm_thread = None

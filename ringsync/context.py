"""The MPI world ringsync runs in: init, rank and size, local rank, and abort on a crash.

The World holds what belongs to one communicator: the private duplicate the collectives
use, the settings every rank shares, scratch buffers, the agreement checker, the stall
inspector, the timing probe and the GPU transport. Beyond it ringsync keeps only caches
(plans, fusion buffers) and the timing recorder.
"""
from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable
from types import TracebackType

import numpy as np
from mpi4py import MPI

from . import agreement, config, stall
from .algorithms.ring import ring_allgather_


class World:
    """ringsync's view of one MPI communicator: a private duplicate plus scratch space."""

    def __init__(self, comm: MPI.Comm) -> None:
        # A duplicate gives ringsync its own message space: our point-to-point traffic can
        # never match a message the user's own code sends on the original communicator.
        self.comm: MPI.Comm = comm.Dup()
        # Ranks that share a node (shared memory) form the "local" group, as in Horovod.
        self.local_comm: MPI.Comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        try:
            # Settings that change what a rank sends, read once, compared across ranks, frozen.
            self.settings: config.Settings = agreed_settings(self.comm)
        except ValueError:
            self.local_comm.Free()
            self.comm.Free()
            raise
        self._scratch: dict[np.dtype, np.ndarray] = {}
        self._views: dict[np.dtype, np.ndarray] = {}
        # MPI errors as exceptions, then the cross-rank agreement check and the stall
        # inspector's watchdog thread.
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.checker = agreement.Checker(self.comm, self.settings)
        self.inspector = stall.start(self)
        # Inside a timed step, timing's wrapper for an all-reduce (timing/); else None.
        self.probe: Callable[[Callable, tuple], object] | None = None
        # GPU buffers (transport/gpu.py): how they reach MPI, (transport, why), decided once;
        # and per device index, the reusable device and pinned buffers.
        self.device_transport: tuple[str, str] | None = None
        self.device_caches: dict[int, object] = {}

    def scratch(self, count: int, dtype: np.dtype) -> np.ndarray:
        """A reusable 1-D buffer of at least `count` elements: no allocation per call."""
        view = self._views.get(dtype)       # the view handed out last time, if the same size
        if view is not None and view.size == count:
            return view
        buf = self._scratch.get(dtype)
        if buf is None or buf.size < count:
            buf = np.empty(max(count, 1), dtype=dtype)
            self._scratch[dtype] = buf
        view = self._views[dtype] = buf[:count]
        return view

    def free(self) -> None:
        if self.inspector is not None:
            self.inspector.stop()
        for c in (self.local_comm, self.comm):
            if c != MPI.COMM_NULL:
                c.Free()
        self._scratch.clear()
        self._views.clear()
        self.device_caches.clear()


SETTINGS_BYTES = 2048     # room for every rank's settings text, the same on every rank


def agreed_settings(comm: MPI.Comm) -> config.Settings:
    """config.Settings from this rank's environment, after checking that every rank has the
    same: otherwise every rank raises ValueError naming the variables and each rank's value.

    (Compared with ring.py's all-gather of fixed-size rows: MPI's own collectives are not
    used inside ringsync.)
    """
    try:
        settings = config.Settings.from_env()
        text = settings.encode()
    except ValueError as exc:
        settings, text = None, b"!" + str(exc).encode()
    p, r = comm.Get_size(), comm.Get_rank()
    rows = np.zeros((p, SETTINGS_BYTES), dtype=np.uint8)
    rows[r, :len(text)] = np.frombuffer(text[:SETTINGS_BYTES], dtype=np.uint8)
    ring_allgather_(list(rows), comm, owned=r)
    texts = [bytes(row).rstrip(b"\0") for row in rows]
    errors = [(q, t[1:].decode()) for q, t in enumerate(texts) if t.startswith(b"!")]
    if errors:
        raise ValueError("; ".join(f"rank {q}: {why}" for q, why in errors))
    differing = config.differing_settings(texts)
    if differing:
        raise ValueError(f"ranks disagree on ringsync settings (each must be the same on every rank): {differing}")
    return settings


_world: World | None = None


def init(comm: MPI.Comm | None = None) -> None:
    """Start ringsync on `comm` (default MPI.COMM_WORLD); an uncaught exception then aborts the job.

    Calling it again with the same communicator is a no-op; with another, it switches.
    """
    global _world
    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py MPI.Comm, got {type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError("comm must not be MPI.COMM_NULL")
    if _world is not None:
        if MPI.Comm.Compare(_world.comm, comm) == MPI.CONGRUENT:
            return
        _world.free()
    _world = World(comm)
    _install_abort_hook()


def shutdown() -> None:
    """Release ringsync's communicators; init() may be called again afterwards."""
    global _world
    if _world is not None:
        _world.free()
        _world = None


def is_initialized() -> bool:
    """True between init() and shutdown()."""
    return _world is not None


def world() -> World:
    """The current World; raises if init() has not been called."""
    if _world is None:
        raise RuntimeError("ringsync is not initialized: call ringsync.init() first")
    return _world


def rank() -> int:
    """This process's rank in ringsync's communicator."""
    return world().rank


def size() -> int:
    """The number of ranks in ringsync's communicator."""
    return world().size


def local_rank() -> int:
    """This process's rank among the ranks on the same node."""
    return world().local_comm.Get_rank()


def local_size() -> int:
    """The number of ranks on this node."""
    return world().local_comm.Get_size()


# --- abort on an uncaught exception ---------------------------------------------------------
# In a synchronous job a rank that dies leaves the others blocked in a collective forever.
# So an uncaught exception on any rank prints its traceback, names the rank, and aborts the
# whole job through MPI_Abort: every process ends, mpiexec exits non-zero, nobody hangs.

_previous_hook = None


def _abort_on_uncaught(exc_type: type[BaseException], exc: BaseException,
                       tb: TracebackType | None, where: str = "") -> None:
    r, n = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    if issubclass(exc_type, KeyboardInterrupt):   # Ctrl-C reaches every rank: no tracebacks
        text = ""
    # One write, so the traceback appears once and whole even when ranks' output interleaves.
    sys.stderr.write(f"ringsync: uncaught exception on rank {r} of {n}{where}; "
                     f"aborting the job\n{text}")
    sys.stderr.flush()
    sys.stdout.flush()
    MPI.COMM_WORLD.Abort(1)


def _abort_on_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    # A thread that dies would leave its rank's part of the job undone: the same abort.
    if args.exc_type is SystemExit:
        return
    _abort_on_uncaught(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback,
                       where=f" (thread {args.thread.name if args.thread else '?'})")


def _install_abort_hook() -> None:
    global _previous_hook
    if sys.excepthook is not _abort_on_uncaught:
        _previous_hook = sys.excepthook
        sys.excepthook = _abort_on_uncaught
    threading.excepthook = _abort_on_uncaught_in_thread

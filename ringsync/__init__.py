"""ringsync: synchronous data-parallel training over a hand-written ring all-reduce.

    import ringsync as rs
    rs.init()
    total = rs.allreduce(np.ones(4), op=rs.Sum)   # every rank gets [p, p, p, p]

Start reading at ringsync/algorithms/ring.py. The layers, top to bottom: training/,
fusion.py, timing/ (wraps the front doors), collectives.py (the front doors), agreement.py,
algorithms/, transport/. The public API below is grouped by topic.
"""
import atexit as _atexit
import importlib as _importlib
import os as _os
import sys as _sys
import platform as _platform

# The node's shared memory is a POSIX shared-memory file, not an MPI window, so nothing here
# depends on the order of imports. Only beyond x86 does ringsync still make an MPI window (a
# tiny one, for its memory fence: transport/shm.py), and Open MPI's wheel prints an error line
# about its UCX component whenever a window is made unless OMPI_MCA_osc=^ucx is set before MPI
# starts: set it there, where the user has not (it only helps if ringsync is imported before
# mpi4py.MPI). The machine test is transport/shm.py's FENCE, which imports MPI itself.
if _platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
    _os.environ.setdefault("OMPI_MCA_osc", "^ucx")

# The public API, by topic: each name and the module that defines it. A name is imported on
# first use (PEP 562), so `import ringsync` alone does not start MPI: the tools beside the
# library (ringsync-cluster and its ssh stand-in, docs/cluster.md) never become MPI processes.
# Everything that uses the API (rs.init(), rs.allreduce, ...) imports it as before.
_API = {
    # The MPI world
    ".context": ("is_initialized", "local_rank", "local_size", "rank", "size"),
    ".startup": ("init", "shutdown"),
    # Collectives, their ops, uneven work, and what they raise when ranks disagree
    ".ops": ("Average", "Max", "Min", "Sum"),
    ".collectives": ("allgather", "allreduce", "allreduce_", "allreduce_fused_", "barrier",
                     "broadcast", "broadcast_"),
    ".uneven": ("join",),
    ".agreement": ("MismatchError",),
    ".transport.shm": ("PeerFailedError",),
    # The asynchronous API: start now, synchronize later
    ".handles": ("Handle", "allreduce_async", "allreduce_async_", "grouped_allreduce_async_",
                 "poll", "synchronize"),
    # Tensor fusion
    ".fusion": ("FlatBuffer", "grouped_allreduce", "grouped_allreduce_"),
    # Training
    ".training.optim": ("SGD", "DistributedOptimizer", "broadcast_parameters"),
    ".training.compression": ("Compression", "PowerSGD"),
    # GPU buffers
    ".transport.gpu": ("GPUUnavailable", "array_module", "use_gpu"),
}
_HOME = {name: module for module, names in _API.items() for name in names}


def __getattr__(name: str):
    """A public name (or a submodule: rs.timing, rs.context) on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name in _HOME:
        value = getattr(_importlib.import_module(_HOME[name], __name__), name)
    else:
        try:
            value = _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise                       # the submodule exists but needs what is missing
            raise AttributeError(f"module 'ringsync' has no attribute {name!r}") from exc
    globals()[name] = value
    return value


def _forget_singleton_files() -> None:
    # Wherever MPI was started in this process (by ringsync or by the script itself), a
    # one-process job's MPI files in /dev/shm lose their names at exit (context.py says why).
    if "mpi4py.MPI" in _sys.modules:
        _importlib.import_module(".context", __name__).unlink_singleton_files()


_atexit.register(_forget_singleton_files)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    # the MPI world
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
    # collectives
    "allreduce", "allreduce_", "allreduce_fused_", "broadcast", "broadcast_", "allgather",
    "barrier", "join", "Sum", "Average", "Min", "Max", "MismatchError", "PeerFailedError",
    # the asynchronous API
    "allreduce_async_", "allreduce_async", "grouped_allreduce_async_", "poll", "synchronize",
    "Handle",
    # tensor fusion
    "grouped_allreduce", "grouped_allreduce_", "FlatBuffer",
    # training
    "SGD", "DistributedOptimizer", "broadcast_parameters", "Compression", "PowerSGD",
    # GPU buffers
    "use_gpu", "array_module", "GPUUnavailable",
    # timing
    "timing",
]

"""ringsync: synchronous data-parallel training over a hand-written ring all-reduce.

    import ringsync as rs
    rs.init()
    total = rs.allreduce(np.ones(4), op=rs.Sum)   # every rank gets [p, p, p, p]

Start reading at ringsync/algorithms/ring.py. The layers, top to bottom: training/,
fusion.py, timing/ (wraps the front doors), collectives.py (the front doors), agreement.py,
algorithms/, transport/. The public API below is grouped by topic.
"""
import os as _os
import platform as _platform

# The node's shared memory is a POSIX shared-memory file, not an MPI window, so nothing here
# depends on the order of imports. Only beyond x86 does ringsync still make an MPI window (a
# tiny one, for its memory fence: transport/shm.py), and Open MPI's wheel prints an error line
# about its UCX component whenever a window is made unless OMPI_MCA_osc=^ucx is set before MPI
# starts: set it there, where the user has not (it only helps if ringsync is imported before
# mpi4py.MPI). The machine test is transport/shm.py's FENCE, which imports MPI itself.
if _platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
    _os.environ.setdefault("OMPI_MCA_osc", "^ucx")

# The MPI world
from .context import is_initialized, local_rank, local_size, rank, size
from .startup import init, shutdown

# Collectives, their ops, uneven work, and what they raise when ranks disagree
from .ops import Average, Max, Min, Sum
from .collectives import allgather, allreduce, allreduce_, allreduce_fused_, barrier, broadcast, broadcast_
from .join import join
from .agreement import MismatchError
from .transport.shm import PeerFailedError

# Tensor fusion
from .fusion import FlatBuffer, grouped_allreduce, grouped_allreduce_

# Training
from .training.optim import SGD, DistributedOptimizer, broadcast_parameters

# GPU buffers
from .transport.gpu import GPUUnavailable, array_module, use_gpu

# Timing: probes, hooks, the straggler report (ringsync.timing)
from . import timing

__version__ = "0.1.0"

__all__ = [
    # the MPI world
    "init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
    # collectives
    "allreduce", "allreduce_", "allreduce_fused_", "broadcast", "broadcast_", "allgather",
    "barrier", "join", "Sum", "Average", "Min", "Max", "MismatchError", "PeerFailedError",
    # tensor fusion
    "grouped_allreduce", "grouped_allreduce_", "FlatBuffer",
    # training
    "SGD", "DistributedOptimizer", "broadcast_parameters",
    # GPU buffers
    "use_gpu", "array_module", "GPUUnavailable",
    # timing
    "timing",
]

"""ringsync: synchronous data-parallel training over a hand-written ring all-reduce.

    import ringsync as rs
    rs.init()
    total = rs.allreduce(np.ones(4), op=rs.Sum)   # every rank gets [p, p, p, p]
"""
from .agreement import MismatchError
from .buffers import GPUUnavailable, array_module, use_gpu
from .collectives import (
                          allgather,
                          allreduce,
                          allreduce_,
                          allreduce_fused_,
                          barrier,
                          broadcast,
                          broadcast_,
)
from .context import init, is_initialized, local_rank, local_size, rank, shutdown, size
from .fusion import FlatBuffer, grouped_allreduce, grouped_allreduce_
from .join import join
from .ops import Average, Max, Min, Sum
from .optim import SGD, DistributedOptimizer, broadcast_parameters

__version__ = "0.1.0"

__all__ = [
                          "SGD",
                          "Average",
                          "DistributedOptimizer",
                          "FlatBuffer",
                          "GPUUnavailable",
                          "Max",
                          "Min",
                          "MismatchError",
                          "Sum",
                          "allgather",
                          "allreduce",
                          "allreduce_",
                          "allreduce_fused_",
                          "array_module",
                          "barrier",
                          "broadcast",
                          "broadcast_",
                          "broadcast_parameters",
                          "grouped_allreduce",
                          "grouped_allreduce_",
                          "init",
                          "is_initialized",
                          "join",
                          "local_rank",
                          "local_size",
                          "rank",
                          "shutdown",
                          "size",
                          "use_gpu",
]

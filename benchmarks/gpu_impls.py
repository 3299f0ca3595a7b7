"""The GPU side of allreduce_sweep.py (--device gpu): all-reduce of a CuPy buffer, three ways.

  staged      rs.allreduce_ on the CuPy buffer, staged through pinned host memory (any MPI)
  cuda-aware  rs.allreduce_ handing device buffers to MPI (only if the MPI is CUDA-aware)
  mpi         the peer: MPI's own Allreduce -- on the device buffer when the MPI is
              CUDA-aware, else what a user would write without ringsync: copy to a pinned
              host buffer, Allreduce there, copy back
Every call ends with a stream synchronize, so its time covers the GPU work it queued.
Written on a machine without a GPU: run it (make test-gpu first) before trusting a figure.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

NAMES = ("staged", "cuda-aware", "mpi")


def setup(comm) -> tuple[object, str]:
    """Select this rank's GPU; return (cupy, a one-line description) or raise GPUUnavailable."""
    from ringsync.transport import gpu

    gpu.use_gpu()
    return gpu.import_cupy(), gpu.describe()


def zeros(cp, count: int, dtype: np.dtype):
    return cp.zeros(count, dtype=dtype)


def implementations(names: list[str], comm, buf) -> dict[str, Callable[[], None]]:
    """name -> a no-argument function that sums the CuPy `buf` across ranks, in place."""
    from mpi4py import MPI

    import ringsync as rs
    from ringsync.transport import gpu

    cp = gpu.import_cupy()
    stream = cp.cuda.get_current_stream()
    cuda_aware_mpi = gpu.mpi_cuda_support()[0]
    found: dict[str, Callable[[], None]] = {}

    def through(transport: str) -> Callable[[], None]:
        def call() -> None:
            gpu.force_transport(transport)
            rs.allreduce_(buf)
            stream.synchronize()
        return call

    for name in names:
        if name == "staged":
            found[name] = through(gpu.STAGED)
        elif name == "cuda-aware" and cuda_aware_mpi:
            found[name] = through(gpu.CUDA_AWARE)
        elif name == "mpi" and cuda_aware_mpi:
            def mpi_device() -> None:
                stream.synchronize()
                comm.Allreduce(MPI.IN_PLACE, buf)
            found[name] = mpi_device
        elif name == "mpi":
            host = cp.cuda.alloc_pinned_memory(max(buf.nbytes, 1))
            host = np.frombuffer(host, buf.dtype, buf.size)

            def mpi_staged(host=host) -> None:
                buf.get(out=host)                      # device -> pinned host (synchronous)
                comm.Allreduce(MPI.IN_PLACE, host)
                buf.set(host)
                stream.synchronize()
            found[name] = mpi_staged
    return found


def check(fn: Callable[[], None], comm, buf) -> str:
    """Run fn once on random data: 'ok' if it matches MPI's Allreduce on host copies and all
    ranks hold the same bits."""
    import zlib

    from mpi4py import MPI

    from ringsync.transport import gpu

    cp = gpu.import_cupy()
    rng = np.random.default_rng([7, comm.Get_rank()])
    data = rng.standard_normal(buf.size) if buf.dtype.kind == "f" else rng.integers(0, 4, buf.size)
    buf[...] = cp.asarray(data.astype(buf.dtype))
    wide = data.astype(buf.dtype).astype(np.float64)
    ref, scale = np.empty_like(wide), np.empty_like(wide)
    comm.Allreduce(wide, ref, op=MPI.SUM)
    comm.Allreduce(np.abs(wide), scale, op=MPI.SUM)
    fn()
    got = cp.asnumpy(buf)
    eps = np.finfo(buf.dtype).eps if buf.dtype.kind == "f" else 0.0
    close = bool(np.all(np.abs(got.astype(np.float64) - ref) <= 2 * comm.Get_size() * eps * scale))
    same = len(set(comm.allgather(zlib.crc32(got.tobytes())))) == 1
    ok = comm.allreduce(int(close and same), op=MPI.MIN)
    buf[...] = 0
    return "ok" if ok else ("WRONG" if not close else "differs-across-ranks")

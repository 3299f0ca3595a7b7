"""All-reduce CuPy arrays on the GPU: the device path in a dozen lines.

    mpiexec -n 2 python examples/gpu_allreduce.py      # 2 ranks may share one GPU

Each rank takes a GPU (local rank mod the device count), fills an array on it, and averages
it across ranks; the result is a CuPy array on the same GPU, identical on every rank.
Without CuPy or a GPU it says why and exits 2.
"""
import sys

import numpy as np

import ringsync as rs

rs.init()
try:
    device = rs.use_gpu()                      # RINGSYNC_GPU_DEVICE overrides the choice
except rs.GPUUnavailable as exc:
    if rs.rank() == 0:
        print(f"gpu_allreduce.py: {exc}", file=sys.stderr)
    sys.exit(2)
import cupy as cp  # only now: we know CuPy works

from ringsync.transport import gpu

grads = cp.arange(8, dtype=cp.float32) + rs.rank()    # this rank's "gradient", on its GPU
mean = rs.allreduce(grads, op=rs.Average)              # a CuPy array, on the same GPU
expected = np.arange(8, dtype=np.float32) + (rs.size() - 1) / 2
same = rs.allgather(np.frombuffer(cp.asnumpy(mean).tobytes(), np.uint8)[None, :])
if rs.rank() == 0:
    print(f"{rs.size()} rank(s), transport {gpu.transport()}; rank 0 on device {device}")
    print(f"mean = {cp.asnumpy(mean)}")
    print(f"as expected: {'yes' if np.allclose(cp.asnumpy(mean), expected) else 'NO'}; "
          f"bitwise identical on all ranks: {'yes' if (same == same[0]).all() else 'NO'}")

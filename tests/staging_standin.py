"""A NumPy stand-in for a GPU, to test the staged transport's bookkeeping on any CPU.

It implements buffers.Stager with host arrays. Like a CUDA stream it does NOT run queued
copies and reductions when they are queued: they run, in order, only when the host waits on
an event recorded after them. So a missing wait leaves stale data, and a test notices.
This is logic coverage of the staging code only: nothing here exercises CuPy or a GPU.
"""
from __future__ import annotations

import numpy as np

from ringsync.transport.gpu import ScratchCache


class HostStandIn:
    """buffers.Stager on NumPy arrays, with stream-like deferred execution."""

    def __init__(self) -> None:
        self.cache = ScratchCache({kind: lambda n, dt: np.full(n, 99, dtype=dt)
                                   for kind in ("device", "pinned", "inbox")})
        self.queue: list = []     # queued work, in stream order
        self.done = 0             # how much of the queue has run
        self.waits = 0

    def scratch(self, kind, count, dtype):
        return self.cache.get(kind, count, dtype)

    def to_host(self, src, dst):
        assert src.shape == dst.shape, (src.shape, dst.shape)
        self.queue.append(lambda: np.copyto(dst, src))

    def to_device(self, src, dst):
        assert src.shape == dst.shape, (src.shape, dst.shape)
        self.queue.append(lambda: np.copyto(dst, src))

    def reduce(self, ufunc, acc, other):
        self.queue.append(lambda: ufunc(acc, other, out=acc))

    def record(self):
        return len(self.queue)

    def wait(self, event):
        self.waits += 1
        for work in self.queue[self.done:event]:
            work()
        self.done = max(self.done, event)


class ForgetfulStandIn(HostStandIn):
    """A broken device whose wait() returns before the work is done: staging must go wrong."""

    def wait(self, event):
        self.waits += 1

"""Separate arrays read and written as one concatenated buffer that is never built.

Fusion (fusion.py) all-reduces many separate arrays as one buffer. Horovod packs them into a
fusion buffer, reduces it and unpacks it: two passes over the memory on top of the
all-reduce's own. Through shared memory (shared.py) the all-reduce copies its input into
the node's segment and its result back out anyway, so those copies can take the arrays
straight from where they lie, and put the results straight back: a `Scattered` bucket is
what shared.py reads from and writes to instead of one contiguous array.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import numpy as np

from .. import ops
from ..transport.memcopy import CHECKED_BYTES, copy_


class Scattered:
    """Arrays of one dtype, seen as elements [0, size) of their concatenation, in order.

    The arrays are 1-D or C-contiguous (reshaped to 1-D: a view). A call costs a few
    microseconds of Python per array, the same as packing them would: the copies themselves
    run in NumPy, and an array that lies whole inside a range is used as it is, not sliced.
    """

    __slots__ = ("arrays", "dtype", "itemsize", "large", "nbytes", "shape", "size", "starts")

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        self.arrays = [a if a.ndim == 1 else a.reshape(-1) for a in arrays]
        sizes = [a.size for a in self.arrays]
        self.starts = list(itertools.accumulate(sizes, initial=0))
        self.size = self.starts[-1]
        self.dtype = self.arrays[0].dtype
        self.itemsize = self.dtype.itemsize
        self.nbytes = self.size * self.itemsize
        self.shape = (self.size,)
        # Whether some array is large enough for memcpy's trap to matter (transport/memcopy.py)
        self.large = max(sizes, default=0) * self.itemsize >= CHECKED_BYTES

    def _parts(self, lo: int, hi: int) -> list[np.ndarray]:
        """The parts of the arrays that hold elements [lo, hi), in order (empty ones left out)."""
        starts, arrays = self.starts, self.arrays
        i = bisect.bisect_right(starts, lo) - 1             # the array element `lo` lies in
        parts = []
        while lo < hi:
            start, end = starts[i], starts[i + 1]
            if end > lo:
                stop = min(hi, end)
                parts.append(arrays[i] if lo == start and stop == end else arrays[i][lo - start:stop - start])
                lo = stop
            i += 1
        return parts

    def read(self, lo: int, hi: int, out: np.ndarray) -> None:
        """out[:] = elements [lo, hi)."""
        if hi > lo and not self.large:
            np.concatenate(self._parts(lo, hi), out=out)    # (one NumPy call for all the copies)
        elif hi > lo:
            at = 0
            for part in self._parts(lo, hi):
                copy_(out[at:at + part.size], part)
                at += part.size

    def write(self, lo: int, hi: int, src: np.ndarray) -> None:
        """Elements [lo, hi) = src."""
        at = 0
        for part in self._parts(lo, hi):
            n = part.size
            if self.large:
                copy_(part, src[at:at + n])
            else:
                part[...] = src[at:at + n]      # (cheaper than np.copyto or copy_ for many small copies)
            at += n

    def all_finite(self) -> bool:
        """No NaN or Inf in any of the arrays."""
        return all(ops.all_finite(a) for a in self.arrays)

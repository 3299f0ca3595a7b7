"""The small all-reduce that rides on the agreement check: reduce p gathered buffers in rank order.

With the agreement check on (the default), a buffer of at most RINGSYNC_SMALL_BYTES travels
inside the check's opening (agreement.py): an all-gather of every rank's block in ceil(log2 p)
rounds, Bruck's pattern. Afterwards each rank holds all p buffers, and only the reduction is
left: the same additions, in the same order, on every rank, so every rank gets the same bits,
and no message is sent beyond the opening's. It sends (p-1)n bytes per rank where recursive
doubling sends n log2 p, which is why it is for small buffers, where latency is all that counts.
"""
from __future__ import annotations

import numpy as np


def reduce_gathered_(buf: np.ndarray, slots: list[np.ndarray], reduce: np.ufunc, r: int) -> np.ndarray:
    """buf = slot of rank 0 (op) rank 1 (op) ... (op) rank p-1, where slots[i] holds rank r+i's data.

    The operand order is fixed (lower rank first), so every rank computes the same bits,
    even for min/max of +0 and -0 or of two NaNs.
    """
    p = len(slots)
    first, second = slots[-r % p], slots[(1 - r) % p]
    reduce(first, second, out=buf)
    for q in range(2, p):
        reduce(buf, slots[(q - r) % p], out=buf)
    return buf

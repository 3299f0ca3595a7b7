"""Recursive doubling: the all-reduce for small buffers when the agreement check is off, in
ceil(log2 p) rounds (+2 when p is not a power of two). (With the check on, small buffers ride
on the check's own messages instead: gathered.py.)

The ring sends 2(p-1) messages; for a few kilobytes each message costs its latency, not its
bytes, so fewer, larger messages win. Recursive doubling: in round k rank r swaps its whole
buffer with partner r XOR 2^k and both reduce. After round k every rank holds the reduction
of a group of 2^(k+1) ranks; after log2 p rounds, of all of them. It sends n*log2(p) per
rank instead of the ring's 2n(p-1)/p, which is why it is only for small buffers.

Same bits on every rank: the two partners compute reduce(lower rank's data, higher rank's
data) in that operand order. Addition is commutative in IEEE arithmetic, but min/max of +0
and -0, or of two NaNs, return whichever operand came first; a fixed order removes the doubt.

When p is not a power of two (p = 2^m + rem), the first 2*rem ranks pair up first: each even
one hands its buffer to its odd neighbour and sits out; the 2^m ranks left do recursive
doubling; the odd ones then hand the result back. (The scheme MPICH uses.)
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from mpi4py import MPI

from ..transport.p2p import recv, send, sendrecv


@lru_cache(maxsize=256)
def doubling_plan(p: int, r: int) -> tuple[int, int, tuple[int, ...]]:
    """Rank r's part on p ranks, worked out once: (gives_to, takes_from, partners).

    gives_to >= 0: r hands its buffer to that rank and sits out (then gets the result back).
    takes_from >= 0: r first adds that rank's buffer (and afterwards hands it the result).
    partners: the ranks r swaps buffers with, one per doubling round.
    """
    pof2 = 1 << (p.bit_length() - 1)       # largest power of two <= p
    rem = p - pof2
    if r < 2 * rem and r % 2 == 0:          # fold: an even rank among the first 2*rem
        return r + 1, -1, ()
    vrank = r // 2 if r < 2 * rem else r - rem
    # Virtual ranks 0..pof2-1, partner differs in one bit per round, mapped back to real ranks.
    vpartners = [vrank ^ (1 << k) for k in range(pof2.bit_length() - 1)]
    partners = tuple(2 * v + 1 if v < rem else v + rem for v in vpartners)
    return -1, (r - 1 if r < 2 * rem else -1), partners


def recursive_doubling_allreduce_(buf: np.ndarray, comm: MPI.Comm, reduce: np.ufunc,
                                  scratch: np.ndarray) -> np.ndarray:
    """Reduce the 1-D contiguous `buf` across `comm` in place; `scratch` holds buf.size elements."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.size == 0:
        return buf
    if p == 2:
        # Two ranks, the common case, spelled out: one swap, one reduce (no plan to look up).
        partner = 1 - r
        sendrecv(comm, buf, partner, scratch, partner)
        if r == 1:
            reduce(scratch, buf, out=buf)   # lower rank's data first
        else:
            reduce(buf, scratch, out=buf)
        return buf
    gives_to, takes_from, partners = doubling_plan(p, r)

    # Fold: among the first 2*rem ranks, evens give their data to the odd rank above them.
    if gives_to >= 0:
        send(comm, buf, gives_to)
        recv(comm, buf, gives_to)     # ... and, at the end, get the result back
        return buf
    if takes_from >= 0:
        recv(comm, scratch, takes_from)
        reduce(scratch, buf, out=buf)       # lower rank's data first

    # Double: swap whole buffers with each partner in turn, reducing in rank order.
    for partner in partners:
        sendrecv(comm, buf, partner, scratch, partner)
        if partner < r:
            reduce(scratch, buf, out=buf)
        else:
            reduce(buf, scratch, out=buf)

    # Unfold: the rank that sat out gets the finished result, a copy of ours.
    if takes_from >= 0:
        send(comm, buf, takes_from)
    return buf

"""Recursive doubling: the all-reduce for small buffers, in ceil(log2 p) rounds (+2 when p is odd-sized).

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

from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI

if TYPE_CHECKING:
    from .agreement import Checker as Guard


def recursive_doubling_allreduce_(buf: np.ndarray, comm: MPI.Comm, reduce: np.ufunc,
                                  scratch: np.ndarray, guard: Guard | None = None) -> np.ndarray:
    """Reduce the 1-D contiguous `buf` across `comm` in place; `scratch` holds buf.size elements.

    `guard` (agreement.py) checks first that every rank makes the same call; if they do not,
    it returns with `buf` untouched and `guard.bad` set.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.size == 0:
        return buf
    if guard is not None and p > 2:
        guard.agree(comm)                   # p-1 empty guarded ring steps first
        if guard.bad:
            return buf
    pof2 = 1 << (p.bit_length() - 1)       # largest power of two <= p
    rem = p - pof2

    # Fold: among the first 2*rem ranks, evens give their data to the odd rank above them.
    if r < 2 * rem:
        if r % 2 == 0:
            comm.Send(buf, dest=r + 1)
            vrank = -1                      # sits out the doubling
        else:
            comm.Recv(scratch, source=r - 1)
            reduce(scratch, buf, out=buf)   # lower rank's data first
            vrank = r // 2
    else:
        vrank = r - rem

    # Double: virtual ranks 0..pof2-1, partner differs in one bit per round.
    if vrank >= 0:
        mask = 1
        while mask < pof2:
            vpartner = vrank ^ mask
            partner = 2 * vpartner + 1 if vpartner < rem else vpartner + rem
            if guard is not None and p == 2:
                # Two ranks: this one exchange is also the ring's one step, so the agreement
                # check rides on it; buf is not written unless both ranks agree.
                guard.sendrecv(comm, buf, partner, scratch, partner)
                if guard.bad:
                    return buf
            else:
                comm.Sendrecv(buf, dest=partner, recvbuf=scratch, source=partner)
            if partner < r:
                reduce(scratch, buf, out=buf)
            else:
                reduce(buf, scratch, out=buf)
            mask <<= 1

    # Unfold: the ranks that sat out get the finished result, a copy of their neighbour's.
    if r < 2 * rem:
        if r % 2 == 1:
            comm.Send(buf, dest=r - 1)
        else:
            comm.Recv(buf, source=r + 1)
    return buf

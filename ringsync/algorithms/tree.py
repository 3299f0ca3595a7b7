"""Broadcast along a binomial tree, and a dissemination barrier: log2(p) rounds each.

A ring would take p-1 rounds to spread one buffer from a root; a tree doubles the number of
ranks that hold the data every round, so ceil(log2 p) rounds suffice.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ..transport.p2p import recv, send, sendrecv

_EMPTY = np.empty(0, dtype=np.uint8)


def tree_broadcast_(buf: np.ndarray, comm: MPI.Comm, root: int) -> np.ndarray:
    """Copy `buf` from `root` to every rank of `comm`, in place, along a binomial tree."""
    p = comm.Get_size()
    if p == 1:
        return buf
    # Renumber so the root is virtual rank 0; the tree is built on virtual ranks.
    vrank = (comm.Get_rank() - root) % p

    # Receive once, from the parent: vrank with its lowest set bit cleared.
    mask = 1
    while mask < p:
        if vrank & mask:
            recv(comm, buf, (vrank - mask + root) % p)
            break
        mask <<= 1
    # Then pass it on to the children, vrank + mask/2, vrank + mask/4, ..., vrank + 1.
    mask >>= 1
    while mask > 0:
        if vrank + mask < p:
            send(comm, buf, (vrank + mask + root) % p)
        mask >>= 1
    return buf


def dissemination_barrier(comm: MPI.Comm) -> None:
    """Return only once every rank of `comm` has entered: round k signals rank r + 2^k.

    After round k each rank has heard, directly or through others, from the 2^(k+1) ranks
    behind it; after ceil(log2 p) rounds, from everyone.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    distance = 1
    while distance < p:
        sendrecv(comm, _EMPTY, (r + distance) % p, _EMPTY, (r - distance) % p)
        distance <<= 1

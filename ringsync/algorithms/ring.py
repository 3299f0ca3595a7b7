"""The ring all-reduce: reduce-scatter, then all-gather, over point-to-point messages.

Start here. This is the whole algorithm behind Horovod, NCCL's ring and Baidu's allreduce.

The problem: p ranks each hold a buffer of n numbers; every rank needs the elementwise
reduction (say, the sum) of all p buffers. Sending everything to one rank and back costs
that rank p*n of traffic. The ring does better: arrange the ranks in a circle, each one
talking only to its neighbours, cut the buffer into p chunks, and keep every link busy.

    rank r sends to rank r+1 (its right neighbour) and receives from rank r-1 (its left).

Phase 1, reduce-scatter (p-1 steps): at each step every rank sends one chunk to the right
and adds the chunk arriving from the left into its own copy. A chunk's partial sum travels
around the ring picking up one rank's contribution per hop; after p-1 hops it holds all p.
Rank r ends owning the complete chunk (r+1) mod p.

Phase 2, all-gather (p-1 steps): the finished chunks travel around the ring once more, now
overwriting instead of adding, until every rank holds every finished chunk.

Cost: each rank sends 2(p-1) chunks of n/p elements, i.e. 2(p-1)/p * n in all. That is
the least any all-reduce can send per rank, and it does not grow with p: the ring is
bandwidth-optimal. (Its weakness is latency: 2(p-1) message rounds, which hurts for tiny
buffers.)

Determinism: each chunk is reduced exactly once, on one path around the ring, in one order,
and then copied. So every rank ends with bitwise identical results, floats included.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from mpi4py import MPI

# Messages travel as raw bytes: MPI only moves them (transport/p2p.py's sendrecv is
# comm.Sendrecv, with the communication thread's patient waits: handles.py).
from ..transport.p2p import sendrecv

# Optional callback for teaching tools: observe(phase, step) after every step.
Observer = Callable[[str, int], None]



def chunk_bounds(n: int, p: int) -> list[tuple[int, int]]:
    """Cut n elements into p contiguous (start, stop) chunks whose sizes differ by at most one.

    The first n % p chunks get one extra element, so any n works: 0, 1, fewer than p, or
    not divisible by p (some chunks are then empty, which the ring handles unchanged).
    """
    base, extra = divmod(n, p)
    bounds, start = [], 0
    for i in range(p):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def ring_allreduce_(buf: np.ndarray, comm: MPI.Comm, reduce: np.ufunc,
                    scratch: np.ndarray | None = None,
                    observe: Observer | None = None) -> np.ndarray:
    """Reduce the 1-D contiguous `buf` across all ranks of `comm`, in place, with `reduce`.

    `reduce` is a binary ufunc (np.add, np.minimum, ...). `scratch` is an optional receive
    buffer with room for the largest chunk (chunk 0); passing one avoids an allocation.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.size == 0:
        return buf
    right, left = (r + 1) % p, (r - 1) % p

    # Views into buf, one per chunk: no copies, the ring works on the buffer itself.
    chunks = [buf[start:stop] for start, stop in chunk_bounds(buf.size, p)]
    if scratch is None:
        scratch = np.empty(chunks[0].size, dtype=buf.dtype)

    # Phase 1: reduce-scatter. At step s rank r sends chunk r-s and receives chunk r-s-1,
    # which it folds into its own copy. The chunk it sends at step s+1 is the one it just
    # reduced, so partial sums keep moving right, one contribution richer per hop.
    for step in range(p - 1):
        outgoing = chunks[(r - step) % p]
        mine = chunks[(r - step - 1) % p]
        incoming = scratch[:mine.size]
        sendrecv(comm, outgoing, right, incoming, left)
        reduce(mine, incoming, out=mine)
        if observe:
            observe("reduce-scatter", step)

    # Rank r now owns the fully reduced chunk r+1. Phase 2 passes the owned chunks around.
    ring_allgather_(chunks, comm, owned=(r + 1) % p, observe=observe)
    return buf


def ring_allgather_(chunks: list[np.ndarray], comm: MPI.Comm, owned: int,
                    observe: Observer | None = None) -> None:
    """All-gather around the ring: this rank holds chunks[owned]; afterwards it holds them all.

    Chunks may have different sizes (allgather of ragged arrays uses that), but every rank
    must pass the same sizes. Rank r+1 must own chunk owned+1, and so on around the ring.
    """
    p = comm.Get_size()
    right, left = (comm.Get_rank() + 1) % p, (comm.Get_rank() - 1) % p
    for step in range(p - 1):
        # Send the newest finished chunk on; receive the next one straight into place.
        outgoing = chunks[(owned - step) % p]
        incoming = chunks[(owned - step - 1) % p]
        sendrecv(comm, outgoing, right, incoming, left)
        if observe:
            observe("all-gather", step)

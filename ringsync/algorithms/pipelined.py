"""The ring of ring.py, pipelined for large buffers.

Same algorithm, same result bits as ring.py (read that first). Three changes pay for large
buffers:

1. Segments. In the reduce-scatter each chunk travels in segments of `segment` bytes
   (RINGSYNC_SEGMENT_BYTES). A segment lands in a small scratch buffer that stays in the
   CPU cache, so the add that follows reads it from cache instead of main memory; a whole
   chunk-sized scratch would have been evicted long before the add reached its end.
2. Pipelining. The receive of segment i+1 is posted (Irecv) before segment i is reduced,
   into the other half of a double buffer, so the transport can move i+1 while we add i.
   All sends of a step are posted at once (Isend): the chunk being sent is not written in
   that step, so nothing has to wait for it.
3. Plans and scratch are cached: chunk and segment bounds per (n, p, segment), receive
   buffers from the World's scratch cache. A call allocates no buffer.

The all-gather needs no change: it already receives each chunk straight into place.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from mpi4py import MPI

from ..transport.p2p import BYTE, TAG, wait, waitall
from .ring import chunk_bounds, ring_allgather_


@lru_cache(maxsize=256)
def ring_plan(n: int, p: int, segment: int) -> tuple[tuple[slice, ...], tuple[tuple[slice, ...], ...]]:
    """(chunk slices, per-chunk segment slices) for n elements on p ranks, segments of `segment` elements.

    Every rank builds the same plan, so a chunk is cut into the same segments by its sender
    and by its receiver.
    """
    bounds = chunk_bounds(n, p)
    chunks = tuple(slice(a, b) for a, b in bounds)
    segments = tuple(tuple(slice(s, min(s + segment, b)) for s in range(a, b, segment)) or (slice(a, a),)
                     for a, b in bounds)
    return chunks, segments


def pipelined_ring_allreduce_(buf: np.ndarray, comm: MPI.Comm, reduce: np.ufunc,
                              scratch: np.ndarray, segment: int) -> np.ndarray:
    """ring.ring_allreduce_ with segmented, pipelined reduce-scatter steps; in place, same bits.

    `segment` is the segment length in elements; `scratch` is a 1-D buffer of the same dtype
    with room for two segments (2 * min(segment, largest chunk) elements).
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.size == 0:
        return buf
    right, left = (r + 1) % p, (r - 1) % p
    chunk_slices, segment_slices = ring_plan(buf.size, p, segment)
    half = scratch.size // 2
    slots = (scratch[:half], scratch[half:2 * half])

    for step in range(p - 1):
        send_segments = segment_slices[(r - step) % p]
        mine_segments = segment_slices[(r - step - 1) % p]
        # Receive segment i into slot i % 2; post the next receive before reducing this one.
        # (Receives go first, so the left neighbour's data finds them waiting.)
        pending = comm.Irecv([slots[0][:mine_segments[0].stop - mine_segments[0].start], BYTE], source=left, tag=TAG)
        sends = [comm.Isend([buf[s], BYTE], dest=right, tag=TAG) for s in send_segments]
        for i, seg in enumerate(mine_segments):
            incoming = slots[i % 2][:seg.stop - seg.start]
            arrived = pending
            if i + 1 < len(mine_segments):
                nxt = mine_segments[i + 1]
                pending = comm.Irecv([slots[(i + 1) % 2][:nxt.stop - nxt.start], BYTE], source=left, tag=TAG)
            wait(arrived)
            mine = buf[seg]
            reduce(mine, incoming, out=mine)
        waitall(sends)

    ring_allgather_([buf[s] for s in chunk_slices], comm, owned=(r + 1) % p)
    return buf

"""The ring for GPU buffers on an MPI that reads only host memory: staged through pinned buffers.

Each reduce-scatter step copies the outgoing chunk device -> pinned host, exchanges host
buffers, copies the incoming chunk host -> device and reduces it on the GPU, in segments so
that copies, messages and reductions overlap. Same chunks and reduction order as ring.py,
hence the same bits. The device is reached through transport/gpu.py's `Stager` interface.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from mpi4py import MPI

from ..transport.p2p import BYTE, TAG
from .ring import chunk_bounds, ring_allgather_
from .tree import tree_broadcast_

if TYPE_CHECKING:
    from ..transport.gpu import Stager


def segments(n: int, size: int) -> list[tuple[int, int]]:
    """Cut n elements into consecutive (start, stop) pieces of at most `size` (none when n is 0)."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def staged_allreduce_(buf: Any, comm: MPI.Comm, reduce: np.ufunc, dev: Stager,
                      segment: int) -> None:
    """The ring all-reduce of the device buffer `buf`, in place, for an MPI that only reads host
    memory: reduce-scatter with the reduction on the device, then the all-gather on the host.

    Same chunks, same order of reduction as ring_allreduce_, hence the same bits.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    if p == 1 or buf.size == 0:
        return
    right, left = (r + 1) % p, (r - 1) % p
    bounds = chunk_bounds(buf.size, p)
    chunks = [buf[a:b] for a, b in bounds]
    host = dev.scratch("pinned", buf.size, buf.dtype)      # pinned mirror of buf
    hchunks = [host[a:b] for a, b in bounds]
    inbox = dev.scratch("inbox", bounds[0][1], buf.dtype)   # pinned: arriving chunk lands here
    landed = dev.scratch("device", bounds[0][1], buf.dtype)  # ...then here, on the device

    # Phase 1: reduce-scatter, as in ring.py, one staged exchange per step.
    inbox_free = dev.record()
    for step in range(p - 1):
        out_i, in_i = (r - step) % p, (r - step - 1) % p
        inbox_free = _staged_step(chunks[out_i], hchunks[out_i], chunks[in_i], inbox, landed,
                                  inbox_free, comm, right, left, reduce, dev, segment)

    # Phase 2: all-gather. Nothing is reduced any more, so it runs on the pinned mirror; each
    # finished chunk is copied back to the device as soon as it arrives, overlapping the
    # copy with the next step's exchange.
    owned = (r + 1) % p
    dev.to_host(chunks[owned], hchunks[owned])
    dev.wait(dev.record())

    def land(phase: str, step: int) -> None:
        arrived = (owned - step - 1) % p
        dev.to_device(hchunks[arrived], chunks[arrived])

    ring_allgather_(hchunks, comm, owned=owned, observe=land)
    dev.wait(dev.record())   # all copies done: buf is complete and the pinned buffers are free


def _staged_step(out_dev: Any, out_host: np.ndarray, in_dev: Any, inbox: np.ndarray,
                 landed: Any, inbox_free: Any, comm: MPI.Comm, right: int, left: int,
                 reduce: np.ufunc, dev: Stager, segment: int) -> Any:
    """One reduce-scatter step: send out_dev to the right, fold what comes from the left into
    in_dev, segment by segment. `inbox` may be written once `inbox_free` is reached; returns
    the event after which it may be written again."""
    sends, recvs = segments(out_dev.size, segment), segments(in_dev.size, segment)
    # Queue every device -> host copy at once, each followed by an event saying "ready".
    ready = []
    for a, b in sends:
        dev.to_host(out_dev[a:b], out_host[a:b])
        ready.append(dev.record())
    # Post the receives (before any send, so no rank waits on another to post them) once the
    # last step's inbox -> device copies are done; one tag is enough because MPI keeps the
    # messages between two ranks on one tag in order.
    dev.wait(inbox_free)
    incoming = [comm.Irecv([inbox[a:b], BYTE], source=left, tag=TAG) for a, b in recvs]
    # Send each segment as soon as its copy has landed in pinned memory.
    outgoing = []
    for (a, b), event in zip(sends, ready):
        dev.wait(event)
        outgoing.append(comm.Isend([out_host[a:b], BYTE], dest=right, tag=TAG))
    # As each segment arrives, queue its copy to the device and its reduction there; the host
    # goes straight back to waiting for the next segment while the GPU works.
    for (a, b), request in zip(recvs, incoming):
        request.Wait()
        dev.to_device(inbox[a:b], landed[a:b])
        dev.reduce(reduce, in_dev[a:b], landed[a:b])
    MPI.Request.Waitall(outgoing)
    return dev.record()


def staged_broadcast_(buf: Any, comm: MPI.Comm, root: int, dev: Stager) -> None:
    """Broadcast the device buffer `buf` from `root` via a pinned host copy and the tree."""
    host = dev.scratch("pinned", buf.size, buf.dtype)
    if comm.Get_rank() == root:
        dev.to_host(buf, host)
        dev.wait(dev.record())
    tree_broadcast_(host, comm, root)
    if comm.Get_rank() != root:
        dev.to_device(host, buf)
        dev.wait(dev.record())


def staged_allgather_(blocks: list[Any], comm: MPI.Comm, owned: int, dev: Stager) -> None:
    """ring_allgather_ for consecutive device views `blocks` of one buffer, staged through
    a pinned mirror; each block is copied to the device as soon as it arrives."""
    sizes = [b.size for b in blocks]
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(int)
    host = dev.scratch("pinned", int(offsets[-1]), blocks[0].dtype)
    hblocks = [host[offsets[i]:offsets[i + 1]] for i in range(len(blocks))]
    dev.to_host(blocks[owned], hblocks[owned])
    dev.wait(dev.record())

    def land(phase: str, step: int) -> None:
        arrived = (owned - step - 1) % len(blocks)
        dev.to_device(hblocks[arrived], blocks[arrived])

    ring_allgather_(hblocks, comm, owned=owned, observe=land)
    dev.wait(dev.record())

"""All-reduce through shared memory within a node, and across nodes (hierarchical).

Read ring.py first: this is the same reduce-scatter + all-gather, with the messages
replaced by reads of the other ranks' memory (transport/shm.py's segment).

Within one node of L ranks, for each piece of the buffer that fits a slot:

  1. copy in     every rank copies its piece into its own slot (the chunks it reduces
                 itself it reads where they are, and skips);             sync
  2. reduce      the piece is cut into chunks; the owner of a chunk reads that chunk from
                 all L slots, reduces them in rank order and writes the result into its
                 own slot;                                                   sync
  3. copy out    every rank copies every finished chunk from its owner's slot.

Each chunk is reduced once, by one rank, in one order, and then copied: every rank gets the
same bits. A rank moves n bytes in, n out and reads n to reduce its share, with no message
and two sync points per piece, which cost well under a microsecond each. (A fusion bucket
of separate arrays, scattered.py, is copied in and out the same way, array by array, with
no fusion buffer between.) Pieces alternate between a rank's two slots, so one rank may
already copy in the next piece while another still copies out the last.

Zero-copy. When the buffer itself lives in a shared window (a FlatBuffer made with
shared=True, as the trainer's gradients are), step 1 disappears: the owners read the
chunks straight from the other ranks' buffers and write the result into their own, and
everyone then copies the finished chunks from the owners' buffers. One more sync at the
end keeps any rank from changing its buffer while another still reads it. An average
divides each input as the owner reads it, before the sum (reduce_scaled_into_), as the
copy-in path does on the way into the slots: the same bits, and no overflow.

Small broadcasts and all-gathers on one node take the same road (below): the root, or every
rank, copies its data into its slot (piece by piece, if it is larger), one sync each, and
the others copy it out, with no message (collectives.py says which sizes: larger ones take
the tree or the ring).

Across nodes (Horovod's hierarchical all-reduce), with nodes of L_j ranks and G = the largest
L_j: cut each piece into G chunks. On node j, local rank l owns the chunks c with
c mod L_j == l (on a smaller node a rank owns several). After step 2 the owner of chunk c on
each node holds that node's partial result for c; the owners of chunk c, one per node, run
the ring (ring.py) over it, each on a communicator of its own; then step 3 copies the chunks
out within each node. Nodes of different sizes still pair up, chunk by chunk: with nodes of
2 and 1 ranks, chunk 0's ring joins node A's rank 0 with node B's rank, chunk 1's joins
node A's rank 1 with the same rank of B, which runs its two rings one after the other.
Every rank runs its rings in increasing chunk order, so they cannot deadlock: the lowest
unfinished chunk's ring always has all its ranks.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from mpi4py import MPI

from ..transport.memcopy import copy_
from ..transport.shm import NodeSegment
from .ring import chunk_bounds, ring_allreduce_
from .scattered import Scattered


def reduce_into_(out: np.ndarray, operands: Sequence[np.ndarray], reduce: np.ufunc,
                 scratch: np.ndarray) -> None:
    """out = operands[0] (op) operands[1] (op) ..., in that order; `out` may be one of them.

    Partial results go to `scratch` (room for out.size) until the last step, so an operand
    that is also `out` is read before it is overwritten.
    """
    p = len(operands)
    if p == 1:
        if out is not operands[0]:
            copy_(out, operands[0])         # (a node of one rank: the user's buffer into its slot)
        return
    acc = out if p == 2 else scratch[:out.size]
    reduce(operands[0], operands[1], out=acc)
    for q in range(2, p):
        reduce(acc, operands[q], out=out if q == p - 1 else acc)


def owned_chunks(chunks: int, local_size: int, local_rank: int) -> list[int]:
    """The chunks (of `chunks`) a rank owns on a node of `local_size` ranks: c mod L == l."""
    return list(range(local_rank, chunks, local_size))


def shared_allreduce_(flat: np.ndarray | Scattered, seg: NodeSegment, reduce: np.ufunc,
                      scratch: np.ndarray, rings: Sequence[tuple[int, MPI.Comm]] = (),
                      chunks: int = 0, prescale: int = 0) -> np.ndarray | Scattered:
    """All-reduce the 1-D `flat` in place through the node's segment (and `rings` across nodes).

    `flat` may also be separate arrays (a fusion bucket, scattered.py): copied straight into
    the slots and back. `chunks` is G (the largest node's size; default this node's); `rings`
    lists (chunk, communicator of that chunk's owners on every node) for the chunks this rank
    owns, in increasing order (none on a single node). `scratch` has room for one slot's worth
    of elements. `prescale` > 0 divides the input by it on the way in (an average).
    """
    L, me = seg.size, seg.rank
    chunks = chunks or L
    ring_of = dict(rings)
    mine = owned_chunks(chunks, L, me)
    piece = seg.capacity(flat.itemsize)
    contiguous = type(flat) is not Scattered
    # This rank's own chunks are read where they lie, unless they must be copied in anyway.
    in_place = contiguous and not prescale
    for start in range(0, flat.size, piece):
        m = min(piece, flat.size - start)
        part = flat[start:start + m] if contiguous else None
        parity = seg.begin()
        slots = seg.views(parity, flat.dtype, m)
        bounds = chunk_bounds(m, chunks)
        if in_place:                                    # 1. copy in, only the chunks others
            for c, (lo, hi) in enumerate(bounds):       # reduce
                if c % L != me:
                    copy_(slots[me][lo:hi], part[lo:hi])
        elif contiguous:                                # (divided, for an average)
            np.divide(part, prescale, out=slots[me])
        else:
            flat.read(start, start + m, slots[me])
            if prescale:
                np.divide(slots[me], prescale, out=slots[me])
        seg.sync()
        for c in mine:                                  # 2. reduce the chunks this rank owns
            lo, hi = bounds[c]
            if hi > lo:
                operands = [s[lo:hi] for s in slots]
                if in_place:
                    operands[me] = part[lo:hi]
                reduce_into_(slots[me][lo:hi], operands, reduce, scratch)
                ring = ring_of.get(c)
                if ring is not None:                    # ... and across nodes
                    ring_allreduce_(slots[me][lo:hi], ring, reduce, scratch)
        seg.sync()
        for c, (lo, hi) in enumerate(bounds):           # 3. copy out
            if contiguous:
                copy_(part[lo:hi], slots[c % L][lo:hi])
            else:
                flat.write(start + lo, start + hi, slots[c % L][lo:hi])
    return flat


def shared_gathered_allreduce_(flat: np.ndarray, seg: NodeSegment, reduce: np.ufunc,
                               prescale: int = 0) -> np.ndarray:
    """A small buffer (at most one slot): copy in, one sync, and every rank reduces all L
    copies itself, in rank order (the same bits everywhere; gathered.py does the same with
    the copies an opening has carried)."""
    parity = seg.begin()
    slots = seg.views(parity, flat.dtype, flat.size)
    if prescale:
        np.divide(flat, prescale, out=slots[seg.rank])
    else:
        copy_(slots[seg.rank], flat)
    seg.sync()
    if seg.size == 1:
        flat[...] = slots[0]
        return flat
    reduce(slots[0], slots[1], out=flat)
    for q in range(2, seg.size):
        reduce(flat, slots[q], out=flat)
    return flat


def reduce_scaled_into_(out: np.ndarray, operands: Sequence[np.ndarray], reduce: np.ufunc,
                        scratch: np.ndarray, prescale: int) -> None:
    """out = operands[0]/c (op) operands[1]/c (op) ..., in that order (c = `prescale`): what
    reduce_into_ gives on copies divided by c, as the copy-in path's slots are, bit for bit,
    with no copy and without writing the operands (the other ranks' buffers). Block by block
    through `scratch` (room for two blocks, scaled_scratch): each block stays in the cache
    between its division and its sum. `out` may be one of the operands."""
    block = scratch.size // 2
    acc, tmp = scratch[:block], scratch[block:2 * block]
    for lo in range(0, out.size, block):
        hi = min(lo + block, out.size)
        a, t = acc[:hi - lo], tmp[:hi - lo]
        np.divide(operands[0][lo:hi], prescale, out=a if len(operands) > 1 else out[lo:hi])
        for q in range(1, len(operands)):
            np.divide(operands[q][lo:hi], prescale, out=t)
            reduce(a, t, out=out[lo:hi] if q == len(operands) - 1 else a)


def scaled_scratch(chunk: int) -> int:
    """The scratch (elements) reduce_scaled_into_ needs for a chunk of `chunk` elements."""
    return 2 * max(1, min(chunk, SCALED_BLOCK))


SCALED_BLOCK = 1 << 14          # elements: two blocks of float64 fill 256 KB, within the L2


def shared_allreduce_in_place_(flat: np.ndarray, peers: Sequence[np.ndarray], seg: NodeSegment,
                               reduce: np.ufunc, scratch: np.ndarray, opened: bool,
                               prescale: int = 0) -> np.ndarray:
    """Zero-copy: `flat` lies in a shared window, and peers[q] is the same span in node rank
    q's part. `opened`: the call's opening was a sync point on this segment, made after every
    rank's buffer was final (else one is made here). `prescale` > 0 divides every input by it
    as it is read, before the sum (an average; `scratch` then as scaled_scratch says, else
    room for a chunk)."""
    L, me = seg.size, seg.rank
    if not opened:
        seg.sync()                                      # every rank's buffer is final
    bounds = chunk_bounds(flat.size, L)
    lo, hi = bounds[me]
    if hi > lo:
        operands = [peer[lo:hi] for peer in peers]
        if prescale:
            reduce_scaled_into_(flat[lo:hi], operands, reduce, scratch, prescale)
        else:
            reduce_into_(flat[lo:hi], operands, reduce, scratch)
    seg.sync()                                          # every chunk is finished
    for q, (lo, hi) in enumerate(bounds):
        if q != me and hi > lo:
            copy_(flat[lo:hi], peers[q][lo:hi])
    seg.sync()                                          # nobody reads my buffer any more
    return flat


# --- broadcast and all-gather within one node ---------------------------------------------------

def shared_broadcast_(flat: np.ndarray, seg: NodeSegment, root: int) -> np.ndarray:
    """`root`'s 1-D `flat` to every rank of the node, piece by piece: the root copies a piece
    into its slot, one sync, the others copy it out. (Double buffering lets the root copy in
    the next piece while the others still copy out the last.)"""
    piece = seg.capacity(flat.itemsize)
    for start in range(0, flat.size, piece):
        part = flat[start:start + piece]
        slots = seg.views(seg.begin(), flat.dtype, part.size)
        if seg.rank == root:
            copy_(slots[root], part)
        seg.sync()
        if seg.rank != root:
            copy_(part, slots[root])
    return flat


def shared_allgather_(blocks: Sequence[np.ndarray], seg: NodeSegment, owned: int) -> None:
    """Every node rank's block to every rank, in one episode: blocks[q] is node rank q's (1-D,
    one dtype, each fitting one slot; sizes may differ but every rank passes the same), and
    this rank holds blocks[owned]. As ring.py's ring_allgather_, through the slots: each rank
    copies its block into its slot, one sync, and copies the others' blocks out. (Larger
    blocks go around the ring: collectives.py's _allgather_blocks.)"""
    slots = seg.views(seg.begin(), blocks[owned].dtype, max(block.size for block in blocks))
    copy_(slots[owned][:blocks[owned].size], blocks[owned])
    seg.sync()
    for q, block in enumerate(blocks):
        if q != owned:
            copy_(block, slots[q][:block.size])

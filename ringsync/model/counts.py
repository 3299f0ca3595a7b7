"""What each algorithm really sends, per rank, counted as the code sends it (not rounded).

A message is one send at the mpi4py level (a Sendrecv's send half, a Send, an Isend), zero
bytes included; bytes are its payload. tests/test_mpi_model_counts.py runs each algorithm
on a communicator that counts its sends, on 1-4 ranks, and compares with these numbers.
The shared-memory path sends no message: its copies are counted as bytes of their own.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .algorithms import TRAILER_BYTES


class Traffic(NamedTuple):
    """One rank's sends in one call: messages, and their payload bytes."""

    messages: int
    bytes: int


def _chunks(n: int, p: int) -> list[int]:
    """ring.chunk_bounds's sizes: the first n % p chunks get one element more."""
    base, extra = divmod(n, p)
    return [base + (1 if i < extra else 0) for i in range(p)]


def ring(n: int, itemsize: int, p: int, r: int) -> Traffic:
    """ring.py on rank r: the reduce-scatter sends chunks r, r-1, ..., the all-gather r+1, r, ..."""
    if p == 1 or n == 0:
        return Traffic(0, 0)
    sizes = _chunks(n, p)
    sent = sum(sizes[(r - s) % p] for s in range(p - 1)) + sum(sizes[(r + 1 - s) % p] for s in range(p - 1))
    return Traffic(2 * (p - 1), sent * itemsize)


def pipelined(n: int, itemsize: int, p: int, r: int, segment_bytes: int) -> Traffic:
    """pipelined.py on rank r: each reduce-scatter chunk in segments (an empty one: one empty message)."""
    if p == 1 or n == 0:
        return Traffic(0, 0)
    segment = max(1, segment_bytes // itemsize)
    sizes = _chunks(n, p)
    messages = sum(max(1, math.ceil(sizes[(r - s) % p] / segment)) for s in range(p - 1)) + (p - 1)
    return Traffic(messages, ring(n, itemsize, p, r).bytes)


def doubling(n: int, itemsize: int, p: int, r: int) -> Traffic:
    """doubling.py on rank r: a swap per round; the fold's evens send once, their partners once more."""
    if p == 1 or n == 0:
        return Traffic(0, 0)
    nbytes = n * itemsize
    pof2 = 1 << (p.bit_length() - 1)
    rem = p - pof2
    rounds = pof2.bit_length() - 1
    if r < 2 * rem and r % 2 == 0:
        return Traffic(1, nbytes)                       # hands its buffer over, sits out
    extra = 1 if r < 2 * rem else 0                     # hands the result back
    return Traffic(rounds + extra, (rounds + extra) * nbytes)


def opening(payload_bytes: int, p: int) -> Traffic:
    """agreement.py's opening over messages: one Sendrecv per Bruck round, carrying min(2^k,
    p - 2^k) blocks of pad8(payload) + 32 bytes (the same on every rank)."""
    if p == 1:
        return Traffic(0, 0)
    block = ((payload_bytes + 7) & ~7) + TRAILER_BYTES
    messages = sent = 0
    distance = 1
    while distance < p:
        messages += 1
        sent += min(distance, p - distance) * block
        distance <<= 1
    return Traffic(messages, sent)


def tree_broadcast(nbytes: int, p: int, r: int, root: int) -> Traffic:
    """tree.py's binomial broadcast on rank r: one send per child."""
    vrank = (r - root) % p
    mask = 1
    while mask < p and not vrank & mask:
        mask <<= 1
    children = 0
    mask >>= 1
    while mask > 0:
        if vrank + mask < p:
            children += 1
        mask >>= 1
    return Traffic(children, children * nbytes)


def shared_copies(n: int, itemsize: int, local_size: int, local_rank: int, slot_bytes: int) -> int:
    """shared.py on one node (unscaled, contiguous): bytes a rank copies, in and out of the
    slots (the chunks it reduces itself it reads where they lie, so copies in only the rest;
    alone on its node it has nothing to reduce, and reduce_into_ copies its chunk in after all)."""
    piece = max(1, slot_bytes // itemsize)
    copied = 0
    for start in range(0, n, piece):
        m = min(piece, n - start)
        kept = _chunks(m, local_size)[local_rank] if local_size > 1 else 0
        copied += (m - kept) + m
    return copied * itemsize

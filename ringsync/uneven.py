"""join(): uneven work without deadlock, as in Horovod.

When ranks have different numbers of batches, the ones that run out first must not simply
stop: the others would wait forever in their next all-reduce. Instead a rank with no work
left calls join(). It then keeps taking part in the other ranks' collectives, adding
nothing (zeros to a sum, +inf to a min, empty rows to an allgather), until every rank has
joined; averages divide by the number of ranks that did contribute.

How the joined rank learns what to take part in: its join() call is a collective with its
own signature (agreement.py), so the others' next call fails the agreement check. On the
slow path every rank sees every rank's signature record: the joined ranks read the call
they must join from it, and everybody redoes that call together. The others' inputs are
intact (a guarded call writes nothing before the check), so the redo is exact. This costs
one extra trip round the ring per call, paid only while some rank has joined.
"""
from __future__ import annotations

import numpy as np

from . import ops
from .agreement import (
    ALLGATHER,
    ALLREDUCE,
    BROADCAST,
    JOIN,
    Checker,
    record_call,
    record_shape,
)
from .collectives import allgather_rows, allreduce_flat_, broadcast_flat_, front_door
from .context import world


@front_door("join")
def join() -> int:
    """Take part in the other ranks' collectives until every rank has called join().

    Returns the rank that joined last. Needs the agreement check (RINGSYNC_CHECK_AGREEMENT=1).
    """
    w = world()
    checker = w.checker
    if w.size == 1:
        return 0
    if not checker.enabled:
        raise RuntimeError("join() needs the agreement check: unset RINGSYNC_CHECK_AGREEMENT=0")
    while True:
        guard = checker.arm(JOIN)
        guard.agree()
        if not guard.bad:            # every rank is in join() (the others' signatures match)
            return _finish(checker, w.size)
        row, joined = guard.settle()         # raises here too if the others disagree
        if len(joined) == w.size:
            return _finish(checker, w.size)
        _take_part(row)


def _finish(checker: Checker, size: int) -> int:
    """Everyone has joined: the last to join is one no slow path has seen in join() yet."""
    unseen = set(range(size)) - checker.joined
    last = max(unseen) if unseen else checker.last_joined
    checker.joined.clear()
    checker.last_joined = -1
    return last


def _take_part(row: np.ndarray) -> None:
    """Do this rank's share of the call a record describes, contributing nothing."""
    call = record_call(row)
    if call.kind == ALLREDUCE:
        # The others redo their call without the check: so does this rank, with nothing to add.
        allreduce_flat_(neutral(call.count, call.dtype, call.op), call.op, None, world().size)
    elif call.kind == BROADCAST:
        broadcast_flat_(np.empty(call.count, dtype=call.dtype), call.root, shared=False)
    elif call.kind == ALLGATHER:
        allgather_rows(np.empty((0,) + record_shape(row), dtype=call.dtype), shared=False)
    # a barrier needs nothing more: the slow path has already met every rank


def neutral(count: int, dtype: np.dtype, op: str) -> np.ndarray:
    """`count` copies of the element that leaves `op` unchanged: 0, or the dtype's extreme."""
    if op in (ops.Sum, ops.Average):
        return np.zeros(count, dtype=dtype)
    if ops.is_float(dtype):             # float16/32/64 and bfloat16 all have infinities
        extreme = np.inf if op == ops.Min else -np.inf
    else:
        info = np.iinfo(dtype)
        extreme = info.max if op == ops.Min else info.min
    return np.full(count, extreme, dtype=dtype)

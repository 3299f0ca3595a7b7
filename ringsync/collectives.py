"""The front doors: allreduce, broadcast, allgather and barrier on arrays.

Each one checks its arguments, arms the cross-rank agreement check (agreement.py),
flattens the array into a contiguous 1-D buffer, and hands it to a hand-written algorithm:
recursive doubling (small.py), the ring (ring.py, ring_fast.py) or the tree (tree.py);
CuPy arrays go through buffers.py. Names follow Horovod: a trailing underscore means
"in place" (the call fills and returns its argument).
"""
from __future__ import annotations

import numpy as np

from . import buffers, join, ops, timing
from .agreement import ALLGATHER, ALLREDUCE, BARRIER, BROADCAST, NONFINITE, Checker
from .context import world
from .ring import ring_allgather_, ring_allreduce_
from .ring_fast import (
    checked_ring_allreduce_,
    choose,
    pipelined_ring_allreduce_,
    tuning,
)
from .small import recursive_doubling_allreduce_
from .tree import dissemination_barrier, tree_broadcast_


def _as_array(x: object, arg: str) -> np.ndarray:
    """Any array-like as a NumPy array of a supported dtype (no copy when already one).

    A CuPy array stays a CuPy array: buffers.py moves it, and the result stays on its GPU.
    """
    if isinstance(x, np.ndarray) or buffers.is_device_array(x):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:
            raise TypeError(f"{arg} must be an array, got {type(x).__name__}") from exc
    ops.check_dtype(arr.dtype, arg)
    return arr


def _check_inplace(x: object, arg: str) -> np.ndarray:
    """An in-place call needs a writeable, C-contiguous NumPy (or CuPy) array it can fill."""
    if type(x) is not np.ndarray and not isinstance(x, np.ndarray) and not buffers.is_device_array(x):
        raise TypeError(f"{arg} must be a numpy.ndarray for an in-place call, got {type(x).__name__}")
    if x.dtype not in ops.SUPPORTED:     # (check_dtype says what is wrong)
        ops.check_dtype(x.dtype, arg)
    flags = x.flags                     # (a new object on every read)
    if not getattr(flags, "writeable", True):   # CuPy arrays are always writeable
        raise ValueError(f"{arg} is read-only; an in-place call must write into it")
    if not flags.c_contiguous:
        raise ValueError(f"{arg} is not C-contiguous; use the out-of-place form or np.ascontiguousarray")
    return x


def _refuse(exc: BaseException) -> None:
    """This rank's arguments are wrong: make the other ranks' matching call fail too (they
    would otherwise wait for this rank forever); the caller then raises `exc`."""
    world().checker.refuse(exc)


def _allreduce_plain_(flat: np.ndarray, op: str, guard: Checker | None = None,
                      contributors: int = 0) -> None:
    """All-reduce a contiguous 1-D buffer, then the average's division if asked.

    The algorithm goes by size (ring_fast.choose; README: RINGSYNC_ALLREDUCE and friends):
    recursive doubling for small buffers (fewest messages), ring.py's ring for the rest (least
    traffic), pipelined in segments for large ones. All give the same bits on all ranks.
    `guard` checks cross-rank agreement on the way (agreement.py); `contributors` is the
    number of ranks whose data counts for an average (join.py), all of them by default.
    """
    w = world()
    if type(flat) is not np.ndarray and buffers.is_device_array(flat):
        return _allreduce_device_(flat, op, guard, contributors)
    n = flat.size
    if n and w.size > 1:
        settings = tuning()
        algorithm, reduce = choose(flat.nbytes, w.size, settings), ops.OPS[op]
        if algorithm == "doubling":
            recursive_doubling_allreduce_(flat, w.comm, reduce, w.scratch(n, flat.dtype), guard)
        else:
            largest_chunk = -(-n // w.size)     # chunk 0, ceil(n / p) elements
            if algorithm == "pipelined":
                segment = max(1, settings.segment_bytes // flat.itemsize)
                pipelined_ring_allreduce_(flat, w.comm, reduce, w.scratch(
                    2 * min(segment, largest_chunk), flat.dtype), segment, guard)
            else:
                scratch = w.scratch(2 * largest_chunk, flat.dtype)
                if guard is None:
                    ring_allreduce_(flat, w.comm, reduce, scratch)
                else:
                    checked_ring_allreduce_(flat, w.comm, reduce, scratch, guard)
    elif guard is not None:
        guard.agree(w.comm)         # no data, but the ranks must still agree
    if guard is not None and guard.bad:
        return join.redo_allreduce_(flat, op, guard)   # raises on every rank, unless joined
    if op == ops.Average:
        ops.finish_average_(flat, contributors or w.size)


# The probe times the call inside a training step; nothing below here knows about timing.
# _reduce_ calls the plain function when no step is being timed, to save the probe's layer.
_allreduce_flat_ = timing.probe(_allreduce_plain_)


def _allreduce_device_(flat, op: str, guard: Checker | None, contributors: int) -> None:
    """A CuPy buffer: agree first (as an empty call does), then CUDA-aware MPI or pinned staging."""
    if guard is not None:
        guard.agree(world().comm)
        if guard.bad:   # ranks have joined (join.py) and take part on the host path: so do we
            host = buffers.array_module(flat).asnumpy(flat)
            join.redo_allreduce_(host, op, guard)      # (or raises on every rank)
            flat.set(host)
            return
    buffers.allreduce_device_(flat, op, contributors or world().size)


def _check_finite(flat: np.ndarray, guard: Checker | None, name: str | None) -> None:
    """RINGSYNC_CHECK_FINITE: a NaN/Inf here fails this call on every rank, naming this one."""
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        if guard is None:   # a single rank
            raise FloatingPointError(f"allreduce{f' {name!r}' if name else ''}: NaN or Inf in "
                                     f"the input on rank {world().rank}")
        guard.poison(NONFINITE)


def allreduce(x: object, op: str = ops.Sum, name: str | None = None) -> np.ndarray:
    """Reduce `x` elementwise across all ranks and return the result as a new array.

    `x` is left untouched; any shape and layout is accepted. Every rank gets the same bits.
    `name` labels the tensor in error messages (and must then agree across ranks).
    """
    try:
        op = ops.resolve_op(op)
        out = buffers.contiguous_copy(_as_array(x, "x"))
        _check_name(name)
    except (TypeError, ValueError) as exc:
        _refuse(exc)
        raise
    _reduce_(out.reshape(-1), op, out.shape, name)
    return out


def allreduce_(x: np.ndarray, op: str = ops.Sum, name: str | None = None) -> np.ndarray:
    """Reduce `x` elementwise across all ranks, in place, and return `x`."""
    try:
        op = op if op is ops.Sum else ops.resolve_op(op)     # the default needs no look-up
        flat = _check_inplace(x, "x")
        flat = flat if flat.ndim == 1 else flat.reshape(-1)   # reshape costs ~0.1 us; skip it
        if name is not None:
            _check_name(name)
    except (TypeError, ValueError) as exc:
        _refuse(exc)
        raise
    _reduce_(flat, op, x.shape, name)
    return x


def allreduce_fused_(flat: np.ndarray, op: str, shapes: tuple[tuple[int, ...], ...],
                     name: str | None = None) -> np.ndarray:
    """Reduce a fusion buffer holding tensors of `shapes`, packed, in place; return it.

    Like allreduce_, but the agreement check also covers the number of tensors and their
    shapes, so ranks that packed different groups raise instead of mixing them up.
    """
    try:
        op = ops.resolve_op(op)
        flat = _check_inplace(flat, "flat")
        if flat.ndim != 1:
            raise ValueError(f"flat must be 1-D, got shape {flat.shape}")
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        packed = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
        if packed != flat.size:
            raise ValueError(f"shapes hold {packed} elements but flat has {flat.size}")
        layout = hash(shapes)
        _check_name(name)
    except (TypeError, ValueError) as exc:
        _refuse(exc)
        raise
    _reduce_(flat, op, flat.shape, name, len(shapes), layout)
    return flat


def _reduce_(flat: np.ndarray, op: str, shape: tuple, name: str | None, group: int = 1,
             layout: int = 0) -> None:
    """Fingerprint the call (agreement.py), check finiteness if asked, reduce `flat`."""
    checker = world().checker
    guard = checker.arm(ALLREDUCE, op, flat.dtype, shape, -1, group, layout, name)
    if checker.finite:
        _check_finite(flat, guard, name)
    if timing.idle():       # no step being timed: skip the probe's wrapper (~0.15 us a call)
        _allreduce_plain_(flat, op, guard)
    else:
        _allreduce_flat_(flat, op, guard)


def _check_name(name: object) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")


def _check_root(root: object) -> int:
    n = world().size
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
        raise TypeError(f"root must be an int, got {type(root).__name__}")
    if not 0 <= root < n:
        raise ValueError(f"root must be in [0, {n}), got {root}")
    return int(root)


def broadcast_(x: np.ndarray, root: int = 0, name: str | None = None) -> np.ndarray:
    """Overwrite `x` on every rank with root's `x` (same shape and dtype everywhere); return `x`."""
    try:
        root = _check_root(root)
        _check_inplace(x, "x")
        _check_name(name)
    except (TypeError, ValueError) as exc:
        _refuse(exc)
        raise
    return _broadcast_(x, root, name)


def broadcast(x: object, root: int = 0, name: str | None = None) -> np.ndarray:
    """Return a copy of root's `x` on every rank; `x` itself is left untouched."""
    try:
        root = _check_root(root)
        out = buffers.contiguous_copy(_as_array(x, "x"))
        _check_name(name)
    except (TypeError, ValueError) as exc:
        _refuse(exc)
        raise
    return _broadcast_(out, root, name)


def _broadcast_(x: np.ndarray, root: int, name: str | None) -> np.ndarray:
    w = world()
    guard = w.checker.arm(BROADCAST, "", x.dtype, x.shape, root, 1, 0, name)
    if guard is not None:
        guard.agree(w.comm)
        if guard.bad:
            guard.settle()    # raises on every rank, unless ranks have joined: then go on
    if buffers.is_device_array(x):
        buffers.broadcast_device_(x.reshape(-1), root)   # same tree, same messages
    else:
        tree_broadcast_(x.reshape(-1), w.comm, root)
    return x


def allgather(x: object, name: str | None = None) -> np.ndarray:
    """Concatenate every rank's `x` along axis 0, in rank order, on every rank.

    First dimensions may differ between ranks (as in Horovod); the rest of the shape and the
    dtype must agree, or every rank raises ValueError.
    """
    try:
        arr = buffers.array_module(x).ascontiguousarray(_as_array(x, "x"))
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim > _MAX_NDIM:
            raise ValueError(f"x has {arr.ndim} dimensions; allgather supports at most {_MAX_NDIM}")
        _check_name(name)
    except (TypeError, ValueError) as exc:
        _refuse(exc)
        raise
    guard = world().checker.arm(ALLGATHER, "", arr.dtype, arr.shape[1:], -1, 1, 0, name)
    return _allgather(arr, guard)


def _allgather(arr: np.ndarray, guard: Checker | None) -> np.ndarray:
    w = world()
    rows = _exchange_layouts(arr, guard)
    if rows is None:                        # some ranks have joined: redone without them
        return _allgather(arr, None)
    firsts = rows[:, 0]
    xp = buffers.array_module(arr)
    out = xp.empty((int(firsts.sum()),) + arr.shape[1:], dtype=arr.dtype)
    per_row = int(np.prod(arr.shape[1:], dtype=np.int64))
    flat = out.reshape(-1)
    offsets = np.concatenate(([0], np.cumsum(firsts * per_row)))
    blocks = [flat[offsets[i]:offsets[i + 1]] for i in range(w.size)]
    blocks[w.rank][...] = arr.reshape(-1)
    if xp is np:
        ring_allgather_(blocks, w.comm, owned=w.rank)
    else:
        buffers.allgather_device_(blocks, owned=w.rank)   # same ring, same messages
    return out


_MAX_NDIM = 8


def _exchange_layouts(arr: np.ndarray, guard: Checker | None) -> np.ndarray | None:
    """Share (first dim, dtype, ndim, trailing dims) among ranks; raise on all if they clash.

    Returns None if the guard found that some ranks have joined (join.py).
    """
    w = world()
    rows = np.zeros((w.size, 3 + _MAX_NDIM), dtype=np.int64)
    mine = rows[w.rank]
    mine[:3] = arr.shape[0], ops.SUPPORTED_DTYPES.index(arr.dtype), arr.ndim
    mine[3:3 + arr.ndim - 1] = arr.shape[1:]
    ring_allgather_(list(rows), w.comm, owned=w.rank, guard=guard)
    if guard is not None and guard.bad:
        guard.settle()          # raises on every rank, unless ranks have joined
        return None
    agreed = (rows[:, 1:] == rows[0, 1:]).all(axis=1)
    if not agreed.all():
        def layout(r: int) -> str:
            dtype = ops.SUPPORTED_DTYPES[rows[r, 1]].name
            return f"rank {r}: {dtype} (*, {', '.join(str(d) for d in rows[r, 3:2 + rows[r, 2]])})"
        desc = "; ".join(layout(r) for r in [0, *np.flatnonzero(~agreed)])
        raise ValueError(f"allgather: dtype or trailing shape differ across ranks ({desc})")
    return rows


def barrier() -> None:
    """Block until every rank has called barrier()."""
    w = world()
    guard = w.checker.arm(BARRIER)
    if guard is None:
        dissemination_barrier(w.comm)
        return
    # Guarded: p-1 empty ring steps. They are a barrier too (each rank hears, hop by hop,
    # from every other), one more round than the dissemination barrier's log2(p) on 4 ranks.
    guard.agree(w.comm)
    if guard.bad:
        guard.settle()          # raises on every rank, unless ranks have joined

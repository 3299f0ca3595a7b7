"""The front doors: allreduce, broadcast, allgather and barrier on arrays.

Each one checks its arguments, flattens the array into a contiguous 1-D buffer, and hands
it to the hand-written algorithms in ring.py and tree.py. Names follow Horovod: a trailing
underscore means "in place" (the call fills and returns its argument).
"""
from __future__ import annotations

import numpy as np

from . import buffers, ops, timing
from .context import world
from .ring import chunk_bounds, ring_allgather_, ring_allreduce_
from .ring_fast import choose, pipelined_ring_allreduce_, tuning
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
        except Exception as exc:  # noqa: BLE001 - re-raised with the argument named
            raise TypeError(f"{arg} must be an array, got {type(x).__name__}") from exc
    ops.check_dtype(arr.dtype, arg)
    return arr


def _check_inplace(x: object, arg: str) -> np.ndarray:
    """An in-place call needs a writeable, C-contiguous NumPy (or CuPy) array it can fill."""
    if not isinstance(x, np.ndarray) and not buffers.is_device_array(x):
        raise TypeError(f"{arg} must be a numpy.ndarray for an in-place call, got {type(x).__name__}")
    ops.check_dtype(x.dtype, arg)
    if not getattr(x.flags, "writeable", True):   # CuPy arrays are always writeable
        raise ValueError(f"{arg} is read-only; an in-place call must write into it")
    if not x.flags.c_contiguous:
        raise ValueError(f"{arg} is not C-contiguous; use the out-of-place form or np.ascontiguousarray")
    return x


@timing.probe   # times the call inside a training step; nothing below here knows about timing
def _allreduce_flat_(flat: np.ndarray, op: str) -> None:
    """All-reduce a contiguous 1-D buffer, then the average's division if asked.

    The algorithm goes by size (ring_fast.choose; README: RINGSYNC_ALLREDUCE and friends):
    recursive doubling for small buffers (fewest messages), the pipelined ring for the rest
    (least traffic), or the teaching ring of ring.py when asked. All give the same bits on all ranks.
    """
    if buffers.is_device_array(flat):
        return buffers.allreduce_device_(flat, op)   # GPU: CUDA-aware MPI or pinned staging
    w = world()
    if w.size > 1 and flat.size:
        settings = tuning()
        algorithm, reduce = choose(flat.nbytes, settings), ops.OPS[op]
        if algorithm == "doubling":
            recursive_doubling_allreduce_(flat, w.comm, reduce, w.scratch(flat.size, flat.dtype))
        elif algorithm == "pipelined":
            largest_chunk = -(-flat.size // w.size)
            segment = max(1, settings.segment_bytes // flat.itemsize)
            pipelined_ring_allreduce_(flat, w.comm, reduce, w.scratch(2 * min(segment, largest_chunk),
                                                                      flat.dtype), segment)
        else:
            largest_chunk = chunk_bounds(flat.size, w.size)[0][1]
            ring_allreduce_(flat, w.comm, reduce, scratch=w.scratch(largest_chunk, flat.dtype))
    if op == ops.Average:
        ops.finish_average_(flat, w.size)


def allreduce(x: object, op: str = ops.Sum) -> np.ndarray:
    """Reduce `x` elementwise across all ranks and return the result as a new array.

    `x` is left untouched; any shape and layout is accepted. Every rank gets the same bits.
    """
    op = ops.resolve_op(op)
    out = buffers.contiguous_copy(_as_array(x, "x"))
    _allreduce_flat_(out.reshape(-1), op)
    return out


def allreduce_(x: np.ndarray, op: str = ops.Sum) -> np.ndarray:
    """Reduce `x` elementwise across all ranks, in place, and return `x`."""
    op = ops.resolve_op(op)
    _allreduce_flat_(_check_inplace(x, "x").reshape(-1), op)
    return x


def _check_root(root: object) -> int:
    n = world().size
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
        raise TypeError(f"root must be an int, got {type(root).__name__}")
    if not 0 <= root < n:
        raise ValueError(f"root must be in [0, {n}), got {root}")
    return int(root)


def broadcast_(x: np.ndarray, root: int = 0) -> np.ndarray:
    """Overwrite `x` on every rank with root's `x` (same shape and dtype everywhere); return `x`."""
    root = _check_root(root)
    if buffers.is_device_array(_check_inplace(x, "x")):
        buffers.broadcast_device_(x.reshape(-1), root)
    else:
        tree_broadcast_(x.reshape(-1), world().comm, root)
    return x


def broadcast(x: object, root: int = 0) -> np.ndarray:
    """Return a copy of root's `x` on every rank; `x` itself is left untouched."""
    out = buffers.contiguous_copy(_as_array(x, "x"))
    return broadcast_(out, root)


def allgather(x: object) -> np.ndarray:
    """Concatenate every rank's `x` along axis 0, in rank order, on every rank.

    First dimensions may differ between ranks (as in Horovod); the rest of the shape and the
    dtype must agree, or every rank raises ValueError.
    """
    xp = buffers.array_module(x)
    arr = xp.ascontiguousarray(_as_array(x, "x"))
    if arr.ndim == 0:
        arr = arr.reshape(1)
    w = world()
    rows = _exchange_layouts(arr)
    firsts = rows[:, 0]
    out = xp.empty((int(firsts.sum()),) + arr.shape[1:], dtype=arr.dtype)
    per_row = int(np.prod(arr.shape[1:], dtype=np.int64))
    flat = out.reshape(-1)
    offsets = np.concatenate(([0], np.cumsum(firsts * per_row)))
    blocks = [flat[offsets[i]:offsets[i + 1]] for i in range(w.size)]
    blocks[w.rank][...] = arr.reshape(-1)
    if xp is np:
        ring_allgather_(blocks, w.comm, owned=w.rank)
    else:
        buffers.allgather_device_(blocks, owned=w.rank)
    return out


_MAX_NDIM = 8


def _exchange_layouts(arr: np.ndarray) -> np.ndarray:
    """Share (first dim, dtype, ndim, trailing dims) among ranks; raise on all if they clash."""
    w = world()
    if arr.ndim > _MAX_NDIM:
        raise ValueError(f"x has {arr.ndim} dimensions; allgather supports at most {_MAX_NDIM}")
    rows = np.zeros((w.size, 3 + _MAX_NDIM), dtype=np.int64)
    mine = rows[w.rank]
    mine[:3] = arr.shape[0], ops.SUPPORTED_DTYPES.index(arr.dtype), arr.ndim
    mine[3:3 + arr.ndim - 1] = arr.shape[1:]
    ring_allgather_(list(rows), w.comm, owned=w.rank)
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
    dissemination_barrier(world().comm)

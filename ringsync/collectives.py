"""The front doors: allreduce, broadcast, allgather and barrier on arrays.

Every call goes down the same four stages, each once:

    check   the arguments (a rank that refuses its own makes the others fail too)
    agree   arm the cross-rank agreement check and run its opening (agreement.py)
    plan    pick the algorithm for this size (choice.py) and its scratch buffers
    run     the algorithm (algorithms/), over point-to-point messages (transport/)

A small all-reduce rides on the opening itself (algorithms/gathered.py). CuPy arrays take
the same path, with the device transport (transport/gpu.py). Timing wraps an all-reduce from
outside through World.probe; nothing here knows about timing. Names follow Horovod: a
trailing underscore means "in place" (the call fills and returns its argument).

The hot path. A 4 KB all-reduce takes a few microseconds, so the Python around it counts.
The tricks that stay, all on allreduce_'s way down, each marked "(hot path)" where it is:
the default op skips its look-up; a 1-D buffer skips reshape; `type(x) is np.ndarray` is
tested before any CuPy check; argument checks read `x.flags` once; the refusal guard is one
shared object, not a generator; World.probe is None outside timed steps (no wrapper call);
agreement.arm() keys its cache on a plain tuple; a small buffer is copied into its opening
block by slice assignment (cheaper than np.copyto for a few KB); and allreduce_ of a small
host buffer outside a timed step skips the layers between it and the opening (reduce_,
checked_allreduce_, allreduce_flat_, _attempt), which cost 2-4 us of a 4 KB call's 7-14.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from . import ops
from .agreement import ALLGATHER, ALLREDUCE, BARRIER, BROADCAST, DEVICE, NONFINITE, REFUSED, Checker, MismatchError
from .algorithms.doubling import recursive_doubling_allreduce_
from .algorithms.gathered import reduce_gathered_
from .algorithms.pipelined import pipelined_ring_allreduce_
from .algorithms.ring import chunk_bounds, ring_allgather_, ring_allreduce_
from .algorithms.scattered import Scattered
from .algorithms.shared import (
    scaled_scratch,
    shared_allgather_,
    shared_allreduce_,
    shared_allreduce_in_place_,
    shared_broadcast_,
    shared_gathered_allreduce_,
)
from .algorithms.staged import staged_allgather_, staged_allreduce_, staged_broadcast_
from .algorithms.tree import dissemination_barrier, tree_broadcast_
from .choice import choose, host_choice
from .context import is_initialized, world
from .transport import gpu
from .transport.memcopy import CHECKED_BYTES, copy_
from .transport.shm import PeerFailedError, peers_of, poison_word


def _as_array(x: object, arg: str) -> np.ndarray:
    """Any array-like as a NumPy array of a supported dtype (no copy when already one).

    A CuPy array stays a CuPy array: gpu.py moves it, and the result stays on its GPU.
    """
    if isinstance(x, np.ndarray) or gpu.is_device_array(x):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:
            raise TypeError(f"{arg} must be an array, got {type(x).__name__}") from exc
    ops.check_dtype(arr.dtype, arg)
    return arr


def check_inplace(x: object, arg: str) -> np.ndarray:
    """An in-place call needs a writeable, C-contiguous NumPy (or CuPy) array it can fill."""
    if type(x) is not np.ndarray and not isinstance(x, np.ndarray) and not gpu.is_device_array(x):
        raise TypeError(f"{arg} must be a numpy.ndarray for an in-place call, got {type(x).__name__}")
    if x.dtype not in ops.SUPPORTED:     # (check_dtype says what is wrong)
        ops.check_dtype(x.dtype, arg)
    flags = x.flags                     # (a new object on every read)
    if not getattr(flags, "writeable", True):   # CuPy arrays are always writeable
        raise ValueError(f"{arg} is read-only; an in-place call must write into it")
    if not flags.c_contiguous:
        raise ValueError(f"{arg} is not C-contiguous; use the out-of-place form or np.ascontiguousarray")
    return x


class ArgumentsChecked:
    """`with arguments_checked:` around a call's argument checks. If they fail (ValueError,
    TypeError), the other ranks' matching call is made to fail too (they would otherwise wait
    for this rank forever: agreement.py), and the error goes on up. One shared instance: a
    class with __enter__/__exit__ costs far less per call than a generator-based manager."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if kind is not None and issubclass(kind, (TypeError, ValueError)):
            checker = world().checker
            if checker is not None:
                checker.refuse(exc)
        return False


arguments_checked = ArgumentsChecked()


def poison_node(exc: BaseException, collective: str) -> None:
    """`exc` is leaving `collective` on this rank: if the others may wait on this rank in the
    node's shared memory, poison it (transport/shm.py), so that they raise PeerFailedError
    instead of waiting forever, and so does every later collective on it.

    Not for the errors every rank raises alike, with the segment in step: a cross-rank
    mismatch (MismatchError, FloatingPointError for NaN found by the check), or a refusal of
    this rank's own arguments that the others have already heard of (ArgumentsChecked)."""
    if not is_initialized():
        return
    w = world()
    seg = w.node
    if seg is None or isinstance(exc, (MismatchError, FloatingPointError)):
        return
    checker = w.checker
    if isinstance(exc, (TypeError, ValueError)) and checker is not None and checker.enabled \
            and checker.current is not None and checker.current.kind == REFUSED:
        return
    word = exc.word if isinstance(exc, PeerFailedError) else \
        poison_word(collective, checker.calls if checker is not None else 0, w.rank)
    try:
        seg.poison(word)
    except PeerFailedError:
        pass                    # (this rank raises its own exception: `exc`)


_F = TypeVar("_F", bound=Callable[..., Any])


def front_door(collective: str) -> Callable[[_F], _F]:
    """Decorate a collective's public function: an exception leaving it poisons the node's
    shared memory (poison_node). A try costs nothing while nothing is raised; the wrapper's
    call costs ~0.1 us, so allreduce_ (the hot path) has the same try written inline."""
    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def door(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except BaseException as exc:
                poison_node(exc, collective)
                raise
        return door  # type: ignore[return-value]
    return decorate


# --- all-reduce: one dispatcher, check -> agree -> plan -> run ---------------------------------

def allreduce_flat_(flat: np.ndarray, op: str, guard: Checker | None, contributors: int,
                    peers: list[np.ndarray] | None = None) -> None:
    """All-reduce the contiguous 1-D buffer `flat` in place; an average divides by `contributors`.

    With a guard, a call the ranks disagree on raises on every rank (agreement.py), or, when
    the only difference is that ranks have joined (uneven.py), is redone without them. `peers`:
    `flat` as it lies in every node rank's shared window (a shared FlatBuffer), read in place.
    """
    if not _attempt(flat, op, guard, contributors, peers):
        _redo_settled(flat, op, guard)


def _redo_settled(flat: np.ndarray, op: str, guard: Checker) -> None:
    """After an opening that found the ranks disagreeing (`flat` untouched): raise on every
    rank, or, when the only difference is that ranks have joined, redo the call without them."""
    _, joined = guard.settle()          # raises on every rank, unless ranks have joined
    contributors = world().size - len(joined)
    if gpu.is_device_array(flat):       # joined ranks take part on the host: so do we
        host = gpu.array_module(flat).asnumpy(flat)
        allreduce_flat_(host, op, None, contributors)
        flat.set(host)
    else:
        allreduce_flat_(flat, op, None, contributors)


def _ride_on_opening(flat: np.ndarray, guard: Checker, reduce: np.ufunc, prescale: int, rank: int) -> bool:
    """A small buffer rides on the opening itself, and each rank reduces the p gathered
    buffers in rank order (algorithms/gathered.py): no message beyond the opening's. False
    (with `flat` untouched) when the opening found the ranks disagreeing."""
    slots = guard.slots(flat.dtype, flat.size)
    if prescale:
        np.divide(flat, prescale, out=slots[0])
    elif flat.nbytes < CHECKED_BYTES:
        slots[0][...] = flat            # (hot path) cheaper than np.copyto or copy_
    else:
        copy_(slots[0], flat)           # (around memcpy's trap: transport/memcopy.py)
    guard.agree(flat.nbytes)
    if guard.bad:
        return False
    reduce_gathered_(flat, slots, reduce, rank)
    return True


def _attempt(flat: np.ndarray, op: str, guard: Checker | None, contributors: int,
             peers: list[np.ndarray] | None = None) -> bool:
    """One try; False (with `flat` untouched) when the opening found the ranks disagreeing."""
    if type(flat) is not np.ndarray and gpu.is_device_array(flat):
        return _attempt_device(flat, op, guard, contributors)
    if op == ops.Average and flat.dtype.kind in "iu":
        return _integer_average(flat, guard, contributors)
    w = world()
    # An average is a sum of pre-scaled values: x/c summed stays in range where the sum of x
    # would overflow (float16 40000 + 40000), as NCCL's average does.
    prescale = contributors if op == ops.Average else 0
    n = flat.size
    if n == 0 or w.size == 1:
        if guard is not None:
            guard.agree()
            return not guard.bad
        return True
    # (a fusion bucket of separate arrays was routed through shared memory: unpacked_fusion)
    algorithm = "shared" if type(flat) is Scattered else host_algorithm(flat.nbytes, checked=guard is not None)
    if algorithm == "ride":
        return _ride_on_opening(flat, guard, ops.OPS[op], prescale, w.rank)
    if guard is not None:
        guard.agree()
        if guard.bad:
            return False
    reduce = ops.OPS[op]
    if algorithm == "shared":
        _shared(flat, reduce, prescale, opened=guard is not None, peers=peers)
        return True
    if prescale:
        np.divide(flat, prescale, out=flat)
    if algorithm == "doubling":
        recursive_doubling_allreduce_(flat, w.comm, reduce, w.scratch(n, flat.dtype))
    elif algorithm == "pipelined":
        segment = max(1, w.settings.segment_bytes // flat.itemsize)
        largest_chunk = -(-n // w.size)     # chunk 0, ceil(n / p) elements
        pipelined_ring_allreduce_(flat, w.comm, reduce,
                                  w.scratch(2 * min(segment, largest_chunk), flat.dtype), segment)
    else:
        ring_allreduce_(flat, w.comm, reduce, w.scratch(-(-n // w.size), flat.dtype))
    return True


def host_algorithm(nbytes: int, checked: bool) -> str:
    """How a host all-reduce of `nbytes` (> 0, on more than one rank) runs on this World:
    the cost model's pick with RINGSYNC_MODEL (model/tuner.py), else choice.host_choice's
    thresholds, with the World's values. One place for _attempt and summation_order."""
    w = world()
    if w.tuner is None:
        # (choice.host_choice, its first test inline: the hot path's small calls pay no call)
        if checked and nbytes <= w.checker.payload_limit and w.settings.allreduce == "auto":
            return "ride"
        algorithm = choose(nbytes, w.size, w.settings, w.node is not None, w.small_bytes)
        return "shared" if algorithm == "doubling" and w.single_node else algorithm
    if w.settings.allreduce == "auto":
        return w.tuner.choose(nbytes, checked)      # RINGSYNC_MODEL: the fastest predicted
    return host_choice(nbytes, w.size, w.settings, checked=checked, payload_limit=w.checker.payload_limit,
                       node=w.node is not None, single_node=w.single_node, small=w.small_bytes)


def summation_order(n: int, dtype: np.dtype) -> list[tuple[int, int, tuple[int, ...]]] | None:
    """The order in which allreduce_ of n host elements of the float `dtype` adds the ranks'
    values on this World: (lo, hi, ranks) spans, where each element in lo..hi-1 is
    ((x[ranks[0]] + x[ranks[1]]) + x[ranks[2]]) + ..., every x first divided by p for an
    average. None when the sum is not such a chain: recursive doubling on more than two ranks,
    or across nodes (the hierarchical all-reduce adds the nodes' partial sums together).

    The order depends only on n, the dtype's size, p and the settings frozen at init() (the
    project's rule, docs/ring.md): it follows _attempt's road (host_algorithm). backup.py
    averages by itself in this order, so backup:0 matches bsp bit for bit.
    """
    w = world()
    p = w.size
    rank_order = [(0, n, tuple(range(p)))] if n else []
    if p <= 2 or not n:                 # x0 + x1 == x1 + x0 bit for bit: every path agrees
        return rank_order
    algorithm = host_algorithm(n * np.dtype(dtype).itemsize, checked=w.checker.enabled)
    if algorithm == "ride" or (algorithm == "shared" and w.single_node):
        return rank_order               # gathered.py, or the node's shared memory: rank order
    if algorithm in ("shared", "doubling"):
        return None                     # across nodes, or a tree of pairs
    # ring.py (and pipelined.py, the same additions): chunk c starts at rank c and goes round
    return [(lo, hi, tuple((c + k) % p for k in range(p))) for c, (lo, hi) in enumerate(chunk_bounds(n, p))]


def shared_peers(flat: np.ndarray, op: str) -> tuple[list[np.ndarray], int] | None:
    """`flat` in every node rank's shared window, if it lies in one (a shared FlatBuffer) and
    is all-reduced in place there: on one node, large enough, and not an integer average
    (computed in parts, in a buffer of its own: _integer_average). Also the code
    of where it lies (transport/shm.py's peers_of), for the agreement check."""
    w = world()
    if type(flat) is not np.ndarray or not (w.windows and w.single_node) or flat.nbytes <= w.small_bytes:
        return None
    if op == ops.Average and flat.dtype.kind != "f" and not ops.is_float(flat.dtype):
        return None
    return peers_of(w.windows, flat)


def _shared(flat: np.ndarray, reduce: np.ufunc, prescale: int, opened: bool,
            peers: list[np.ndarray] | None) -> None:
    """Through the node's shared memory (algorithms/shared.py): in place when `flat` lies in a
    shared window (`peers`: a shared FlatBuffer), else copied in piece by piece; across nodes,
    the hierarchical all-reduce. `opened`: the opening has just synced the node's ranks."""
    w = world()
    seg = w.node
    if w.single_node and flat.nbytes <= w.small_bytes:
        shared_gathered_allreduce_(flat, seg, reduce, prescale)     # (unguarded small calls)
        return
    if peers is not None:
        # An average divides each input as it is read, before the sum, like every other path
        # (the inputs themselves stay untouched until every rank has read them).
        chunk = -(-flat.size // seg.size)
        scratch = w.scratch(scaled_scratch(chunk) if prescale else chunk, flat.dtype)
        shared_allreduce_in_place_(flat, peers, seg, reduce, scratch, opened=opened, prescale=prescale)
        return
    shared_allreduce_(flat, seg, reduce, w.scratch(seg.capacity(flat.itemsize), flat.dtype),
                      w.rings, w.chunks, prescale)


def _integer_average(flat: np.ndarray, guard: Checker | None, contributors: int) -> bool:
    """The floor of the exact mean, with no overflow (ops.average_parts): sum the parts, finish."""
    parts = ops.average_parts(flat, contributors)
    if not _attempt(parts, ops.Sum, guard, contributors):
        return False
    ops.finish_average_(flat, parts, contributors)
    return True


def _attempt_device(flat: Any, op: str, guard: Checker | None, contributors: int) -> bool:
    """A CuPy buffer: the opening first (trailer only), then CUDA-aware MPI or pinned staging."""
    if guard is not None:
        guard.agree()
        if guard.bad:
            return False
    cp, w = gpu.array_module(flat), world()
    with flat.device:
        if op == ops.Average and flat.dtype.kind == "f":     # pre-scaled, as on the host
            cp.divide(flat, contributors, out=flat)
        dev = gpu.cupy_device(w, cp)
        reduce = ops.OPS[op]
        if w.size > 1 and flat.size:
            if gpu.transport(w) == gpu.CUDA_AWARE:
                dev.stream.synchronize()   # the user's kernels writing `flat` must be done
                # ring.py's receive buffer: room for the largest chunk (chunk 0)
                scratch = dev.scratch("device", chunk_bounds(flat.size, w.size)[0][1], flat.dtype)
                ring_allreduce_(flat, w.comm, gpu.synced_reduce(getattr(cp, reduce.__name__), dev.stream),
                                scratch=scratch)
            else:
                segment = gpu.staging_segment(flat.itemsize, w.settings.staging_segment)
                staged_allreduce_(flat, w.comm, reduce, dev, segment)
        if op == ops.Average and flat.dtype.kind in "iu":   # (on a GPU, integer sums may wrap)
            cp.floor_divide(flat, contributors, out=flat)
    return True


def checked_allreduce_(flat: np.ndarray, op: str, shape: tuple, name: str | None,
                       group: int, layout: int) -> None:
    """Arm the agreement check (a tensor of `shape`, or `group` tensors of a fusion bucket
    whose shapes give `layout`), check finiteness if asked, reduce `flat`."""
    w = world()
    shared = shared_peers(flat, op) if w.windows else None     # (hot path) no windows, no look
    peers, place = shared if shared is not None else (None, 0)
    if type(flat) is not np.ndarray and gpu.is_device_array(flat):
        place = DEVICE          # host and device buffers take different paths: never mixed
    guard = w.checker.arm(ALLREDUCE, op, flat.dtype, shape, group=group, layout=layout,
                          place=place, name=name)
    if w.checker.finite and (flat.dtype.kind == "f" or ops.is_float(flat.dtype)) and not _all_finite(flat):
        if guard is None:   # a single rank
            raise FloatingPointError(f"allreduce{f' {name!r}' if name else ''}: NaN or "
                                     f"Inf in the input on rank {w.rank}")
        guard.poison(NONFINITE)
    allreduce_flat_(flat, op, guard, w.size, peers)


def _all_finite(flat: np.ndarray | Scattered) -> bool:
    if type(flat) is Scattered:
        return flat.all_finite()
    if isinstance(flat, np.ndarray):
        return ops.all_finite(flat)
    return bool(gpu.array_module(flat).isfinite(flat).all())


def unpacked_fusion(nbytes: int, dtype: np.dtype, op: str) -> bool:
    """Whether a fusion bucket of separate NumPy arrays is all-reduced as they lie
    (algorithms/scattered.py), with no fusion buffer: when it goes through the node's shared
    memory, whose copies in and out take the arrays directly. Not for buffers that ride on
    the opening (small), nor for integer averages (computed in parts: _integer_average)."""
    w = world()
    if (op == ops.Average and dtype.kind in "iu") or w.node is None or nbytes <= w.small_bytes:
        return False
    if w.tuner is not None and w.settings.allreduce == "auto":
        return w.tuner.choose(nbytes, w.checker.enabled) == "shared"
    return w.settings.allreduce in ("auto", "shared")


def reduce_(flat: np.ndarray | Scattered, op: str, shape: tuple, name: str | None = None, *,
            group: int = 1, layout: int = 0) -> None:
    """The all-reduce every front door ends in (fusion.py's buckets too).

    Inside a timed step, timing (timing/) has set World.probe: it wraps the whole armed call
    from outside, so in barrier mode its barrier is a collective of its own, made before this
    call is armed.
    """
    probe = world().probe
    if probe is None:
        checked_allreduce_(flat, op, shape, name, group, layout)
    else:
        probe(checked_allreduce_, (flat, op, shape, name, group, layout))


@front_door("allreduce")
def allreduce(x: object, op: str = ops.Sum, name: str | None = None) -> np.ndarray:
    """Reduce `x` elementwise across all ranks and return the result as a new array.

    `x` is left untouched; any shape and layout is accepted. Every rank gets the same bits.
    `name` labels the tensor in error messages (and must then agree across ranks).
    """
    with arguments_checked:
        op = ops.resolve_op(op)
        out = gpu.contiguous_copy(_as_array(x, "x"))
        check_name(name)
    reduce_(out.reshape(-1), op, out.shape, name)
    return out


def allreduce_(x: np.ndarray, op: str = ops.Sum, name: str | None = None) -> np.ndarray:
    """Reduce `x` elementwise across all ranks, in place, and return `x`."""
    try:
        with arguments_checked:
            op = op if op is ops.Sum else ops.resolve_op(op)     # (hot path) no look-up for the default
            flat = check_inplace(x, "x")
            flat = flat if flat.ndim == 1 else flat.reshape(-1)   # (hot path) reshape costs ~0.1 us
            if name is not None:
                check_name(name)
        w = world()
        checker = w.checker
        if flat.nbytes <= w.riding_bytes and w.probe is None and type(flat) is np.ndarray \
                and op != ops.Average and checker.enabled and not checker.finite:
            # (hot path) A small host buffer outside a timed step: what reduce_ would do, with
            # no layer between (checked_allreduce_, allreduce_flat_, _attempt: ~2-4 us a call).
            guard = checker.arm(ALLREDUCE, op, flat.dtype, x.shape, name=name)
            if not _ride_on_opening(flat, guard, ops.OPS[op], 0, w.rank):
                _redo_settled(flat, op, guard)
            return x
        reduce_(flat, op, x.shape, name)
        return x
    except BaseException as exc:     # (what front_door does, without its call)
        poison_node(exc, "allreduce")
        raise


@front_door("allreduce")
def allreduce_fused_(flat: np.ndarray, op: str, shapes: tuple[tuple[int, ...], ...],
                     name: str | None = None) -> np.ndarray:
    """Reduce a fusion buffer holding tensors of `shapes`, packed, in place; return it.

    Like allreduce_, but the agreement check also covers the number of tensors and their
    shapes, so ranks that packed different groups raise instead of mixing them up.
    """
    with arguments_checked:
        op = ops.resolve_op(op)
        flat = check_inplace(flat, "flat")
        if flat.ndim != 1:
            raise ValueError(f"flat must be 1-D, got shape {flat.shape}")
        shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        packed = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
        if packed != flat.size:
            raise ValueError(f"shapes hold {packed} elements but flat has {flat.size}")
        check_name(name)
    reduce_(flat, op, flat.shape, name, group=len(shapes), layout=layout_code(shapes))
    return flat


def layout_code(shapes: tuple[tuple[int, ...], ...]) -> int:
    """A code for a group's tensor shapes, the same in every process (hash of ints is)."""
    return hash(shapes)


def check_name(name: object) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")


def _check_root(root: object) -> int:
    n = world().size
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
        raise TypeError(f"root must be an int, got {type(root).__name__}")
    if not 0 <= root < n:
        raise ValueError(f"root must be in [0, {n}), got {root}")
    return int(root)


# --- broadcast, allgather, barrier -----------------------------------------------------------

def agree_or_settle(guard: Checker | None) -> bool:
    """The opening for a call with no payload; False when ranks have joined (the caller then
    goes on without them). Any other disagreement raises on every rank."""
    if guard is None:
        return True
    guard.agree()
    if guard.bad:
        guard.settle()          # raises on every rank, unless ranks have joined
        return False
    return True


@front_door("broadcast")
def broadcast_(x: np.ndarray, root: int = 0, name: str | None = None) -> np.ndarray:
    """Overwrite `x` on every rank with root's `x` (same shape and dtype everywhere); return `x`."""
    with arguments_checked:
        root = _check_root(root)
        check_inplace(x, "x")
        check_name(name)
    return _broadcast(x, root, name)


@front_door("broadcast")
def broadcast(x: object, root: int = 0, name: str | None = None) -> np.ndarray:
    """Return a copy of root's `x` on every rank; `x` itself is left untouched."""
    with arguments_checked:
        root = _check_root(root)
        out = gpu.contiguous_copy(_as_array(x, "x"))
        check_name(name)
    return _broadcast(out, root, name)


def _broadcast(x: np.ndarray, root: int, name: str | None) -> np.ndarray:
    w = world()
    device = gpu.is_device_array(x)
    # (host and device buffers take different roads on one node: the check keeps them apart)
    everyone = agree_or_settle(w.checker.arm(BROADCAST, "", x.dtype, x.shape, root=root,
                                              place=DEVICE if device else 0, name=name))
    if device:
        _broadcast_device(x.reshape(-1), root)   # same tree, same messages
    else:
        broadcast_flat_(x.reshape(-1), root, shared=everyone)
    return x


def broadcast_flat_(flat: np.ndarray, root: int, shared: bool = True) -> None:
    """The broadcast itself, after the opening (uneven.py.s joined ranks call it directly): a
    small one (RINGSYNC_SMALL_BYTES at most) on one node through its shared memory, else (or
    not `shared`) down a binomial tree of messages.

    Larger broadcasts take the tree even on one node: through the slots they ran 0.56-0.79x
    the tree's time in most launches but 2-4x in some (benchmarks/broadcast_allgather.py),
    where the ranks wait while the root alone copies. A call redone because ranks have
    joined goes by messages on every rank (shared=False): a joined rank cannot tell whether
    the others' buffers are on a GPU, whose broadcast is the same tree of messages."""
    w = world()
    if shared and w.single_node and flat.nbytes <= w.settings.small_bytes:
        shared_broadcast_(flat, w.node, root)
    else:
        tree_broadcast_(flat, w.comm, root)


def _allgather_blocks(blocks: list[np.ndarray], shared: bool = True) -> None:
    """Fill every rank's block of a host all-gather (this rank's is filled; every rank passes
    the same sizes): on one node through its shared memory when the blocks fit in a slot,
    else (or not `shared`, as for broadcast_flat_) around the ring. Larger blocks lose in
    shared memory: each is copied in and out, where a message is copied once
    (benchmarks/broadcast_allgather.py)."""
    w = world()
    if shared and w.single_node and max(b.nbytes for b in blocks) <= w.node.slot_bytes:
        shared_allgather_(blocks, w.node, owned=w.rank)
    else:
        ring_allgather_(blocks, w.comm, owned=w.rank)


def _broadcast_device(flat: Any, root: int) -> None:
    """broadcast of the contiguous 1-D CuPy array `flat` from `root`, in place."""
    cp, w = gpu.array_module(flat), world()
    with flat.device:
        dev = gpu.cupy_device(w, cp)
        if w.size > 1 and flat.size:
            if gpu.transport(w) == gpu.CUDA_AWARE:
                dev.stream.synchronize()
                tree_broadcast_(flat, w.comm, root)
            else:
                staged_broadcast_(flat, w.comm, root, dev)


@front_door("allgather")
def allgather(x: object, name: str | None = None) -> np.ndarray:
    """Concatenate every rank's `x` along axis 0, in rank order, on every rank.

    First dimensions may differ between ranks (as in Horovod); the rest of the shape and the
    dtype must agree, or every rank raises ValueError.
    """
    with arguments_checked:
        arr = gpu.array_module(x).ascontiguousarray(_as_array(x, "x"))
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim > _MAX_NDIM:
            raise ValueError(f"x has {arr.ndim} dimensions; allgather supports at most {_MAX_NDIM}")
        check_name(name)
    device = gpu.is_device_array(arr)
    w = world()
    guard = w.checker.arm(ALLGATHER, "", arr.dtype, arr.shape[1:], place=DEVICE if device else 0, name=name)
    row = _layout_row(arr)
    if guard is None or row.nbytes > guard.payload_limit:      # (a payload limit under 88 bytes)
        return allgather_rows(arr, shared=agree_or_settle(guard))
    # Every rank's layout rides on the opening, which is an all-gather of blocks itself.
    slots = guard.slots(row.dtype, row.size)        # slots[i]: rank r+i's
    slots[0][...] = row
    guard.agree(row.nbytes)
    if guard.bad:
        guard.settle()                  # raises on every rank, unless ranks have joined
        return allgather_rows(arr, shared=False)
    return allgather_rows(arr, layouts=[slots[(q - w.rank) % w.size].tolist() for q in range(w.size)])


def allgather_rows(arr: np.ndarray, shared: bool = True, layouts: list[list[int]] | None = None) -> np.ndarray:
    """The all-gather itself, after the opening (uneven.py.s joined ranks call it directly;
    `shared` as for broadcast_flat_): `layouts` are every rank's _layout_row, in rank order,
    when the opening has carried them, else exchanged here.

    The layouts are small lists of Python ints: a NumPy call on a few numbers costs more
    than the whole exchange of a small all-gather."""
    w = world()
    if layouts is None:
        table = np.zeros((w.size, _LAYOUT_INTS), dtype=np.int64)
        table[w.rank] = _layout_row(arr)
        _allgather_blocks(list(table), shared)
        layouts = table.tolist()
    firsts = _agreed_first_dims(layouts)
    xp = gpu.array_module(arr)
    with gpu.on_device_of(arr):         # the output lives on arr's GPU, not the current one
        out = xp.empty((sum(firsts),) + arr.shape[1:], dtype=arr.dtype)
    per_row = math.prod(arr.shape[1:])
    flat = out.reshape(-1)
    offsets = list(itertools.accumulate((n * per_row for n in firsts), initial=0))
    blocks = [flat[lo:hi] for lo, hi in itertools.pairwise(offsets)]
    blocks[w.rank][...] = arr.reshape(-1)
    if xp is np or w.size == 1:
        _allgather_blocks(blocks, shared)
    else:                                   # same ring, same messages, from device memory
        with arr.device:
            dev = gpu.cupy_device(w, xp)
            if gpu.transport(w) == gpu.CUDA_AWARE:
                dev.stream.synchronize()
                ring_allgather_(blocks, w.comm, owned=w.rank)
            else:
                staged_allgather_(blocks, w.comm, w.rank, dev)
    return out


_MAX_NDIM = 8
_LAYOUT_INTS = 3 + _MAX_NDIM


def _layout_row(arr: np.ndarray) -> np.ndarray:
    """(first dim, dtype, ndim, trailing dims...) as _LAYOUT_INTS int64s: what ranks compare."""
    row = np.zeros(_LAYOUT_INTS, dtype=np.int64)
    row[:3 + arr.ndim - 1] = (arr.shape[0], ops.dtype_code(arr.dtype), arr.ndim, *arr.shape[1:])
    return row


def _agreed_first_dims(rows: list[list[int]]) -> list[int]:
    """Every rank's first dimension, from every rank's layout row; ValueError (on every rank,
    as every rank sees the same rows) if dtypes or trailing shapes differ."""
    differ = [r for r, row in enumerate(rows) if row[1:] != rows[0][1:]]
    if differ:
        def layout(r: int) -> str:
            dtype = ops.dtype_name(rows[r][1])
            return f"rank {r}: {dtype} (*, {', '.join(str(d) for d in rows[r][3:2 + rows[r][2]])})"
        desc = "; ".join(layout(r) for r in [0, *differ])
        raise MismatchError(f"allgather: dtype or trailing shape differ across ranks ({desc})")
    return [row[0] for row in rows]


@front_door("barrier")
def barrier() -> None:
    """Block until every rank has called barrier()."""
    w = world()
    guard = w.checker.arm(BARRIER)
    if guard is None:
        dissemination_barrier(w.comm)
    else:
        # The opening is a barrier too: it gathers a block from every rank, in ceil(log2 p) rounds.
        agree_or_settle(guard)

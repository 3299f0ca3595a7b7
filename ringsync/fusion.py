"""Tensor fusion: all-reduce many small arrays as a few big ones.

A model has many gradient arrays, most of them small. One ring all-reduce per array pays
the ring's 2(p-1) message latencies every time; for a 16 KB array that latency is nearly
the whole cost. Horovod's answer is the *fusion buffer*: copy many arrays into one buffer
of up to `fusion_bytes`, run one all-reduce on it, and copy the results back. The copies
cost a memory pass each; the saved latencies are worth far more.

Here fusion goes one step further (as PyTorch DDP's gradient_as_bucket_view): when the
arrays already lie next to each other in memory -- views handed out by a `FlatBuffer`, as
the gradients of ringsync.training.nn's models are -- the bucket *is* a slice of that memory, and
it is reduced in place with no copy at all.

Planning a call, in three rules:
  1. arrays are grouped by dtype (a buffer holds one dtype), keeping their order;
  2. within a dtype, consecutive arrays fill a bucket until the next would pass the
     threshold; an array bigger than the threshold gets a bucket of its own;
  3. a bucket of one array, or of arrays adjacent in memory, is reduced where it lies;
     any other bucket is packed into the fusion buffer, reduced, and unpacked -- except
     through the node's shared memory, whose own copies in and out of its segment take the
     arrays where they lie (algorithms/scattered.py): no fusion buffer, two passes fewer.
A FlatBuffer's own `views` skip even the adjacency check: the buffer knows its layout, so
a whole model's gradients cost the same as one array of the same size.

The default threshold is 64 MiB (RINGSYNC_FUSION_THRESHOLD, in bytes; 0 disables fusion).
Horovod uses 128 MiB and DDP 25 MiB buckets. 64 MiB is where one ring all-reduce is long
past its latency-bound regime on any network, yet the buffer stays a modest, one-time
allocation per dtype. Smaller models (everything in ringsync's examples) fit in one bucket.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from threading import get_ident

import numpy as np

from . import ops, timing
from .algorithms.scattered import Scattered
from .collectives import arguments_checked, check_inplace, front_door, layout_code, reduce_, unpacked_fusion
from .context import world
from .transport.gpu import array_module, is_device_array, on_device_of
from .transport.shm import SharedWindow


def fusion_threshold(fusion_bytes: int | None = None) -> int:
    """The bucket size in bytes: `fusion_bytes` if given, else RINGSYNC_FUSION_THRESHOLD (read
    at init(), the same on every rank), else 64 MiB."""
    if fusion_bytes is None:
        return world().settings.fusion_threshold
    if isinstance(fusion_bytes, bool) or not isinstance(fusion_bytes, (int, np.integer)):
        raise TypeError(f"fusion_bytes must be an int, got {type(fusion_bytes).__name__}")
    if fusion_bytes < 0:
        raise ValueError(f"fusion_bytes must be >= 0, got {fusion_bytes}")
    return int(fusion_bytes)


def plan_buckets(nbytes: Sequence[int], dtypes: Sequence[np.dtype], threshold: int) -> list[list[int]]:
    """Group array indices into buckets: one dtype per bucket, at most `threshold` bytes each.

    Order is kept within a dtype. An array larger than the threshold (every array, when the
    threshold is 0) forms a bucket alone. Pure logic, so it is tested without MPI.
    """
    if sum(nbytes) <= threshold and len(set(dtypes)) == 1:
        return [list(range(len(nbytes)))]          # (the usual case: one bucket)
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, dt in enumerate(dtypes):
        by_dtype.setdefault(np.dtype(dt), []).append(i)
    buckets: list[list[int]] = []
    for indices in by_dtype.values():
        current, filled = [], 0
        for i in indices:
            if current and filled + nbytes[i] > threshold:
                buckets.append(current)
                current, filled = [], 0
            current.append(i)
            filled += nbytes[i]
        if current:
            buckets.append(current)
    return buckets


# --- memory adjacency: when a bucket needs no copy --------------------------------------------

def _address(a: np.ndarray) -> int:
    """The address of a C-contiguous array's first byte (a device address for CuPy)."""
    return a.data.ptr if is_device_array(a) else a.__array_interface__["data"][0]


def _owners(a: np.ndarray) -> Iterator[np.ndarray]:
    """`a`, then the arrays it is a view of (.base), out to the last array in the chain."""
    kinds = (np.ndarray, array_module(a).ndarray)
    while isinstance(a, kinds):
        yield a
        a = a.base


def contiguous_span(arrays: Sequence[np.ndarray]) -> np.ndarray | None:
    """A 1-D view covering `arrays` when they lie back to back in one array's memory, else None.

    Memory is what matters: if the arrays tile bytes [start, end) of an array they are views
    of exactly, in order, then reducing that span reduces each array exactly once. The span
    has the arrays' dtype whatever the owner's: a shared FlatBuffer's memory belongs to an
    array of raw bytes (transport/shm.py), viewed here as the arrays' dtype, so that a list
    of its views is the same buffer, in the same shared window, as the views themselves.
    """
    dtype = getattr(arrays[0], "dtype", None) if arrays else None
    first = begin = end = None
    for a in arrays:                     # one pass; separate arrays fail at the second one
        if not (isinstance(a, np.ndarray) or is_device_array(a)) or a.dtype != dtype:
            return None
        if not a.size:                   # empty arrays take no memory (and may point anywhere)
            continue
        if not a.flags.c_contiguous:
            return None
        if first is None:
            first, begin = a, _address(a)
            end = begin
        elif _address(a) != end:
            return None
        end += a.nbytes
    if first is None:
        return arrays[0].reshape(-1)
    nbytes = end - begin
    for owner in _owners(first):     # the innermost array holding every byte of the span
        start = begin - _address(owner)
        if start < 0 or start + nbytes > owner.nbytes or not owner.flags.c_contiguous \
                or not getattr(owner.flags, "writeable", True):
            continue
        flat = owner.reshape(-1)
        if owner.dtype == dtype and start % dtype.itemsize == 0:
            return flat[start // dtype.itemsize:(start + nbytes) // dtype.itemsize]
        # (another dtype: a shared window's raw bytes, transport/shm.py) its bytes as `dtype`
        return flat.view(np.uint8)[start:start + nbytes].view(dtype)
    return None


def _separate_host_arrays(arrays: Sequence[np.ndarray]) -> bool:
    """Whether the arrays are plain NumPy arrays of which no two share memory: what a bucket
    needs to be reduced where it lies, piece by piece (algorithms/scattered.py). Results
    written back for one piece must not be read again as input for the next, as they would
    be if an array came twice (a tied weight's gradient listed twice) or views overlapped;
    such a bucket is packed, which copies every input before writing anything."""
    if not all(type(a) is np.ndarray for a in arrays) or len({id(a) for a in arrays}) < len(arrays):
        return False
    if all(a.base is None for a in arrays):          # (the usual case: each owns its memory)
        return True
    spans = sorted((_address(a), a.nbytes) for a in arrays if a.size)
    return all(start + n <= nxt for (start, n), (nxt, _) in itertools.pairwise(spans))


# --- the fusion buffers: one per dtype, allocated once, grown when a bigger bucket comes ------

class _FusionBuffers:
    """A reusable 1-D buffer per backend, dtype and thread (as Horovod's fusion buffer; never shrinks).

    A bucket of CuPy arrays gets a CuPy buffer, one per device (ranks use one device each).
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple, np.ndarray] = {}

    def get(self, count: int, dtype: np.dtype, like: np.ndarray | None = None) -> np.ndarray:
        xp = np if like is None else array_module(like)
        # Per thread too: a blocking call packs its bucket before it waits for the asynchronous
        # calls in flight (handles.py), whose packed bucket the communication thread may still
        # be reducing in its own buffer.
        key = (xp.__name__, like.device.id if xp is not np else -1, np.dtype(dtype), get_ident())
        buf = self._bufs.get(key)
        if buf is None or buf.size < count:
            with on_device_of(like):        # on the bucket's GPU, not the current one
                buf = xp.empty(count, dtype=dtype)
            self._bufs[key] = buf
        return buf[:count]


_buffers = _FusionBuffers()


def reduce_bucket_span_(span: np.ndarray | Scattered, op: str, shapes: tuple[tuple[int, ...], ...]) -> None:
    """All-reduce a bucket's buffer; the agreement check also covers its tensor count and
    shapes (the same whether the tensors came as a FlatBuffer's views or as a list)."""
    reduce_(span, op, span.shape, group=len(shapes), layout=layout_code(shapes))


def _reduce_bucket(bucket: list[np.ndarray], op: str) -> None:
    """One all-reduce for the whole bucket: in place if adjacent; through shared memory, from
    and into the arrays where they lie; else packed into the fusion buffer."""
    span = bucket[0].reshape(-1) if len(bucket) == 1 else contiguous_span(bucket)
    shapes = tuple(a.shape for a in bucket)
    if span is not None:
        reduce_bucket_span_(span, op, shapes)
        return
    total = sum(a.size for a in bucket)
    if unpacked_fusion(total * bucket[0].itemsize, bucket[0].dtype, op) and _separate_host_arrays(bucket):
        reduce_bucket_span_(Scattered(bucket), op, shapes)    # no fusion buffer: shared.py copies
        return                                                # straight from and into the arrays
    buf = _buffers.get(total, bucket[0].dtype, like=bucket[0])
    t = timing.now()
    array_module(buf).concatenate([a.reshape(-1) for a in bucket], out=buf)   # pack: one pass
    timing.mark("pack", t)                            # (a span in --timeline traces)
    reduce_bucket_span_(buf, op, shapes)
    t = timing.now()
    offset = 0
    for a in bucket:                                  # unpack
        a.reshape(-1)[...] = buf[offset:offset + a.size]
        offset += a.size
    timing.mark("unpack", t)


def check_group(arrays: object, op: object, fusion_bytes: int | None) -> tuple[str, int]:
    """The arguments every grouped call shares: a list or tuple, an op, a threshold."""
    if not isinstance(arrays, (list, tuple)):
        raise TypeError(f"arrays must be a list or tuple of arrays, got {type(arrays).__name__}")
    return ops.resolve_op(op), fusion_threshold(fusion_bytes)


def checked_arrays(arrays: Sequence[object]) -> list[np.ndarray]:
    """The arrays of an in-place grouped call, checked (check_inplace), all NumPy or all CuPy.

    (hot path: a model has hundreds of arrays) Writeable C-contiguous NumPy arrays of a
    supported dtype, the usual case, pass in one loop with no call per array."""
    supported = ops.SUPPORTED
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype not in supported:
            break
        flags = a.flags
        if not (flags.c_contiguous and flags.writeable):
            break
    else:
        return list(arrays)
    checked = [check_inplace(a, f"arrays[{i}]") for i, a in enumerate(arrays)]
    if len({array_module(a) for a in checked}) > 1:
        raise TypeError("arrays mix NumPy and CuPy arrays; reduce host and device arrays in separate calls")
    return checked


@front_door("allreduce")
def grouped_allreduce_(arrays: Sequence[np.ndarray], op: str = ops.Sum,
                       fusion_bytes: int | None = None) -> list[np.ndarray]:
    """All-reduce every array in `arrays` in place, fused into few ring all-reduces; return them.

    Each array must be a writeable C-contiguous NumPy array; they may differ in dtype and shape.
    The result equals calling allreduce_ on each (exactly for integers, min and max; up to float
    rounding for sums, whose order depends on where an element sits in the ring's chunks) and
    is bitwise identical on every rank.
    """
    with arguments_checked:  # (a refusal fails the others' call too)
        op, threshold = check_group(arrays, op, fusion_bytes)
        if not isinstance(arrays, FlatViews):
            arrays = checked_arrays(arrays)
    if isinstance(arrays, FlatViews):                 # a FlatBuffer's views: no copy, no checks per array
        for span, shapes in arrays.owner.buckets(threshold):
            reduce_bucket_span_(span, op, shapes)
        return list(arrays)
    plan = plan_buckets([a.nbytes for a in arrays], [a.dtype for a in arrays], threshold)
    for bucket in plan:
        _reduce_bucket([arrays[i] for i in bucket], op)
    return arrays


@front_door("allreduce")
def grouped_allreduce(arrays: Sequence[object], op: str = ops.Sum,
                      fusion_bytes: int | None = None) -> list[np.ndarray]:
    """All-reduce every array in `arrays` and return new arrays; the inputs are left untouched.

    The outputs are views into one fresh FlatBuffer per dtype: the inputs are copied in once,
    and the reduction itself needs no further copy.
    """
    with arguments_checked:                         # validate before copying anything
        op, _ = check_group(arrays, op, fusion_bytes)
        sources = []
        for i, x in enumerate(arrays):
            a = array_module(x).asarray(x)            # CuPy arrays stay on their GPU
            ops.check_dtype(a.dtype, f"arrays[{i}]")
            sources.append(a)
    outputs: list[np.ndarray | None] = [None] * len(sources)
    for xp, dtype in dict.fromkeys((array_module(a), a.dtype) for a in sources):
        members = [i for i, a in enumerate(sources) if array_module(a) is xp and a.dtype == dtype]
        flat = FlatBuffer([sources[i].shape for i in members], dtype, xp)
        for i, view in zip(members, flat.views):
            view[...] = sources[i]
            outputs[i] = view
        grouped_allreduce_(flat.views, op=op, fusion_bytes=fusion_bytes)
    return outputs


class FlatViews(tuple):
    """A FlatBuffer's views: an immutable tuple that remembers its buffer (`owner`).

    grouped_allreduce_ recognises it and reduces slices of the flat buffer directly, with no
    per-array work at all: the fused all-reduce of a whole model costs what one buffer costs.
    """

    owner: FlatBuffer

    def __new__(cls, views: Sequence[np.ndarray], owner: FlatBuffer) -> FlatViews:  # noqa: PYI034
        self = super().__new__(cls, views)
        self.owner = owner
        return self


class FlatBuffer:
    """One contiguous 1-D array handed out as shaped views, back to back.

    Put a model's gradients here and fusing them costs no copy: grouped_allreduce_(fb.views)
    reduces `flat` (in slices of at most the fusion threshold) where it lies, as PyTorch DDP's
    gradient_as_bucket_view does. `xp` is the array module (NumPy, or CuPy for GPU arrays).

    shared=True puts `flat` in shared memory that the other ranks of the node can read
    (with the shared-memory transport on; otherwise it changes nothing): its all-reduce then
    reads the other ranks' buffers where they lie, with no copy at all (algorithms/shared.py).
    Such a buffer is made collectively, by every rank at the same point with the same shapes,
    and lives until close() (also collective; or `with`) or shutdown(), never until garbage
    collection, which would come at different moments on different ranks. Its views must
    not be used after that.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: object = np.float32, xp=np,
                 shared: bool = False) -> None:
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = [0, *np.cumsum(sizes, dtype=np.int64).tolist()]
        ops.check_dtype(np.dtype(dtype), "dtype")
        self.window: SharedWindow | None = None
        node = world().node if shared and xp is np else None
        if node is not None:
            dtype = np.dtype(dtype)
            self.window = SharedWindow(node.comm, self.offsets[-1] * dtype.itemsize)
            if not self.window.same_size:    # every rank sees every rank's size: all raise alike
                self.window.free()
                self.window = None
                raise ValueError("a shared FlatBuffer needs the same shapes and dtype on every "
                                 "rank of the node; the ranks' sizes differ")
            self.flat = self.window.mine.view(dtype)
            self.flat[...] = 0
            world().windows.append(self.window)
        else:
            self.flat = xp.zeros(self.offsets[-1], dtype=dtype)
        self.views = FlatViews([self.flat[a:b].reshape(shape) for a, b, shape in
                                zip(self.offsets, self.offsets[1:], self.shapes)], owner=self)
        self._buckets: dict[int, list] = {}

    @property
    def shared(self) -> bool:
        """Whether `flat` lives in the node's shared memory."""
        return self.window is not None

    def close(self) -> None:
        """Free a shared buffer's memory (collective over the node); nothing for a private one."""
        if self.window is not None:
            if not self.window.freed:     # (shutdown() may have freed it already)
                world().windows.remove(self.window)
                self.window.free()
            self.window = None
            self._buckets.clear()

    def __enter__(self) -> FlatBuffer:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.views)

    def buckets(self, threshold: int) -> list[tuple[np.ndarray, tuple[tuple[int, ...], ...]]]:
        """(slice of `flat`, its tensors' shapes) per bucket, grouped as plan_buckets groups
        the views (cached): the same buckets as a list of the views would give."""
        if threshold not in self._buckets:
            itemsize = self.flat.dtype.itemsize
            sizes = [(b - a) * itemsize for a, b in zip(self.offsets, self.offsets[1:])]
            plan = plan_buckets(sizes, [self.flat.dtype] * len(sizes), threshold)
            self._buckets[threshold] = [
                (self.flat[self.offsets[b[0]]:self.offsets[b[-1] + 1]], tuple(self.shapes[i] for i in b))
                for b in plan]
        return self._buckets[threshold]

"""Overlap backward with communication: gradient buckets in the order backward makes them.

Backward computes the last layer's gradients first and the first layer's last. Waiting for
all of them before any all-reduce leaves the link idle during backward and the cores idle
during the all-reduce. PyTorch DDP's reducer, copied here in small:

  * Buckets. The gradients are grouped from the last parameter to the first (a layer's
    weight and bias, written together, always in one bucket), up to a cap per bucket (the fusion threshold: RINGSYNC_FUSION_THRESHOLD or fusion_bytes=), the first
    bucket smaller (RINGSYNC_FIRST_BUCKET_BYTES, DDP's 1 MiB) so that communication starts
    early. Parameters lie back to back in the model's gradient FlatBuffer, so every bucket
    is one slice of it: no copy in, none out.
  * Launch. The model's backward announces each layer's gradients as it writes them
    (Params.grads_ready). When a bucket's last gradient is in, its all-reduce starts on the
    communication thread (handles.py), and backward goes on. Buckets start in bucket order
    on every rank, whatever order the gradients came in: the ranks' calls must match.
  * Step. step() waits only for what is still in flight, then updates.

Overlap on or off reduces the same buckets in the same order (off: one after another, after
backward), so the parameters are bitwise the same either way (tests/test_mpi_overlap.py).

Accumulation. backward_passes_per_step=k (Horovod's name) runs k backward passes before
one all-reduce; passes made inside no_sync() (DDP's name) are accumulated the same way. The
gradient reduced is the *mean* over the passes since the last step: k passes on batches of b
equal one pass on a batch of k*b, to rounding (DDP's no_sync sums instead; a mean keeps the
learning rate's meaning).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np

from .. import timing
from ..handles import Handle, synchronize
from .nn import Params


class Bucket(NamedTuple):
    """A slice [lo, hi) of the flat gradient holding parameters `members` (in memory order)."""

    lo: int
    hi: int
    members: tuple[int, ...]


def backward_buckets(nbytes: Sequence[int], first_cap: int, cap: int,
                     units: Sequence[Sequence[int]] | None = None) -> list[tuple[int, ...]]:
    """Parameter indices grouped from the last to the first: each bucket holds consecutive
    parameters up to `cap` bytes (the first bucket `first_cap`, if smaller); a parameter
    larger than its bucket's cap forms one alone. `units`: groups of consecutive indices
    that backward writes together (a layer's weight and bias), never split between buckets
    (a bias left in the next bucket would hold it back a whole layer); default, each index
    alone. Each bucket's indices in memory order. Pure logic (tests/test_overlap_plan.py)."""
    if units is None:
        units = [(i,) for i in range(len(nbytes))]
    buckets: list[tuple[int, ...]] = []
    current: list[int] = []
    filled = 0
    for unit in reversed(units):
        size = sum(nbytes[i] for i in unit)
        limit = min(first_cap, cap) if not buckets else cap
        if current and filled + size > limit:
            buckets.append(tuple(sorted(current)))
            current, filled = [], 0
        current.extend(unit)
        filled += size
    if current:
        buckets.append(tuple(sorted(current)))
    return buckets


class Reducer:
    """One model's gradient buckets, the gradient hook, and the asynchronous calls in flight.

    `launch(bucket)` starts a bucket's all-reduce and returns its Handle (overlap); `reduce(bucket)`
    does it blocking (overlap off). DistributedOptimizer provides both (plain or compressed).
    """

    def __init__(self, params: Params, first_cap: int, cap: int, overlap: bool, passes: int,
                 launch: Callable[[Bucket, np.ndarray], Handle],
                 reduce: Callable[[Bucket, np.ndarray], None]) -> None:
        self.params, self.overlap, self.passes = params, overlap, passes
        self.launch_fn, self.reduce_fn = launch, reduce
        offsets = params.offsets
        itemsize = params.flat_grad.dtype.itemsize
        sizes = [(b - a) * itemsize for a, b in itertools.pairwise(offsets)]
        self.buckets = [Bucket(offsets[m[0]], offsets[m[-1] + 1], m)
                        for m in backward_buckets(sizes, first_cap, cap, params.units())]
        self.bucket_of = {i: k for k, b in enumerate(self.buckets) for i in b.members}
        self.accumulated: np.ndarray | None = None      # the passes so far, summed (made on need)
        self.no_sync_depth = 0
        self.passes_done = 0        # backward passes completed since the last step
        self.final = False          # this step's gradients are complete and (overlap) launched
        self._reset_pass()
        self.handles: list[Handle] = []
        self.hook = _Hook(self)
        params.add_grad_hook(self.hook)

    def close(self) -> None:
        self.params.remove_grad_hook(self.hook)

    @property
    def hooked(self) -> bool:
        """Whether a step needs the gradient hook: overlap, or passes accumulated."""
        return self.overlap or self.passes > 1 or self.no_sync_depth > 0 or self.passes_done > 0

    def _reset_pass(self) -> None:
        self.missing = [len(b.members) for b in self.buckets]
        self.seen = 0
        self.next_launch = 0

    # -- the hook: backward has written some gradients -------------------------------------

    def before_backward(self) -> None:
        """Refuse a backward pass once the step's gradients are complete, before it writes any;
        forget a pass that an exception cut short (its buckets in flight are waited for)."""
        if self.final and self.hooked:
            raise RuntimeError("a backward pass after the gradients were complete: call step() "
                               f"after every {self.passes} backward pass(es) (backward_passes_per_step), "
                               "or run the extra passes inside no_sync()")
        if self.seen or self.handles:
            self._abandon_pass()

    def _abandon_pass(self) -> None:
        """The last pass raised part-way: wait for the buckets it started (their results are
        overwritten by the pass that follows; an error of theirs is dropped with them), and
        start the pass over. Gradients it averaged in place are written again by the next."""
        handles, self.handles = self.handles, []
        for h in handles:
            try:
                synchronize(h)
            except Exception:  # noqa: BLE001, S110 - the abandoned pass's; the redone one reports its own
                pass
        self._reset_pass()

    def _on_ready(self, names: list[str]) -> None:
        if not self.hooked:
            return
        if self.final:          # (a model that does not call Params.backward_starts)
            raise RuntimeError("a backward pass wrote gradients after they were complete: call "
                               f"step() after every {self.passes} backward pass(es) (backward_passes_per_step)")
        flat, offsets, index = self.params.flat_grad, self.params.offsets, self.params.index
        final = self.no_sync_depth == 0 and self.passes_done + 1 >= self.passes
        for name in names:
            i = index[name]
            lo, hi = offsets[i], offsets[i + 1]
            g = flat[lo:hi]
            if not final:               # an accumulating pass: keep its sum aside
                if self.accumulated is None:
                    self.accumulated = np.zeros_like(flat)
                if self.passes_done == 0:
                    self.accumulated[lo:hi] = g
                else:
                    self.accumulated[lo:hi] += g
            elif self.passes_done:      # the last pass: the mean over all of them
                g += self.accumulated[lo:hi]
                g /= self.passes_done + 1
            if final and self.overlap:
                self.missing[self.bucket_of[i]] -= 1
        self.seen += len(names)
        if final and self.overlap:
            # Launch every bucket that is complete, in bucket order (the same on every rank).
            while self.next_launch < len(self.buckets) and self.missing[self.next_launch] == 0:
                bucket = self.buckets[self.next_launch]
                self.handles.append(self.launch_fn(bucket, flat[bucket.lo:bucket.hi]))
                self.next_launch += 1
        if self.seen >= len(self.params.names):     # the pass is over
            self.passes_done += 1
            self.final = final
            self._reset_pass()

    # -- the step: all-reduce what is left, wait for what is in flight ---------------------

    def finish(self, reduce_now: Callable[[], None]) -> None:
        """The step's all-reduce: wait for the buckets in flight (overlap), else reduce_now()."""
        try:
            if self.hooked and not self.final:
                if self.overlap and not self.passes_done and not self.seen:
                    raise RuntimeError("overlap=True, but backward announced no gradient: the model must "
                                       "call Params.grads_ready as it writes them (ringsync's MLP does)")
                raise RuntimeError(f"step() with {self.passes_done} complete backward pass(es) since the "
                                   f"last step, outside no_sync(); backward_passes_per_step={self.passes}")
            if self.overlap:
                timing.synchronizing(self._wait_all)
            else:
                reduce_now()
        finally:
            self.passes_done, self.final = 0, False
            self._reset_pass()

    def reduce_buckets(self) -> None:
        """Overlap off with the same buckets: reduce them one after another, in bucket order."""
        flat = self.params.flat_grad
        for bucket in self.buckets:
            self.reduce_fn(bucket, flat[bucket.lo:bucket.hi])

    def _wait_all(self) -> None:
        """Synchronize every launched handle (all of them, even after one fails); raise the first error."""
        handles, self.handles = self.handles, []
        first: BaseException | None = None
        for h in handles:
            try:
                synchronize(h)
            except BaseException as exc:  # noqa: BLE001 - raised below, once all are synchronized
                first = first or exc
        if first is not None:
            raise first

    @contextmanager
    def no_sync(self) -> Any:
        """Backward passes in here accumulate, without communicating (DDP's no_sync)."""
        self.no_sync_depth += 1
        try:
            yield
        finally:
            self.no_sync_depth -= 1


class _Hook:
    """The Reducer as Params sees it: called with the names backward has written, and asked
    before a backward pass begins (Params.backward_starts)."""

    __slots__ = ("reducer",)

    def __init__(self, reducer: Reducer) -> None:
        self.reducer = reducer

    def __call__(self, names: list[str]) -> None:
        self.reducer._on_ready(names)

    def before_backward(self) -> None:
        self.reducer.before_backward()

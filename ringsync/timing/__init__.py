"""Barrier timing hooks: where each rank's step time goes, and what a straggler costs everyone.

In synchronous data parallelism no rank can finish the all-reduce before the last one has
joined it, so every step lasts as long as its slowest rank, and the others sit idle. This
module splits each rank's step into three parts:

    compute    everything outside synchronization: forward, backward, update, fusion packing
    wait       from this rank's arrival at the step's first collective until the last rank arrived
    transfer   the all-reduce itself (reported as allreduce_s)

"Until the last rank arrived" seems to need clocks that agree across hosts. It does not:
only durations, each measured on one rank's own clock, are compared. Nobody can leave a
synchronization point before the last rank has entered it, and everybody leaves within a few
message latencies of that moment. So the time a rank spends inside it is its wait plus a
common part, and the rank that arrived last spent only the common part there:

    wait_r = sync_r - min over ranks (sync)

`passive` mode (the default) takes the step's all-reduce itself as the synchronization point:
no extra message, and the error is the spread of the ring's finishing times (a chunk step or
so, since ranks leave the ring at slightly different moments). `barrier` mode runs ringsync's
barrier() just before the step's first all-reduce and times that instead: the error shrinks
to the barrier's exit spread, a few message latencies, and the all-reduce is timed clean, at
the price of one more synchronization per step.

Probes wrap the collective calls (collectives.py marks its all-reduce with `@probe`) and the
trainer's steps (`begin_step`, `end_step`); nothing below the collectives knows about timing.
The per-step durations are exchanged with ringsync's own allgather every `every` steps;
straggler.py turns them into the report, and inject.py adds the experiments' delays.
"""
from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from threading import get_ident
from typing import Any

import numpy as np

from .. import config
from ..collectives import allgather, barrier
from ..context import world
from . import timeline
from .inject import Delays, parse_jitter, parse_straggler
from .straggler import overlap_report, split_steps, straggler_report

MODES = ("off", "passive", "barrier")
DEFAULT_MODE = config.Settings.timing          # RINGSYNC_TIMING's default

now = time.perf_counter     # one monotonic clock per process; never compared across ranks

# A step's raw row: step_s, barrier_s, collective_s (the straggler split's inputs), then the
# communication thread's time in the step (comm_s) and the part of it that ran before the
# step's compute ended (hidden_s): the asynchronous API's overlap (handles.py).
ROW = 5


@dataclass
class StepRecord:
    """One rank's step. Locally wait_s is None and allreduce_s holds all synchronization time;
    after the ranks have compared notes (a gathered record) wait_s is split out of it."""
    step: int
    rank: int
    step_s: float
    compute_s: float
    wait_s: float | None
    allreduce_s: float


# --- the recorder: one per rank, fed by the probes ---------------------------------------------

class Recorder:
    """Per-step raw durations on this rank, the spans for the timeline, and the gathered table."""

    def __init__(self, mode: str, every: int, timeline: str | None) -> None:
        self.mode, self.every, self.timeline = mode, every, timeline
        self.step = 0
        self.start_t: float | None = None      # None outside a step: probes then stay quiet
        self.pending: list[tuple[float, ...]] = []   # ROW values per step (see ROW)
        self.blocks: list[np.ndarray] = []     # gathered (ranks, k, ROW) arrays, in step order
        self.spans: list[tuple[str, float, float, int]] = []  # (name, t0, t1, step), local clock
        self.owner = get_ident()               # the thread that times steps (not the communication thread)
        self.thread_spans: list[tuple[float, float]] = []      # this step's, from the communication thread
        self.compute_end: float | None = None

    def begin_step(self) -> None:
        self.start_t = now()
        self.barrier_s = self.collective_s = 0.0
        self.synced = False
        self.thread_spans = []
        self.compute_end = None

    def collective(self, fn: Callable, args: tuple, kwargs: dict | None = None) -> Any:
        if get_ident() != self.owner:          # the communication thread: thread_span times it
            return fn(*args, **(kwargs or {}))
        t0 = now()
        if not self.synced:                    # the step's first collective: its sync point
            self.synced = True
            if self.mode == "barrier":
                # ringsync's own barrier, guarded like every collective: a rank that is in
                # another call (or has joined) meets it with an error, not a hang.
                barrier()
                t1 = now()
                self.barrier_s = t1 - t0
                self._span("barrier", t0, t1)
                t0 = t1
        out = fn(*args, **(kwargs or {}))
        t1 = now()
        self.collective_s += t1 - t0
        self._span("allreduce", t0, t1)
        return out

    def _span(self, name: str, t0: float, t1: float) -> None:
        if self.timeline:
            self.spans.append((name, t0, t1, self.step))

    def end_step(self) -> None:
        if self.start_t is None:
            raise RuntimeError("timing.end_step() without a matching begin_step()")
        t = now()
        self._span("step", self.start_t, t)
        # The communication thread's calls of this step: all finished by now (step() waits
        # for them); hidden is their part before the compute ended, the rest was exposed.
        spans, comm_s, hidden_s = self.thread_spans, 0.0, 0.0
        if spans:
            cut = self.compute_end if self.compute_end is not None else t
            comm_s = sum(t1 - t0 for t0, t1 in spans)
            hidden_s = sum(max(0.0, min(t1, cut) - t0) for t0, t1 in spans)
        row = (t - self.start_t, self.barrier_s, self.collective_s, comm_s, hidden_s)
        self.pending.append(row)
        self.start_t = None
        if _local_hooks:
            compute = row[0] - row[1] - row[2]
            record = StepRecord(self.step, world().rank, row[0], compute, None, row[1] + row[2])
            for fn in _local_hooks:
                fn(record)
        self.step += 1
        if self.every and len(self.pending) >= self.every:
            self.gather()

    def gather(self) -> None:
        """Share the pending rows among ranks (ringsync's allgather), then call gathered hooks."""
        w = world()
        mine = np.array(self.pending, dtype=np.float64).reshape(-1, ROW)
        counts = allgather(np.array([len(mine)], dtype=np.int64))
        if (counts != counts[0]).any():        # every rank sees this, so every rank raises
            raise RuntimeError(f"timing: ranks recorded different numbers of steps {counts.tolist()}; "
                               "begin_step/end_step must run equally often on every rank")
        block = allgather(mine).reshape(w.size, -1, ROW)
        self.pending.clear()
        if not block.shape[1]:
            return
        self.blocks.append(block)
        if _gathered_hooks and w.rank == 0:
            first = self.step - block.shape[1]
            compute, wait, transfer = split_steps(*block.transpose(2, 0, 1)[:3], self.mode)
            for k in range(block.shape[1]):
                records = [StepRecord(first + k, r, float(block[r, k, 0]), float(compute[r, k]),
                                      float(wait[r, k]), float(transfer[r, k])) for r in range(w.size)]
                for fn in _gathered_hooks:
                    fn(records)

    def table(self) -> np.ndarray:
        """All gathered steps as one (ranks, steps, ROW) array (see ROW)."""
        if not self.blocks:
            return np.zeros((world().size, 0, ROW))
        return np.concatenate(self.blocks, axis=1)


# --- the module-level API ----------------------------------------------------------------------

_rec: Recorder | None = None
_delays: Delays | None = None
_local_hooks: list[Callable[[StepRecord], None]] = []
_gathered_hooks: list[Callable[[list[StepRecord]], None]] = []


def mode_from_env() -> str:
    """RINGSYNC_TIMING as init() read it (the same on every rank): off, passive or barrier."""
    return world().settings.timing


def start(mode: str | None = None, *, every: int | None = None, timeline: str | None = None,
          stragglers: dict[int, float] | None = None, jitter: str | None = None,
          seed: int = 0) -> None:
    """Start recording; collective (call on every rank after init). Defaults: RINGSYNC_TIMING,
    RINGSYNC_TIMING_EVERY, RINGSYNC_TIMELINE. `stragglers` {rank: seconds} and `jitter`
    ('exp:0.005') add sleeps to every step's compute, for experiments. A bad setting on any
    rank, or ranks that disagree, raise ValueError on every rank (never a hang later)."""
    global _rec, _delays
    w = world()
    error = None
    try:
        mode, every, timeline = _settings(mode, every, timeline, stragglers, w.size)
        delays = Delays(w.rank, stragglers, jitter, seed)
    except ValueError as exc:
        error, mode, every, timeline = str(exc), "off", 0, ""
    # The modes decide who calls which collective, so every rank must run the same ones.
    rows = allgather(np.array([[error is not None, MODES.index(mode), every, bool(timeline)]]))
    if rows[:, 0].any():
        raise ValueError(error or f"timing settings rejected on rank {int(np.flatnonzero(rows[:, 0])[0])}")
    if (rows != rows[0]).any():
        raise ValueError("ranks disagree on timing settings (mode, every, timeline): "
                         f"{[[MODES[m], e, bool(t)] for _, m, e, t in rows.tolist()]}")
    _rec = Recorder(mode, every, timeline or None) if mode != "off" else None
    _delays = delays if delays else None


def _settings(mode: str | None, every: int | None, timeline: str | None,
              stragglers: dict[int, float] | None, size: int) -> tuple[str, int, str]:
    """start()'s arguments checked, with the environment's defaults filled in."""
    mode = mode_from_env() if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    every = world().settings.timing_every if every is None else every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"every must be a whole number >= 0 (0: gather at finish only), got {every!r}")
    timeline = config.env_str("RINGSYNC_TIMELINE", "") if timeline is None else timeline
    if timeline and mode == "off":
        raise ValueError(f"a timeline ({timeline}) needs timing mode passive or barrier, not off")
    if timeline and not os.path.isdir(os.path.dirname(os.path.abspath(timeline))):
        raise ValueError(f"timeline {timeline!r}: its folder does not exist")
    for r, s in (stragglers or {}).items():
        if not 0 <= r < size or not s >= 0:
            raise ValueError(f"straggler {r}:{s}: rank must be in [0, {size}) and seconds >= 0")
    return mode, every, timeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags: --timing, --straggler RANK:SECONDS (repeatable), --jitter, --timeline."""
    def checked(parse: Callable) -> Callable:
        def check(text: str) -> Any:
            try:
                return parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        return check
    g = parser.add_argument_group("timing and straggler experiments")
    g.add_argument("--timing", choices=MODES, default=None,
                   help=f"how waits are measured (default RINGSYNC_TIMING or {DEFAULT_MODE})")
    g.add_argument("--straggler", action="append", default=[], metavar="RANK:SECONDS",
                   type=checked(parse_straggler), help="add SECONDS to every step of RANK (repeatable)")
    g.add_argument("--jitter", metavar="DIST", type=checked(lambda t: parse_jitter(t) and t),
                   help="random delay per step on every rank: exp:MEAN or uniform:MAX (seconds)")
    g.add_argument("--timeline", metavar="PATH.json", default=None,
                   help="write a Chrome/Perfetto trace, one track per rank (default RINGSYNC_TIMELINE)")


def start_from_args(args: argparse.Namespace, fail: Callable[[str], Any]) -> None:
    """start() from the flags add_arguments() defined; a bad setting goes to fail(message)."""
    stragglers: dict[int, float] = {}
    for rank, seconds in args.straggler:        # the same rank twice: the delays add up
        stragglers[rank] = stragglers.get(rank, 0.0) + seconds
    try:
        start(args.timing, timeline=args.timeline, stragglers=stragglers, jitter=args.jitter,
              seed=getattr(args, "seed", 0))
    except ValueError as exc:
        fail(str(exc))


def begin_step() -> None:
    """Mark the start of a training step (then sleep any injected delay, counted as compute).

    Until end_step(), the World's probe routes every all-reduce through the recorder."""
    if _rec is not None:
        _rec.begin_step()
        world().probe = _rec.collective
    if _delays is not None:
        _delays()


def end_step() -> None:
    """Mark the end of a training step; every `every` steps the ranks exchange their records."""
    if _rec is not None:
        world().probe = None
        _rec.end_step()


def compute_done() -> None:
    """Mark the end of this step's compute (the backward pass): the communication thread's
    time after it is exposed, before it hidden (the overlap report)."""
    rec = _rec
    if rec is not None and rec.start_t is not None:
        rec.compute_end = now()


def synchronizing(fn: Callable[[], Any]) -> Any:
    """Run fn(), the wait for a step's asynchronous calls, as the step's synchronization
    point: its time counts as the step's all-reduce time (where the straggler split looks)."""
    rec = _rec
    if rec is None or rec.start_t is None:
        return fn()
    return rec.collective(fn, ())


def thread_span(name: str, t0: float, t1: float) -> None:
    """From the communication thread: one asynchronous call ran from t0 to t1."""
    rec = _rec
    if rec is not None and rec.start_t is not None:
        rec.thread_spans.append((t0, t1))
        if rec.timeline:
            rec.spans.append((timeline.THREAD_PREFIX + name, t0, t1, rec.step))


def mark(name: str, t0: float) -> None:
    """Record a span `name` from `t0` (a timing.now() reading) to now, for the timeline."""
    rec = _rec
    if rec is not None and rec.timeline and rec.start_t is not None and get_ident() == rec.owner:
        rec.spans.append((name, t0, now(), rec.step))


class span:
    """`with timing.span("pack"):` marks a phase inside a step for the timeline (counted as compute)."""

    __slots__ = ("name", "t0")

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> span:  # noqa: PYI034
        self.t0 = now()
        return self

    def __exit__(self, *exc: object) -> None:
        mark(self.name, self.t0)


def probe(fn: Callable) -> Callable:
    """Decorator for a collective: inside a step, time it (and in barrier mode sync first)."""
    @functools.wraps(fn)
    def probed(*args: Any, **kwargs: Any) -> Any:
        rec = _rec
        if rec is None or rec.start_t is None:
            return fn(*args, **kwargs)
        return rec.collective(fn, args, kwargs)
    return probed


def on_step(fn: Callable | None = None, *, gathered: bool = False) -> Callable:
    """Register fn(record) to run after each step on each rank with its local StepRecord, or,
    with gathered=True, fn(records) on rank 0 with every rank's record of a step once they have
    been exchanged (every `every` steps, and at finish). Works as a decorator, with or without
    arguments: @on_step, @on_step(gathered=True)."""
    if fn is None:
        return functools.partial(on_step, gathered=gathered)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    (_gathered_hooks if gathered else _local_hooks).append(fn)
    return fn


def remove_hook(fn: Callable) -> None:
    """Unregister a function given to on_step (no error if it is not registered)."""
    for hooks in (_local_hooks, _gathered_hooks):
        while fn in hooks:
            hooks.remove(fn)


def finish() -> dict[str, Any] | None:
    """Stop recording (on every rank): gather the rest, write the timeline if asked, and return
    the straggler report (the same dict on every rank), or None when timing is off."""
    global _rec, _delays
    rec, _rec, _delays = _rec, None, None
    if rec is None:
        return None
    world().probe = None      # (a step left open by an exception)
    rec.gather()
    table = rec.table()
    report = straggler_report(table[..., 0], table[..., 1], table[..., 2], rec.mode)
    if table[..., 3].any():
        report["overlap"] = overlap_report(table[..., 3], table[..., 4])
    if rec.timeline:
        timeline.write_merged(rec.timeline, rec.spans, report["straggler"])
    return report

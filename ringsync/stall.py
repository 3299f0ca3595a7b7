"""Stall inspector: when a collective waits too long, say which ranks have not arrived.

In a synchronous job one slow, stuck or confused rank freezes all the others inside their
next collective, silently. The inspector is a watchdog thread on every rank, and the hot
path pays nothing for it: the thread wakes once per `interval`, reads the call counter the
agreement check keeps anyway, and looks at the other threads' Python stacks
(sys._current_frames) to see whether one is inside a collective. Only when the same call
has been in progress for longer than RINGSYNC_STALL_WARNING_S does it do anything more.

Then it asks every other rank's watchdog where its rank is (a query on a communicator of
its own, so it cannot disturb the collective's messages), and the lowest-numbered waiting
rank logs the diagnosis: which ranks are waiting in the call, which have not arrived yet
(and where they were last), and which did not answer. Past RINGSYNC_STALL_TIMEOUT_S (off
unless set), it aborts the whole job with that diagnosis rather than hang until a batch
system kills it without one.

A diagnosis reads only answers to its own query (each query has an id, echoed back; a late
answer to an earlier one is dropped), and is given only if the asking rank is still in the
call once the answers are in: otherwise the others' answers, from past the call, would name
them "already past" a call they were all in.
"""
from __future__ import annotations

import atexit
import sys
import threading
import time
from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI

from . import agreement, config, context

if TYPE_CHECKING:
    from .context import World

_QUERY, _ANSWER = 1, 2              # tags: (query id, call) -> (query id, call, inside, age ms)
_QUERY_INTS, _ANSWER_INTS = 2, 4


def start(world: World) -> Inspector | None:
    """The inspector for `world`, per RINGSYNC_STALL_WARNING_S / _TIMEOUT_S; None if both off."""
    warning = config.env_float("RINGSYNC_STALL_WARNING_S", 60.0)
    timeout = config.env_float("RINGSYNC_STALL_TIMEOUT_S", None)
    comm = world.comm.Dup()          # always: Dup is collective, settings might differ by rank
    if world.size == 1 or not (warning or timeout):
        comm.Free()
        return None
    return Inspector(world, comm, warning or None, timeout or None)


class Inspector:
    """The watchdog thread of one rank (see the module docstring)."""

    def __init__(self, world: World, comm: MPI.Comm, warning: float | None,
                 timeout: float | None) -> None:
        self.world, self.comm, self.checker = world, comm, world.checker
        self.warning, self.timeout = warning, timeout
        self.interval = min(1.0, min(t for t in (warning, timeout) if t) / 4)
        # Asking other ranks needs MPI calls from this thread, besides the main one.
        self.can_ask = MPI.Query_thread() >= MPI.THREAD_MULTIPLE
        self._stop = threading.Event()
        self._answers: dict[int, np.ndarray] = {}
        self._waiting: dict[int, MPI.Request] = {}
        self._query = 0                      # the id of this rank's latest query, echoed back
        self._sent: list[MPI.Request] = []
        self._changed = time.monotonic()     # when this rank's calls/done last changed
        self._thread = threading.Thread(target=self._watch, name="ringsync-stall-inspector",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.stop)           # before mpi4py finalizes MPI

    def stop(self) -> None:
        """End the thread and release its communicator (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        for req in list(self._waiting.values()):
            req.Cancel()
            req.Wait()
        deadline = time.monotonic() + 1.0       # tiny sends finish at once; never hang exit
        while self._sent and time.monotonic() < deadline:
            self._sent = [req for req in self._sent if not req.Test()]
        for req in self._sent:
            req.Free()
        self.comm.Free()

    # -- the watchdog loop ---------------------------------------------------------------

    def _watch(self) -> None:
        seen, since, warned = (-1, False), time.monotonic(), False
        while not self._stop.wait(self.interval):
            if self.can_ask:
                self._answer_queries()
            state = (self.checker.calls, inside_collective())
            now = time.monotonic()
            if state != seen:                 # progress (or a new call) since the last look
                seen, since, warned, self._changed = state, now, False, now
                continue
            calls, inside = state
            if not inside:                    # not in a collective: nothing to watch
                continue
            waited = now - since + self.interval   # it started before we first noticed it
            if self.timeout and waited >= self.timeout:
                report, _ = self._diagnose(calls, waited)
                if self._moved_on(state):     # the call ended while the others were asked
                    continue
                self._log(f"aborting the job: {report}")
                context.abort_job(3)      # once the launcher has read the diagnosis
            if self.warning and not warned and waited >= self.warning:
                warned = True
                report, first = self._diagnose(calls, waited)
                if first and not self._moved_on(state):
                    self._log(report)

    def _moved_on(self, state: tuple[int, bool]) -> bool:
        """Whether this rank has left the call `state` saw it in: the others' answers, given
        since, may then show them past it, and the diagnosis would misname them."""
        return (self.checker.calls, inside_collective()) != state

    @staticmethod
    def _log(text: str) -> None:
        sys.stderr.write(f"ringsync: stall inspector: {text}\n")
        sys.stderr.flush()

    # -- asking the other ranks ----------------------------------------------------------

    def _what(self, calls: int) -> str:
        """'allreduce 'name' (call #12)' when the agreement check knows the call, else less."""
        signature = self.checker.current
        if self.checker.enabled and signature and self.checker.call == calls:
            name = f" {self.checker.name!r}" if self.checker.name else ""
            return f"{agreement.KIND_NAMES.get(signature[0], 'a collective')}{name} (call #{calls})"
        return f"collective call #{calls}"

    def _answer_queries(self) -> None:
        """Tell any rank that asked: my call counter, whether I am in a collective, since when,
        after the query's id (so that the asker can tell this answer from a late one)."""
        status = MPI.Status()
        while self.comm.Iprobe(MPI.ANY_SOURCE, _QUERY, status):
            ask = np.empty(_QUERY_INTS, dtype=np.int64)
            self.comm.Recv(ask, status.Get_source(), _QUERY)
            me = np.array([ask[0], self.checker.calls, inside_collective(),
                           int((time.monotonic() - self._changed) * 1000)], dtype=np.int64)
            self._sent.append(self.comm.Isend(me, status.Get_source(), _ANSWER))
        self._sent = [req for req in self._sent if not req.Test()]

    def _expect(self, q: int) -> None:
        """Post the receive of rank q's next answer (into a buffer of its own)."""
        self._answers[q] = np.full(_ANSWER_INTS, -1, dtype=np.int64)
        self._waiting[q] = self.comm.Irecv(self._answers[q], q, _ANSWER)

    def _diagnose(self, calls: int, waited: float) -> tuple[str, bool]:
        """(the diagnosis, whether this rank is the lowest-numbered one waiting in the call)."""
        w = self.world
        head = f"rank {w.rank} has waited {waited:.1f} s in {self._what(calls)}"
        if not self.can_ask:
            return head + " (MPI has no thread support here to ask the other ranks)", True
        others = [q for q in range(w.size) if q != w.rank]
        # One receive outstanding per rank. A rank that did not answer an earlier query in
        # time may answer it now, or later: each query has an id, echoed in its answer, and
        # answers to earlier queries are dropped, so that no diagnosis reads an old state.
        self._query = query = self._query + 1
        for q in others:
            if q not in self._waiting:
                self._expect(q)
            self._sent.append(self.comm.Isend(np.array([query, calls], dtype=np.int64), q, _QUERY))
        answers: dict[int, tuple[int, ...]] = {}
        deadline = time.monotonic() + 2 * self.interval + 0.5
        while len(answers) < len(others) and time.monotonic() < deadline and not self._stop.is_set():
            self._answer_queries()
            for q in [q for q, req in self._waiting.items() if req.Test()]:
                answer = tuple(int(v) for v in self._answers[q])
                if answer[0] == query:
                    answers[q] = answer[1:]
                    del self._waiting[q]
                else:                       # an answer to an earlier query: wait for this one's
                    self._expect(q)
            time.sleep(self.interval / 10)
        waiting, missing, silent, left = [w.rank], [], [], []
        for q in others:
            if q not in answers:
                silent.append(q)
                continue
            their_calls, inside, age_ms = answers[q]
            if their_calls == calls and inside:
                waiting.append(q)
            elif their_calls < calls:
                where = (f"in call #{their_calls}" if inside
                         else f"outside any collective, after call #{their_calls}")
                missing.append(f"rank {q} ({where} for {age_ms / 1000:.1f} s)")
            else:
                left.append(q)
        parts = [head + ": it is waiting for " + (", ".join(missing) or "no rank it could name")]
        parts.append(f"waiting in the call: ranks {sorted(waiting)}")
        if left:
            parts.append(f"already past it: ranks {left}")
        if silent:
            parts.append(f"no answer from ranks {silent}")
        return "; ".join(parts), min(waiting) == w.rank


_COLLECTIVE_MODULES = ("ringsync.collectives", "ringsync.uneven", "ringsync.fusion")


def inside_collective() -> bool:
    """Is a thread of this process (other than the caller) inside a ringsync collective?

    Read off the threads' Python stacks: the front doors live in collectives.py, uneven.py and
    fusion.py (whose shared FlatBuffer is made collectively, too).
    """
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        while frame is not None and ident != me:
            if frame.f_globals.get("__name__") in _COLLECTIVE_MODULES:
                return True
            frame = frame.f_back
    return False

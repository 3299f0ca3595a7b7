"""`--sync backup:B`: synchronous SGD with B backup workers (Chen et al. 2016).

Each step goes ahead with the gradients of the first p-B ranks to arrive; the B slowest are
dropped for that step. Rank 0 is the step's aggregator (it also computes, like every rank):

  1. every other rank sends its gradient to rank 0 as soon as it is computed, tagged with
     the step, and waits for the step's result;
  2. rank 0, once its own gradient is ready, takes every gradient already sent to it, in the
     order MPI matches them (common.waiting: probing until many probes in a row find nothing,
     as MPI shows messages sent while rank 0 computed only a few probes later); it counts
     itself after them, and waits for more until p-B have arrived. The first p-B are the
     step's contributors; a late rank 0 (p-B others here before it) is dropped like any rank;
  3. it averages them and sends the average to every rank, late ones included. Every rank
     applies that same update, so the parameters stay bitwise identical;
  4. a late rank's gradient arrives after the result went out: rank 0 receives it at a later
     step and discards it, counting it as dropped. The late rank takes the step's result, and
     every later result already waiting for it: it applies each (so its parameters and
     momentum stay identical to everyone's) and skips ahead to the newest step, so it is
     never more than one step behind and never makes the others wait.

The average is computed as the front door computes one: each gradient is divided by p-B
first (so it cannot overflow), then the ranks are added in the order the front door's
all-reduce of this buffer adds them (collectives.summation_order: the ring's order, chunk c
from rank c round the ring, or rank order through the gathered or shared-memory reduce),
skipping dropped ranks. So with B = 0 each element sees the same operations in the same
order as bsp's all-reduce, and backup:0 reproduces bsp bit for bit; where that all-reduce
adds no single chain of ranks (recursive doubling on 3+ ranks, several nodes), rank order
is used and backup:0 equals bsp to rounding.

Limits, said plainly: rank 0 aggregates between its own steps, so a late rank 0 still holds
the step up (its own gradient is then dropped); and a dropped rank cannot abandon its late
work midway (the compute is one call), it finishes it, then skips to the newest step.
A rank's gradient stays in its own buffer until its send completes: a late rank may have
several sends in flight, and no buffer is reused before its send is done.
A message of the wrong size, dtype or step raises MismatchError on every rank.

Timing: ranks do not all run the same steps, so the barrier timing (which compares every
rank's k-th step) is off in this mode; a rank's "wait" is the time it spends in the exchange,
from its gradient being ready to holding the step's result.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from mpi4py import MPI

import ringsync as rs

from ...collectives import summation_order
from . import common

TAG_GRAD, TAG_RESULT = 1, 2
GRAD, BYE = 0, 1                    # kinds of message to rank 0
OK, MISMATCH, CLOSING = 0, 1, 2
ROOT = 0


class Backup:
    """One rank's side of backup:B; exchange() replaces the trainer's all-reduce phase."""

    name = "backup"

    def __init__(self, backups: int, params_flat: np.ndarray) -> None:
        self.p, self.rank = rs.size(), rs.rank()
        if not 0 <= backups < self.p:
            raise ValueError(f"backup:{backups} needs 0 <= B < ranks ({self.p})")
        common.agree_settings([backups, params_flat.size, common.dtype_code(params_flat.dtype)],
                              "backup:B settings (B, parameter count, dtype)")
        self.backups, self.need = backups, self.p - backups
        self.n, self.dtype = params_flat.size, params_flat.dtype
        self.comm = common.open_comm()
        self.step = 0                                          # this run's steps, same on all ranks
        self.used = np.zeros(self.p, dtype=np.int64)           # rank 0's counts, per rank
        self.dropped = np.zeros(self.p, dtype=np.int64)
        self.skipped = 0                                       # steps this rank jumped over
        self.sends: list = []                                  # (request, buffer) of gradients in flight
        self.spare: list = []                                  # buffers whose send has completed
        self.outbox: list = []                                 # rank 0: (request, buffer) of results
        self.grads = {r: np.empty(self.n, self.dtype) for r in range(self.p)} if self.rank == ROOT else {}
        # the front door's order of additions for this buffer (rank order where it has none)
        self.order = summation_order(self.n, self.dtype) or [(0, self.n, tuple(range(self.p)))]

    # --- every rank -------------------------------------------------------------------------

    def exchange(self, grad: np.ndarray, apply: Callable[[], None]) -> int:
        """Replace this rank's gradient with the step's average over the first p-B arrivals.

        A late rank may find several results waiting: it applies all but the newest with
        `apply()` (the optimizer's step, on the gradient buffer) and leaves the newest in
        `grad`. Returns how many steps it so skipped (0 on time; always 0 on rank 0).
        """
        skipped = 0
        if self.rank == ROOT:
            self._aggregate(grad)
        else:
            skipped = self._send_and_take(grad, apply)
        self.step += 1 + skipped
        self.skipped += skipped
        return skipped

    def _send_and_take(self, grad: np.ndarray, apply: Callable[[], None]) -> int:
        out = common.pack((self.step, grad.size, common.dtype_code(grad.dtype), GRAD), grad, self._free_buffer())
        self.sends.append((self.comm.Isend([out, MPI.BYTE], dest=ROOT, tag=TAG_GRAD), out))
        msg, _, _ = common.receive(self.comm, ROOT, TAG_RESULT, f"backup step {self.step}'s result")
        self._check_result(msg, self.step)
        if grad.size != self.n or grad.dtype != self.dtype:
            # Sent anyway, so that rank 0 names it and every other rank raises too.
            raise rs.MismatchError(f"backup: rank {self.rank}'s gradient has {grad.size} elements "
                                   f"({grad.dtype}), set up for {self.n} ({self.dtype.name})")
        skipped = 0
        for newer, _, _ in common.waiting(self.comm, ROOT, TAG_RESULT):    # results already here
            grad[...] = common.payload(msg, self.dtype)
            apply()                                  # the update everyone made at that step
            msg, skipped = newer, skipped + 1
            self._check_result(msg, self.step + skipped)
        grad[...] = common.payload(msg, self.dtype)
        return skipped

    def _free_buffer(self) -> np.ndarray | None:
        """A send buffer that no send in flight uses (None: pack makes one). A late rank can
        have several gradients on their way, rank 0 taking them only between its own steps:
        each keeps its buffer until its send has completed."""
        in_flight = []
        for req, buf in self.sends:
            if req.Test():
                self.spare.append(buf)
            else:
                in_flight.append((req, buf))
        self.sends = in_flight
        return self.spare.pop() if self.spare else None

    def _check_result(self, msg: np.ndarray, step: int) -> None:
        head = common.header(msg)
        if head[1] == MISMATCH:
            raise rs.MismatchError(bytes(msg[common.HEADER_BYTES:]).decode("utf-8", "replace"))
        if head[0] != step:
            raise rs.MismatchError(f"backup: rank {self.rank} is at step {step} but rank 0 sent "
                                   f"the result of step {int(head[0])}")

    # --- rank 0: the aggregator ---------------------------------------------------------------

    def _take(self, msg: np.ndarray, source: int, arrived: list[int], problems: list[str]) -> None:
        """File one gradient message: this step's joins `arrived` while fewer than p-B have
        (after that, and for an older step, it is dropped)."""
        step, size, code = (int(x) for x in common.header(msg)[:3])
        expected = (size == self.n and code == common.dtype_code(self.dtype)
                    and msg.size == common.HEADER_BYTES + self.n * self.dtype.itemsize)
        if not expected:
            problems.append(f"backup: rank {source} sent a gradient of {size} elements "
                            f"(dtype code {code}) at step {step}; rank 0 has {self.n} "
                            f"({self.dtype.name}): the ranks' models differ")
        elif step == self.step and source in arrived:
            problems.append(f"backup: rank {source} sent step {step}'s gradient twice")
        elif step == self.step and len(arrived) < self.need:
            self.grads[source][...] = common.payload(msg, self.dtype)
            arrived.append(source)
        elif step > self.step:
            problems.append(f"backup: rank {source} sent step {step}'s gradient while rank 0 is at step "
                            f"{self.step}: the ranks run different step sequences")
        else:                                        # too late: the step has (or had) its p-B
            self.dropped[source] += 1

    def _aggregate(self, grad: np.ndarray) -> None:
        arrived: list[int] = []
        problems: list[str] = []
        for msg, source, _ in common.waiting(self.comm, tag=TAG_GRAD):    # sent before mine was ready
            self._take(msg, source, arrived, problems)
        own_ok = grad.size == self.n and grad.dtype == self.dtype
        if not own_ok:
            problems.append(f"backup: rank 0's gradient has {grad.size} elements ({grad.dtype}), "
                            f"set up for {self.n} ({self.dtype.name})")
        elif len(arrived) < self.need:
            self.grads[ROOT][...] = grad
            arrived.append(ROOT)
        else:
            self.dropped[ROOT] += 1                  # p-B others were here first
        while len(arrived) < self.need and not problems:
            msg, source, _ = common.receive(self.comm, tag=TAG_GRAD, what=f"backup step {self.step}'s gradients")
            self._take(msg, source, arrived, problems)
        if problems:
            self._broadcast_result(MISMATCH, np.frombuffer(problems[0].encode(), dtype=np.uint8))
            raise rs.MismatchError(problems[0])
        self.used[arrived] += 1
        self._average_into(grad, arrived)
        self._broadcast_result(OK, grad)

    def _average_into(self, out: np.ndarray, contributors: list[int]) -> None:
        """Divide each gradient by the number of contributors, then add them span by span in
        the front door's order (self.order), skipping the dropped ranks: the front door's
        average (pre-scaled, so it cannot overflow), and with B = 0 its very bits."""
        members, count = set(contributors), len(contributors)
        for r in contributors:
            np.divide(self.grads[r], count, out=self.grads[r])
        for lo, hi, ranks in self.order:
            order = [r for r in ranks if r in members]
            acc = out[lo:hi]
            acc[...] = self.grads[order[0]][lo:hi]
            for r in order[1:]:
                np.add(self.grads[r][lo:hi], acc, out=acc)

    def _broadcast_result(self, status: int, body: np.ndarray) -> None:
        """Send the step's result to every rank without waiting for the late ones to take it
        (a large message completes only when its receiver looks for it)."""
        msg = common.pack((self.step, status), body)
        self.outbox = [(req, buf) for req, buf in self.outbox if not req.Test()]
        self.outbox.extend((self.comm.Isend([msg, MPI.BYTE], dest=r, tag=TAG_RESULT), msg)
                           for r in range(self.p) if r != ROOT)

    def evaluations(self) -> int:
        """Gradients computed so far, as rank 0 knows them (the ones still on their way aside)."""
        return int(self.used.sum() + self.dropped.sum())

    # --- the end ---------------------------------------------------------------------------

    def close(self) -> dict:
        """Every rank says goodbye to rank 0 after its last gradient; rank 0 takes (and drops)
        every late gradient before each goodbye, then tells every rank it is done, with any
        mismatch those carried; everyone checks nothing is left. Collective."""
        if self.rank == ROOT:
            problems: list[str] = []
            for r in range(1, self.p):
                while True:
                    msg, _, _ = common.receive(self.comm, r, TAG_GRAD, f"rank {r}'s last gradients")
                    if common.header(msg)[3] == BYE:
                        break
                    seen = len(problems)
                    self._take(msg, r, [], problems)
                    if len(problems) > seen:     # that rank raised after sending it: no goodbye
                        break
            status = MISMATCH if problems else CLOSING
            self._broadcast_result(status, np.frombuffer(problems[0].encode(), dtype=np.uint8)
                                   if problems else np.zeros(0, np.uint8))
            common.wait_sends([req for req, _ in self.outbox])
            self.outbox.clear()
            if problems:
                raise rs.MismatchError(problems[0])
        else:
            common.wait_sends([req for req, _ in self.sends])
            self.sends.clear()
            bye = common.pack((self.step, 0, 0, BYE))
            common.wait_sends([self.comm.Isend([bye, MPI.BYTE], dest=ROOT, tag=TAG_GRAD)])
            msg, _, _ = common.receive(self.comm, ROOT, TAG_RESULT, "backup's closing message")
            self._check_result(msg, self.step)
        common.close_comm(self.comm)
        used = rs.broadcast_(self.used, root=ROOT)
        dropped = rs.broadcast_(self.dropped, root=ROOT)
        skipped = rs.allgather(np.array([self.skipped], dtype=np.int64))
        computed = int(used.sum() + dropped.sum())
        return {"dropped_gradients": {"per_rank": dropped.tolist(), "total": int(dropped.sum()),
                                      "fraction": int(dropped.sum()) / computed if computed else 0.0,
                                      "used_per_rank": used.tolist(), "skipped_steps_per_rank": skipped.tolist(),
                                      "gradient_evaluations": computed, "backups": self.backups,
                                      "definition": "dropped: computed, arrived after its step went "
                                                    "ahead, discarded; skipped: steps a late rank "
                                                    "jumped over without computing"}}

"""`--sync backup:B`: synchronous SGD with B backup workers (Chen et al. 2016).

Each step goes ahead with the gradients of the first p-B ranks to arrive; the B slowest are
dropped for that step. Rank 0 is the step's aggregator (it also computes, like every rank):

  1. every other rank sends its gradient to rank 0 as soon as it is computed, tagged with
     the step, and waits for the step's result;
  2. rank 0, once its own gradient is ready, takes the gradients already waiting (a matched
     probe on any source meets them in the order they arrived), counts itself next, and
     waits for more until p-B have arrived; those p-B are the step's contributors;
  3. it averages them and sends the average to every rank, late ones included. Every rank
     applies that same update, so the parameters stay bitwise identical;
  4. a late rank's gradient arrives after the result went out: rank 0 receives it at a later
     step and discards it, counting it as dropped. The late rank takes the step's result, and
     every later result already waiting for it: it applies each (so its parameters and
     momentum stay identical to everyone's) and skips ahead to the newest step, so it is
     never more than one step behind and never makes the others wait.

The average is computed as the front door computes one: each gradient is divided by p-B
first (so it cannot overflow), then summed in the ring's order (ring.py): chunk c of the
buffer is accumulated starting from rank c and going round, skipping dropped ranks. So with
B = 0 each element sees the same operations in the same order as ring.py's all-reduce, and
backup:0 reproduces bsp bit for bit whenever bsp runs the ring (RINGSYNC_ALLREDUCE=ring, or
buffers above RINGSYNC_SMALL_BYTES; below it bsp uses the gathered reduce, equal to rounding).

Limits, said plainly: rank 0 aggregates between its own steps, so a late rank 0 still holds
the step up (its own gradient is then dropped); and a dropped rank cannot abandon its late
work midway (the compute is one call), it finishes it, then skips to the newest step.
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

from ...algorithms.ring import chunk_bounds
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
        self.sends: list = []                                  # gradients on their way to rank 0
        self.outbox: list = []                                 # rank 0: (request, buffer) of results
        self.send_bufs = [None, None]                          # alternate: the last one may be in flight
        self.grads = {r: np.empty(self.n, self.dtype) for r in range(self.p)} if self.rank == ROOT else {}
        self.bounds = chunk_bounds(self.n, self.p)

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
        if len(self.sends) > 1:                     # two sends ago: long since taken by rank 0
            common.wait_sends(self.sends[:1])
            del self.sends[0]
        k = self.step % 2
        self.send_bufs[k] = common.pack((self.step, grad.size, common.dtype_code(grad.dtype), GRAD),
                                        grad, self.send_bufs[k])
        self.sends.append(self.comm.Isend([self.send_bufs[k], MPI.BYTE], dest=ROOT, tag=TAG_GRAD))
        msg, _, _ = common.receive(self.comm, ROOT, TAG_RESULT, f"backup step {self.step}'s result")
        self._check_result(msg, self.step)
        if grad.size != self.n or grad.dtype != self.dtype:
            # Sent anyway, so that rank 0 names it and every other rank raises too.
            raise rs.MismatchError(f"backup: rank {self.rank}'s gradient has {grad.size} elements "
                                   f"({grad.dtype}), set up for {self.n} ({self.dtype.name})")
        skipped = 0
        while (newer := common.try_receive(self.comm, ROOT, TAG_RESULT)) is not None:
            grad[...] = common.payload(msg, self.dtype)
            apply()                                  # the update everyone made at that step
            msg, skipped = newer[0], skipped + 1
            self._check_result(msg, self.step + skipped)
        grad[...] = common.payload(msg, self.dtype)
        return skipped

    def _check_result(self, msg: np.ndarray, step: int) -> None:
        head = common.header(msg)
        if head[1] == MISMATCH:
            raise rs.MismatchError(bytes(msg[common.HEADER_BYTES:]).decode("utf-8", "replace"))
        if head[0] != step:
            raise rs.MismatchError(f"backup: rank {self.rank} is at step {step} but rank 0 sent "
                                   f"the result of step {int(head[0])}")

    # --- rank 0: the aggregator ---------------------------------------------------------------

    def _take(self, msg: np.ndarray, source: int, arrived: list[int], problems: list[str]) -> None:
        """File one gradient message: this step's joins `arrived`; an older one is dropped."""
        step, size, code = (int(x) for x in common.header(msg)[:3])
        expected = (size == self.n and code == common.dtype_code(self.dtype)
                    and msg.size == common.HEADER_BYTES + self.n * self.dtype.itemsize)
        if not expected:
            problems.append(f"backup: rank {source} sent a gradient of {size} elements "
                            f"(dtype code {code}) at step {step}; rank 0 has {self.n} "
                            f"({self.dtype.name}): the ranks' models differ")
        elif step == self.step:
            self.grads[source][...] = common.payload(msg, self.dtype)
            arrived.append(source)
        elif step > self.step:
            problems.append(f"backup: rank {source} sent step {step}'s gradient while rank 0 is at step "
                            f"{self.step}: the ranks run different step sequences")
        else:                                        # too late: that step went ahead without it
            self.dropped[source] += 1

    def _aggregate(self, grad: np.ndarray) -> None:
        arrived: list[int] = []
        problems: list[str] = []
        while (got := common.try_receive(self.comm, tag=TAG_GRAD)) is not None:   # here before me
            self._take(got[0], got[1], arrived, problems)
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
        """Divide each gradient by the number of contributors, then sum chunk c starting from
        rank c, round the ring: the front door's average (pre-scaled, so it cannot overflow)
        in ring.py's order."""
        members, count = set(contributors), len(contributors)
        for r in contributors:
            np.divide(self.grads[r], count, out=self.grads[r])
        for c, (lo, hi) in enumerate(self.bounds):
            order = [(c + k) % self.p for k in range(self.p) if (c + k) % self.p in members]
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
            common.wait_sends(self.sends)
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

"""The parameter server behind `--sync ssp:S` and `--sync async` (Dean et al. 2012, Ho et al. 2013).

Roles: ranks 0..K-1 are servers (`--servers K`, default 1), each holding one contiguous
shard of the flat parameters (ring.py's chunk_bounds) and its momentum; ranks K..p-1 are
workers. A worker repeats, at its own pace:

    receive parameters from every server  ->  compute a gradient  ->  push it to every server

A server applies each pushed gradient to its shard the moment it arrives (plain SGD with
momentum, the same update code as bsp), then replies with its current shard. Its version
counts the updates applied so far; a push carries the version its gradient was computed on,
and staleness = version now - that version. `--staleness-lr` scales the step to
lr / max(1, staleness) (Zhang et al. 2016).

The sample order is shared: server 0 hands out tickets 0, 1, 2, ... with its replies, and
ticket k means batch k of the one global order (epoch k // (N // b), its slice k mod (N // b)
of b samples) whichever worker draws it. An epoch is N // b updates of b samples, so a slow
worker draws fewer batches instead of ending every epoch late. When the tickets run out,
server 0 replies STOP; the worker then tells the other servers DONE and leaves. Each server
stops when every worker has left, having received every message sent to it.

ssp:S adds one rule at server 0: a worker that has pushed c gradients gets its next
parameters only when c - (the fewest pushes of any worker still running) <= S; until then
its reply is held. That hold is an ssp worker's "wait". With S unbounded (async) nothing is
held, and a worker's wait is the round trip from its push to the server's reply.
"""
from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

import ringsync as rs

from ... import timing
from ...algorithms.ring import chunk_bounds
from ..data import epoch_permutation, shard_indices
from ..nn import Params
from ..optim import SGD
from . import common
from .curve import Curve

TAG_TO_SERVER, TAG_TO_WORKER, TAG_CURVE = 1, 2, 3
PULL, PUSH, DONE = 0, 1, 2
STOP = -1


class ParameterServer:
    """One rank's part in a parameter-server run: a server loop or a worker loop."""

    def __init__(self, name: str, trainer, servers: int, bound: int | None, staleness_lr: bool,
                 curve: Curve) -> None:
        p, self.rank = rs.size(), rs.rank()
        if not 1 <= servers < p:
            raise ValueError(f"--sync {name} needs at least one worker: --servers {servers} on {p} rank(s)")
        self.name, self.trainer, self.servers, self.bound = name, trainer, servers, bound
        self.staleness_lr, self.curve = staleness_lr, curve
        n, dtype = trainer.params.data.size, trainer.params.data.dtype
        common.agree_settings([servers, -1 if bound is None else bound, int(staleness_lr), n,
                               common.dtype_code(dtype), trainer.total_steps],
                              f"{name} settings (servers, bound, staleness-lr, parameters, dtype, updates)")
        self.workers = list(range(servers, p))
        self.bounds = chunk_bounds(n, servers)
        self.dtype = dtype
        self.comm = common.open_comm()
        self.updates_done = 0               # this worker's pushes, or (servers) updates applied
        self.compute_s = self.wait_s = 0.0
        self.held_s = np.zeros(p)           # server 0: time each worker's reply was held (ssp)
        self.staleness: list[int] = []
        self.drift: list[float] = []
        self.points: list[tuple[float, int, np.ndarray]] = []   # servers: shard snapshots

    @property
    def is_server(self) -> bool:
        return self.rank < self.servers

    def run(self) -> float:
        """This rank's loop; returns its wall seconds."""
        t0 = time.perf_counter()
        self.curve.start()
        if self.is_server:
            self._serve()
        else:
            self._work()
        return time.perf_counter() - t0

    # --- servers ------------------------------------------------------------------------------

    def _serve(self) -> None:
        lo, hi = self.bounds[self.rank]
        shard = Params([("shard", (hi - lo,))], dtype=self.dtype)
        shard.data[...] = self.trainer.params.data[lo:hi]
        base = self.trainer.optimizer.optimizer
        sgd = SGD(shard, lr=base.lr, momentum=base.momentum, weight_decay=base.weight_decay)
        head0 = self.rank == 0
        active = set(self.workers)
        clocks = dict.fromkeys(self.workers, 0)
        pending: list[tuple[int, float]] = []      # server 0: (worker, when it asked)
        tickets = 0
        total = self.trainer.total_steps
        outbox: list = []                          # (request, buffer) of replies not yet taken
        expected_bytes = common.HEADER_BYTES + shard.data.nbytes

        def send(worker: int, ticket: int, with_params: bool) -> None:
            # Never wait here for the worker to take it: a worker held by ssp's bound at
            # server 0 takes the other servers' replies only when released, and a server
            # waiting on it would stall the workers the release is waiting for.
            outbox[:] = [(req, buf) for req, buf in outbox if not req.Test()]
            reply = common.pack((ticket, self.updates_done), shard.data if with_params else None)
            outbox.append((self.comm.Isend([reply, MPI.BYTE], dest=worker, tag=TAG_TO_WORKER), reply))

        def release() -> None:                     # server 0: answer every request the rules allow
            nonlocal tickets
            changed = True
            while changed and pending:
                changed = False
                for worker, asked in list(pending):
                    if tickets >= total:
                        send(worker, STOP, False)
                        active.discard(worker)
                    elif self.bound is None or clocks[worker] - min(clocks[w] for w in active) <= self.bound:
                        send(worker, tickets, True)
                        tickets += 1
                        self.held_s[worker] += time.perf_counter() - asked
                    else:
                        continue
                    pending.remove((worker, asked))
                    changed = True

        while active:
            msg, worker, _ = common.receive(self.comm, tag=TAG_TO_SERVER, what="a worker's message")
            kind, version = (int(x) for x in common.header(msg)[:2])
            if worker not in active:
                raise RuntimeError(f"{self.name}: server {self.rank} got a message from rank {worker}, "
                                   "which is not a running worker")
            if kind == PUSH:
                if msg.size != expected_bytes:
                    raise rs.MismatchError(f"{self.name}: worker {worker} pushed {msg.size} bytes to server "
                                           f"{self.rank}, which expects {expected_bytes}")
                stale = self.updates_done - version
                self.staleness.append(stale)
                sgd.lr = base.lr / max(1, stale) if self.staleness_lr else base.lr
                shard.flat_grad[...] = common.payload(msg, self.dtype)
                sgd.step()
                self.updates_done += 1
                clocks[worker] += 1
                if self.curve.due(self.updates_done):
                    self.points.append((time.perf_counter() - self.curve.t0, self.updates_done,
                                        shard.data.copy()))
                    self.curve.advance(self.updates_done)
            elif kind == DONE and not head0:
                active.discard(worker)
                continue
            elif kind != PULL:
                raise RuntimeError(f"{self.name}: server {self.rank} got message kind {kind} from {worker}")
            if head0:
                pending.append((worker, time.perf_counter()))
                release()
            else:
                send(worker, 0, True)
        common.wait_sends([req for req, _ in outbox])
        self.trainer.params.data[lo:hi] = shard.data

    # --- workers ------------------------------------------------------------------------------

    def _work(self) -> None:
        t = self.trainer
        b, n_train = t.args.batch_size, len(t.data.x_train)
        per_epoch = n_train // b
        w = t.params.data
        grad = t.params.flat_grad
        used = w.copy()
        versions = [0] * self.servers
        bufs: list = [None] * self.servers
        perm_epoch, perm = -1, None
        self._send_all([(PULL, 0)] * self.servers, None, bufs)
        while True:
            t0 = time.perf_counter()
            ticket = self._receive_all(w, versions)
            self.wait_s += time.perf_counter() - t0
            if self.updates_done:
                self.drift.append(common.relative_distance(used, w))
            if ticket == STOP:
                self._send_all([(DONE, 0)] * (self.servers - 1), None, bufs, first=1)
                return
            epoch, k = divmod(ticket, per_epoch)
            if epoch != perm_epoch:
                perm_epoch, perm = epoch, epoch_permutation(t.args.seed, epoch, n_train)
            idx = shard_indices(perm, k, b, 0, 1)
            xb = np.asarray(t.data.x_train[idx], dtype=t.args.dtype)
            t1 = time.perf_counter()
            timing.begin_step()                      # (sleeps here if --straggler/--jitter say so)
            t.compute_gradients(xb, np.asarray(t.data.y_train[idx]))
            timing.end_step()
            self.compute_s += time.perf_counter() - t1
            used[...] = w
            self._send_all([(PUSH, v) for v in versions], grad, bufs)
            self.updates_done += 1

    def _send_all(self, headers: list[tuple[int, int]], grad: np.ndarray | None, bufs: list,
                  first: int = 0) -> None:
        requests = []
        for i, head in enumerate(headers, start=first):
            lo, hi = self.bounds[i]
            bufs[i] = common.pack(head, None if grad is None else grad[lo:hi],
                                  None if grad is None else bufs[i])
            requests.append(self.comm.Isend([bufs[i], MPI.BYTE], dest=i, tag=TAG_TO_SERVER))
        common.wait_sends(requests)

    def _receive_all(self, w: np.ndarray, versions: list[int]) -> int:
        """Every server's reply (server 0's first: it carries the ticket); returns the ticket."""
        ticket = 0
        for i in range(self.servers):
            msg, _, _ = common.receive(self.comm, i, TAG_TO_WORKER, f"server {i}'s reply")
            head = common.header(msg)
            if i == 0:
                ticket = int(head[0])
            if int(head[0]) == STOP:
                continue
            lo, hi = self.bounds[i]
            versions[i] = int(head[1])
            w[lo:hi] = common.payload(msg, self.dtype)
        return ticket

    # --- the end (collective) ------------------------------------------------------------------

    def close(self) -> tuple[dict, dict]:
        """Gather the servers' parameters onto every rank, the curve onto rank 0, and the figures.
        Returns (report fields, timing report in the straggler report's shape)."""
        self._collect_curve()
        common.close_comm(self.comm)
        t = self.trainer
        for i, (lo, hi) in enumerate(self.bounds):
            rs.broadcast_(t.params.data[lo:hi], root=i)
        total = int(rs.broadcast_(np.array([self.updates_done], dtype=np.int64), root=0)[0])
        t.steps_run += total - t.step
        t.step = total
        fields = {"servers": self.servers, "workers": len(self.workers),
                  "staleness": self._staleness(), "param_divergence": self._drift()}
        if self.bound is not None:
            fields["ssp_bound"] = self.bound
        fields["staleness"]["lr_scaled"] = self.staleness_lr
        return fields, self._timing()

    def _collect_curve(self) -> None:
        """Server 0 assembles the full snapshots from every server's shards."""
        if self.rank == 0:
            shards = [[s for _, _, s in self.points]]
            for i in range(1, self.servers):
                msg, _, _ = common.receive(self.comm, i, TAG_CURVE, f"server {i}'s snapshots")
                count = int(common.header(msg)[0])
                shards.append(common.payload(msg, self.dtype).reshape(count, -1) if count else [])
            for j, (wall, units, _) in enumerate(self.points):
                self.curve.record(units, np.concatenate([s[j] for s in shards]), wall_s=wall)
        elif self.is_server:
            stack = np.array([s for _, _, s in self.points], dtype=self.dtype).reshape(-1)
            msg = common.pack((len(self.points),), stack)
            common.wait_sends([self.comm.Isend([msg, MPI.BYTE], dest=0, tag=TAG_CURVE)])

    def _staleness(self) -> dict:
        """Every server's staleness histogram, summed (each update counts once per server)."""
        top = int(rs.allreduce(np.array([max(self.staleness, default=0)], dtype=np.int64), op=rs.Max)[0])
        counts = np.bincount(np.asarray(self.staleness, dtype=np.int64), minlength=top + 1)[:top + 1]
        counts = rs.allreduce(counts.astype(np.int64), op=rs.Sum)
        return common.histogram(np.repeat(np.arange(top + 1), counts))

    def _drift(self) -> dict:
        row = np.array([[sum(self.drift), max(self.drift, default=0.0), len(self.drift)]])
        rows = rs.allgather(row)
        count = rows[:, 2].sum()
        return {"mean": float(rows[:, 0].sum() / count) if count else 0.0, "max": float(rows[:, 1].max()),
                "count": int(count),
                "definition": "||w_server - w_used|| / ||w_server||: the parameters a worker's gradient was "
                              "computed on against the server's when that push's reply came back"}

    def _timing(self) -> dict:
        held = rs.broadcast_(self.held_s.copy(), root=0)
        rows = rs.allgather(np.array([[0 if self.is_server else self.updates_done, self.compute_s, self.wait_s]]))
        ranks = [{"rank": r, "role": "server" if r < self.servers else "worker", "units": int(units),
                  "compute_s": float(compute), "wait_s": float(held[r] if self.bound is not None else reply),
                  "exchange_s": float(reply)} for r, (units, compute, reply) in enumerate(rows)]
        wait_is = ("time held by the staleness bound" if self.bound is not None
                   else "time from a push to the server's reply")
        return common.timing_report(self.name, wait_is, ranks)

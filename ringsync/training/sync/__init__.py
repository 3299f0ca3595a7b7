"""Synchronization modes for ringsync-train: how the ranks combine their work (`--sync MODE`).

    bsp         every step, one fused ring all-reduce of the gradients (train.py's own loop)
    backup:B    every step, the first p-B gradients to arrive; the B slowest dropped (backup.py)
    local:H     each rank steps alone; the ring averages the models every H steps (local.py)
    ssp:S       parameter server; the fastest worker at most S updates ahead (ssp.py, ps.py)
    async       parameter server; every worker at its own pace (asynchronous.py, ps.py)

Every mode uses the same hyperparameters (lr, momentum, per-rank batch, seed) and one global
sample order; every mode reports a learning curve and, with --target-accuracy, the time,
steps and samples it took to get there. bsp, backup and local count steps (each uses every
rank's batch); ssp and async count updates (each uses one worker's batch of --batch-size).
The modes other than bsp talk over a communicator of their own (common.py), with
point-to-point messages only. See docs/sync-vs-async.md for what the modes cost and buy.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import ringsync as rs

from ...timing.straggler import format_report
from . import asynchronous, common, ssp
from .backup import Backup
from .curve import Curve, to_accuracy
from .local import Local

MODES = ("bsp", "backup:B", "local:H", "ssp:S", "async")
CURVE_POINTS = 40          # default curve interval: about this many points per run


@dataclass(frozen=True)
class SyncSpec:
    kind: str               # bsp, backup, local, ssp, async
    value: int | None       # B, H or S
    text: str

    @property
    def parameter_server(self) -> bool:
        return self.kind in ("ssp", "async")


def parse_sync(text: str) -> SyncSpec:
    """'bsp', 'backup:B', 'local:H', 'ssp:S' or 'async' -> SyncSpec; ValueError naming the text."""
    kind, sep, value = str(text).strip().partition(":")
    if kind in ("bsp", "async") and not sep:
        return SyncSpec(kind, None, kind)
    if kind in ("backup", "local", "ssp") and sep:
        try:
            n = int(value)
        except ValueError:
            n = -1
        low = 1 if kind == "local" else 0
        if n >= low:
            return SyncSpec(kind, n, f"{kind}:{n}")
    raise ValueError(f"must be one of {', '.join(MODES)} (B, S >= 0, H >= 1), got {text!r}")


def add_arguments(parser: argparse.ArgumentParser, number: Callable, fraction: Callable) -> None:
    """The trainer's --sync flags; `number` and `fraction` are its argparse types."""
    def spec(text: str) -> SyncSpec:
        try:
            return parse_sync(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    g = parser.add_argument_group("synchronization (docs/sync-vs-async.md)")
    g.add_argument("--sync", type=spec, default=parse_sync("bsp"), metavar="MODE",
                   help="bsp (default), backup:B, local:H, ssp:S or async")
    g.add_argument("--servers", type=number, default=None, metavar="K",
                   help="ssp/async: ranks 0..K-1 hold the parameters, sharded (default 1)")
    g.add_argument("--staleness-lr", action="store_true",
                   help="ssp/async: scale each update's lr to lr / max(1, staleness)")
    g.add_argument("--target-accuracy", type=fraction, default=None, metavar="A",
                   help="report the time, steps and samples to reach test accuracy A")
    g.add_argument("--curve-every", type=number, default=None, metavar="N",
                   help=f"learning-curve interval in steps (updates for ssp/async); "
                        f"default: about {CURVE_POINTS} points")


def check_args(args: argparse.Namespace, size: int, fail: Callable[[str], Any]) -> None:
    """Refuse, in one line each, what a mode cannot do; fix the timing settings of ssp/async."""
    spec = args.sync
    compression = getattr(args, "compression_text", "none")
    if spec.kind != "bsp" and compression != "none":
        fail(f"--compression {compression} works with --sync bsp only, not {spec.text}: "
             "it compresses the gradients of bsp's all-reduce")
    if spec.kind != "bsp" and args.device != "cpu":
        fail(f"--sync {spec.text} runs on --device cpu only")
    if not spec.parameter_server and (args.servers is not None or args.staleness_lr):
        fail(f"--servers and --staleness-lr are for --sync ssp:S and async, not {spec.text}")
    if spec.kind == "backup" and spec.value >= size:
        fail(f"--sync {spec.text}: B must be smaller than the {size} rank(s)")
    if spec.kind in ("local", "ssp", "async"):
        for flag in ("save", "resume"):
            if getattr(args, flag):
                reason = ("the ranks' momentum differs and one file holds one" if spec.kind == "local"
                          else "the servers' state is not checkpointed")
                fail(f"--{flag} is not supported with --sync {spec.text}: {reason}")
    if spec.parameter_server:
        servers = args.servers = args.servers or 1
        if servers >= size:
            fail(f"--sync {spec.text} needs a worker: --servers {servers} leaves none of {size} rank(s)")
        for rank, _ in args.straggler:
            if rank < servers:
                fail(f"--straggler {rank}: rank {rank} is a parameter server in --sync {spec.text}; "
                     f"slow a worker (rank >= {servers})")
    if spec.parameter_server or spec.kind == "backup":
        # Ranks here run different steps, so the barrier timing (rank r's k-th step against
        # everyone's k-th) does not apply; the mode reports its own waits instead.
        if args.timeline:
            fail(f"--timeline is not supported with --sync {spec.text}: the ranks do not share steps")
        if args.timing == "barrier":
            fail(f"--timing barrier is not supported with --sync {spec.text}: the ranks do not share steps")
        args.timing, args.timeline = "off", ""    # the injected delays still apply


class SyncRun:
    """A trainer run under one mode: run() trains, finish() gives the report's extra fields."""

    def __init__(self, args: argparse.Namespace, trainer) -> None:
        self.args, self.trainer, self.spec = args, trainer, args.sync
        self.rank = rs.rank()
        if self.spec.parameter_server:        # an update is one worker's batch of b samples
            n, b = len(trainer.data.x_train), args.batch_size
            trainer.global_batch, trainer.steps_per_epoch = b, n // b
            trainer.total_steps = args.epochs * trainer.steps_per_epoch
            if args.max_steps:
                trainer.total_steps = min(trainer.total_steps, args.max_steps)
        interval = args.curve_every or max(1, trainer.total_steps // CURVE_POINTS)
        self.curve = Curve(interval, trainer.global_batch)
        self.mode: Any = None
        if self.spec.kind == "backup":
            self.mode = Backup(self.spec.value, trainer.params.data)
            trainer.allreduce_gradients = self._backup_exchange
            trainer.apply_update = trainer.optimizer.optimizer.step     # the plain SGD step
        elif self.spec.kind == "local":
            self.mode = Local(self.spec.value, trainer.params, trainer.optimizer.optimizer)
            trainer.allreduce_gradients = lambda: None
            trainer.apply_update = self.mode.apply_update
        elif self.spec.parameter_server:
            make = ssp.make if self.spec.kind == "ssp" else asynchronous.make
            self.mode = make(trainer, self.spec.value, args.servers, args.staleness_lr, self.curve)

    def run(self, loop: Callable, quiet: bool = False) -> float:
        """Train; returns this rank's wall seconds. `loop` is train.run (bsp's loop)."""
        if self.spec.parameter_server:
            return self.mode.run()
        self.curve.start(self.trainer.step)
        return loop(self.trainer, quiet=quiet, after_step=self._after_step)

    def _backup_exchange(self) -> None:
        """backup:B's all-reduce phase; a late rank skips the steps it missed (backup.py)."""
        t = self.trainer
        t.step += self.mode.exchange(t.params.flat_grad, t.optimizer.optimizer.step)

    def _after_step(self) -> None:
        if self.rank != 0 or not self.curve.due(self.trainer.step):
            return
        samples = None
        if self.spec.kind == "local" and not self.mode.averaged():
            return                             # the ranks' models differ until the next averaging
        if self.spec.kind == "backup":         # the gradients computed, not p per step
            samples = self.mode.evaluations() * self.args.batch_size
        self.curve.record(self.trainer.step, self.trainer.params.data, samples=samples)

    def finish(self, seconds: float) -> tuple[dict, dict | None]:
        """Close the mode (collective); evaluate the curve on rank 0. Returns (report fields,
        the timing report of ssp/async, which replaces the barrier timing's)."""
        fields: dict = {"sync": self.spec.text}
        timing_report = None
        if self.spec.kind == "backup":
            fields.update(self.mode.close())
            timing_report = self._backup_timing()
            computed = fields["dropped_gradients"]["gradient_evaluations"] * self.args.batch_size
            fields["samples_per_second"] = computed / seconds if seconds > 0 else 0.0
        elif self.spec.kind == "local":
            fields.update(self.mode.close())
        elif self.spec.parameter_server:
            more, timing_report = self.mode.close()
            fields.update(more)
        t = self.trainer
        if self.rank == 0 and (not self.curve.snapshots or self.curve.snapshots[-1][1] < t.step):
            samples = None
            if self.spec.kind == "backup":
                samples = fields["dropped_gradients"]["gradient_evaluations"] * self.args.batch_size
            self.curve.record(t.step, t.params.data, wall_s=seconds, samples=samples)   # the final model
        points = self._evaluate() if self.rank == 0 else []
        fields.update({"curve_every": self.curve.interval,
                       "curve_units": "updates" if self.spec.parameter_server else "steps",
                       "curve": points, **to_accuracy(points, self.args.target_accuracy)})
        return fields, timing_report

    def _backup_timing(self) -> dict:
        """backup's waits: each rank's time in the exchange (from the trainer's phase clocks)."""
        t = self.trainer
        row = np.array([[t.steps_run, t.phase_seconds["compute"], t.phase_seconds["allreduce"]]])
        rows = [{"rank": r, "role": "rank", "units": int(units), "compute_s": float(compute),
                 "wait_s": float(wait), "exchange_s": float(wait)}
                for r, (units, compute, wait) in enumerate(rs.allgather(row))]
        return common.timing_report(self.spec.text, "time from a rank's gradient being ready to "
                                    "holding the step's result", rows)

    def _evaluate(self) -> list[dict]:
        t = self.trainer
        w = t.params.data
        final = w.copy()

        def on(split: str) -> Callable[[np.ndarray], float]:
            def evaluate(params: np.ndarray) -> float:
                w[...] = params
                loss, acc = t.evaluate(getattr(t.data, f"x_{split}"), getattr(t.data, f"y_{split}"))
                return loss if split == "train" else acc
            return evaluate
        try:
            return self.curve.points(on("train"), on("test"))
        finally:
            w[...] = final


def format_timing(report: dict) -> str:
    """The timing table of any mode: the parameter server's, or the straggler report."""
    return common.format_timing(report) if "wait_is" in report["straggler"] else format_report(report)

"""`ringsync-train`: synchronous data-parallel SGD of a small MLP, on every rank of an MPI job.

    mpiexec -n 4 ringsync-train                       # digits, default settings
    mpiexec -n 4 ringsync-train --epochs 5 --save ckpt.npz --report report.json
    mpiexec -n 4 ringsync-train --resume ckpt.npz --epochs 10 --save ckpt.npz

Each step has three phases, kept apart so they can be timed and studied one by one:
  1. compute_gradients   forward and backward on this rank's slice of the global batch;
  2. allreduce_gradients one fused ring all-reduce averages the gradients over all ranks;
  3. apply_update        every rank applies the same SGD update to the same parameters.
So all ranks hold the same model, bit for bit, after every step; the summary proves it by
comparing parameter hashes across ranks. --batch-size is per rank (Horovod's convention):
the global batch is ranks x batch size, and the learning rate applies to its average gradient.
That is --sync bsp, the default; --sync backup:B, local:H, ssp:S and async combine the
ranks' work in other ways (ringsync/training/sync/, docs/sync-vs-async.md). --compression fp16, bf16
or powersgd:R compresses the gradients on their way through bsp's all-reduce, with or without
error feedback (ringsync/training/compression.py, docs/compression.md).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np

import ringsync as rs

from .. import cli, ops, timing
from ..cli import float_at_least, int_at_least
from ..files import atomic_write_text
from ..timing.straggler import format_overlap, merge_report
from ..transport import gpu
from . import sync
from .checkpoint import (
    CheckpointError,
    load_checkpoint_with_compression,
    pack_state,
    save_checkpoint,
    unpack_state,
)
from .compression import parse_compression
from .data import (
    DataError,
    Dataset,
    epoch_permutation,
    load_digits_dataset,
    load_npz_dataset,
    shard_indices,
    steps_per_epoch,
    synthetic_dataset,
)
from .nn import MLP
from .optim import SGD, DistributedOptimizer, broadcast_parameters

PROG = "ringsync-train"
DEFAULT_EPOCHS = 20
# The default momentum depends on --sync: stale gradients (ssp, async) act like extra momentum,
# and 0.9 then diverges (docs/sync-vs-async.md); bsp and the other modes keep 0.9, with which
# their published figures were measured.
DEFAULT_MOMENTUM = 0.9
STALE_MOMENTUM = 0.5


# --- command line: every mistake exits 2 with one line, printed once (rank 0) ---------------

def fail(message: str) -> NoReturn:
    """Print `ringsync-train: error: message` on rank 0 and exit 2 on every rank."""
    cli.fail(PROG, message)


def _widths(text: str) -> list[int]:
    """'128,64' -> [128, 64]; '' -> [] (no hidden layer: softmax regression)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        widths = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated whole numbers, got {text!r}") from None
    if any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"every width must be >= 1, got {text!r}")
    return widths


def _fraction(text: str) -> float:
    """An argparse type: a number in [0, 1]."""
    value = float_at_least(0.0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _compression(text: str) -> str:
    """An argparse type: none, fp16, bf16 or powersgd:R (checked here; built in parse_args)."""
    try:
        parse_compression(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except Exception:  # noqa: BLE001, S110 - bf16 without ml_dtypes: parse_args refuses it in one line
        pass
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(prog=PROG, description="Data-parallel SGD of a small MLP over ringsync's ring all-reduce.")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=["digits", "synthetic"], default=None,
                   help="built-in data set (default digits: scikit-learn's 1,797 8x8 images)")
    d.add_argument("--data", metavar="PATH.npz", help="your own data: an .npz with arrays X and y")
    d.add_argument("--samples", type=int_at_least(2), default=10_000, help="synthetic: samples (10000)")
    d.add_argument("--features", type=int_at_least(1), default=64, help="synthetic: features (64)")
    d.add_argument("--classes", type=int_at_least(2), default=10, help="synthetic: classes (10)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int_at_least(1), default=DEFAULT_EPOCHS,
                   help=f"passes over the training set (default {DEFAULT_EPOCHS})")
    t.add_argument("--max-steps", type=int_at_least(1), default=None, help="stop after this many steps in all")
    t.add_argument("--batch-size", type=int_at_least(1), default=32, help="samples per rank per step (32)")
    t.add_argument("--lr", type=float_at_least(0.0), default=0.1, help="learning rate (0.1)")
    t.add_argument("--momentum", type=float_at_least(0.0), default=None,
                   help=f"SGD momentum (default {DEFAULT_MOMENTUM}; {STALE_MOMENTUM} with --sync ssp:S or async)")
    t.add_argument("--weight-decay", type=float_at_least(0.0), default=0.0, help="L2 weight decay (0)")
    t.add_argument("--hidden", type=_widths, default=[128, 64], help="hidden widths, e.g. 128,64 (default)")
    t.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="parameter dtype")
    t.add_argument("--seed", type=int_at_least(0), default=0, help="model init and sample order (0)")
    t.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: NumPy; gpu: CuPy on device local_rank %% count (RINGSYNC_GPU_DEVICE overrides)")
    t.add_argument("--fusion-mb", type=float_at_least(0.0), default=None,
                   help="fusion buffer in MiB; 0 disables fusion (default RINGSYNC_FUSION_THRESHOLD or 64)")
    v = p.add_argument_group("overlap and accumulation (docs/overlap.md)")
    v.add_argument("--overlap", action="store_true",
                   help="start each gradient bucket's all-reduce during backward, as soon as it is "
                        "complete (--sync bsp)")
    v.add_argument("--buckets", choices=["fused", "backward"], default=None,
                   help="the all-reduce's buckets: fused (parameter order, one per fusion threshold; the "
                        "default without --overlap) or backward (overlap's: last layer first, the first "
                        "one RINGSYNC_FIRST_BUCKET_BYTES)")
    v.add_argument("--backward-passes-per-step", type=int_at_least(1), default=1, metavar="K",
                   help="split each rank's batch into K backward passes, accumulated, then one "
                        "all-reduce of their mean (1)")
    c = p.add_argument_group("gradient compression (docs/compression.md)")
    c.add_argument("--compression", type=_compression, default="none", metavar="C",
                   help="none (default), fp16, bf16 (needs ml_dtypes) or powersgd:R: how the "
                        "gradients travel through --sync bsp's all-reduce")
    c.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=None,
                   help="keep what compression lost and add it to the next gradient "
                        "(default: on for powersgd:R, off for fp16 and bf16)")
    timing.add_arguments(p)   # --timing, --straggler, --jitter, --timeline
    sync.add_arguments(p, int_at_least(1), _fraction)   # --sync MODE and its settings
    o = p.add_argument_group("output")
    o.add_argument("--save", metavar="PATH.npz", help="checkpoint after every epoch and at the end (rank 0)")
    o.add_argument("--save-every", type=int_at_least(1), default=None, metavar="N",
                   help="also checkpoint every N steps")
    o.add_argument("--resume", metavar="PATH.npz", help="continue exactly from a checkpoint")
    o.add_argument("--report", metavar="PATH.json", help="write a JSON report (rank 0)")
    o.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the command line; any problem exits 2 with one line."""
    args = build_parser().parse_args(argv)
    if args.data and args.dataset:
        fail("use either --data or --dataset, not both")
    if args.save_every and not args.save:
        fail("--save-every needs --save PATH.npz")
    for flag in ("save", "report", "timeline"):
        path = getattr(args, flag)
        if path and not Path(path).resolve().parent.is_dir():
            fail(f"--{flag} {path}: folder {Path(path).resolve().parent} does not exist")
        if path and Path(path).is_dir():
            fail(f"--{flag} {path}: is a folder, not a file")
    args.dataset = args.dataset or ("file" if args.data else "digits")
    _compression_args(args)
    _overlap_args(args)
    if args.momentum is None:
        args.momentum = STALE_MOMENTUM if args.sync.parameter_server else DEFAULT_MOMENTUM
    return args


def _compression_args(args: argparse.Namespace) -> None:
    """Build args.compression (the compressor) from --compression and --[no-]error-feedback;
    args.compression_text is what the first line, the report and the sync check name."""
    text = args.compression
    try:
        compressor = parse_compression(text)
        if compressor.name == "bf16":
            ops.require_bfloat16()
        if args.error_feedback is not None and compressor.name != "none":
            compressor = parse_compression(text, error_feedback=args.error_feedback)
    except Exception as exc:  # noqa: BLE001 - any refusal is one line
        fail(f"--compression {text}: {exc}")
    flag = "--error-feedback" if args.error_feedback else "--no-error-feedback"
    if compressor.name == "none":
        if args.error_feedback is not None:
            fail(f"{flag} needs --compression fp16, bf16 or powersgd:R (none loses nothing to feed back)")
        text = "none"
    elif args.device != "cpu":
        fail(f"--compression {text} runs on --device cpu only")
    args.compression, args.compression_text = compressor, text


def _overlap_args(args: argparse.Namespace) -> None:
    """Refuse what --overlap, --buckets and --backward-passes-per-step cannot do, in one line."""
    k = args.backward_passes_per_step
    special = [flag for flag, on in (("--overlap", args.overlap), ("--buckets", args.buckets),
                                     (f"--backward-passes-per-step {k}", k > 1)) if on]
    if not special:
        return
    if args.sync.kind != "bsp":
        fail(f"{special[0]} works with --sync bsp only, not {args.sync.text}: it changes bsp's all-reduce")
    if args.overlap and args.device != "cpu":
        fail("--overlap runs on --device cpu only (the asynchronous API takes host arrays)")
    if args.overlap and args.buckets == "fused":
        fail("--overlap reduces backward's buckets: leave out --buckets fused")
    if args.batch_size % k:
        fail(f"--backward-passes-per-step {k} must divide --batch-size {args.batch_size}")
    if (args.overlap or args.buckets == "backward") and args.compression.name == "powersgd":
        fail(f"{special[0]} does not work with --compression {args.compression_text}: PowerSGD "
             "reduces every matrix at once")


def compression_flags(text: str, error_feedback: bool) -> str:
    """'--compression fp16 --no-error-feedback', '--compression none': a run's compression."""
    if text == "none":
        return "--compression none"
    return f"--compression {text} --{'' if error_feedback else 'no-'}error-feedback"


def _agree(error: str | None) -> None:
    """Exit 2 on every rank if any rank hit `error` (the lowest such rank prints it): never a hang."""
    flags = rs.allgather(np.array([error is not None], dtype=np.int8))
    if flags.any():
        if int(np.flatnonzero(flags)[0]) == rs.rank():
            sys.stderr.write(f"{PROG}: error: {error}\n")
            sys.stderr.flush()
        sys.exit(2)


def load_data(args: argparse.Namespace) -> Dataset:
    """The data set the flags ask for (same on every rank)."""
    if args.data:
        return load_npz_dataset(args.data)
    if args.dataset == "synthetic":
        return synthetic_dataset(args.samples, args.features, args.classes, seed=args.seed)
    return load_digits_dataset()


def _to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


# --- the training loop ----------------------------------------------------------------------

PHASES = ("compute", "allreduce", "update")


class Trainer:
    """One rank's model, optimizer and position in the run, with the step split into phases."""

    def __init__(self, args: argparse.Namespace, data: Dataset, xp=np) -> None:
        self.args, self.data, self.xp = args, data, xp
        self.rank, self.size = rs.rank(), rs.size()
        self.global_batch = args.batch_size * self.size
        self.steps_per_epoch = steps_per_epoch(len(data.x_train), self.global_batch)
        self.total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps:
            self.total_steps = min(self.total_steps, args.max_steps)
        self.sizes = [data.features, *args.hidden, data.classes]
        self.compression = args.compression
        self.compressing = self.compression.name != "none"
        # bsp all-reduces the gradients where they lie: in the node's shared memory when the
        # shared-memory transport is on (zero-copy; otherwise this changes nothing). With
        # compression the all-reduce runs on the compressed payload, never on the gradient
        # buffer, so the gradients stay in private memory.
        self.model = MLP(self.sizes, seed=args.seed, dtype=args.dtype, xp=xp,
                         shared_grads=args.sync.kind == "bsp" and not self.compressing)
        self.params = self.model.params
        fusion_bytes = None if args.fusion_mb is None else int(args.fusion_mb * 2**20)
        self.passes = args.backward_passes_per_step
        self.optimizer = DistributedOptimizer(
            SGD(self.params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay),
            op=rs.Average, fusion_bytes=fusion_bytes, compression=self.compression,
            overlap=args.overlap, backward_passes_per_step=self.passes, buckets=args.buckets)
        broadcast_parameters(self.params, root=0)      # every rank starts from rank 0's model
        self.step = 0                                  # global steps done, across resumes
        self.steps_run = 0                             # steps done by this process
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self._perm_epoch, self._perm = -1, None

    # The three phases of one step. Each is one call, so a wrapper can time or delay it.

    def compute_gradients(self, xb, yb) -> tuple[float, float]:
        """Forward and backward on this rank's batch; fills the gradient buffer. With
        --backward-passes-per-step K, K passes on equal slices of it (their mean is reduced);
        with --overlap, backward starts the gradient buckets' all-reduces as it goes."""
        if self.passes == 1:
            return self.model.loss_and_grad(xb, yb)
        part = xb.shape[0] // self.passes
        results = [self.model.loss_and_grad(xb[k * part:(k + 1) * part], yb[k * part:(k + 1) * part])
                   for k in range(self.passes)]
        return float(np.mean([r[0] for r in results])), float(np.mean([r[1] for r in results]))

    def allreduce_gradients(self) -> None:
        """Average the gradients over all ranks (one fused ring all-reduce)."""
        self.optimizer.synchronize()

    def apply_update(self) -> None:
        """The SGD update, identical on every rank."""
        self.optimizer.step()

    def train_step(self, xb, yb) -> tuple[float, float]:
        """compute -> all-reduce -> update, timing each phase; returns (loss, accuracy) on this rank."""
        t0 = time.perf_counter()
        timing.begin_step()    # (sleeps here if --straggler/--jitter inject a delay)
        loss, acc = self.compute_gradients(xb, yb)
        timing.compute_done()     # (with --overlap: communication after this is exposed)
        t1 = time.perf_counter()
        self.allreduce_gradients()
        t2 = time.perf_counter()
        self.apply_update()
        t3 = time.perf_counter()
        timing.end_step()
        for name, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2)):
            self.phase_seconds[name] += seconds
        self.step += 1
        self.steps_run += 1
        return loss, acc

    def batch(self, step: int):
        """This rank's slice of global batch `step` (same samples in the batch for any rank count)."""
        epoch, t = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm_epoch = epoch
            self._perm = epoch_permutation(self.args.seed, epoch, len(self.data.x_train))
        idx = shard_indices(self._perm, t, self.args.batch_size, self.rank, self.size)
        return (self.xp.asarray(self.data.x_train[idx], dtype=self.args.dtype),
                self.xp.asarray(self.data.y_train[idx]))

    def evaluate(self, x, y) -> tuple[float, float]:
        return self.model.evaluate(self.xp.asarray(x, dtype=self.args.dtype), self.xp.asarray(y))

    # Checkpoints: rank 0 writes; every rank reads (then rank 0's parameters are broadcast).
    # With compression, save() is collective: every rank's compression state (residuals,
    # PowerSGD's Q) is gathered to rank 0 first, and restore() gives each rank its own back.

    def _meta(self) -> dict:
        epoch, t = divmod(self.step, self.steps_per_epoch)
        return {"step": self.step, "epoch": epoch, "step_in_epoch": t, "seed": self.args.seed,
                "global_batch": self.global_batch, "sizes": self.sizes, "dtype": self.args.dtype,
                "train_samples": len(self.data.x_train), "dataset": self.data.name,
                "world_size": self.size, "compression": self.args.compression_text,
                "error_feedback": bool(self.compression.error_feedback),
                "compression_signature": self.compression.signature()}

    def save(self, path: str) -> None:
        states = self._gather_compression_states() if self.compressing else None
        if self.rank != 0:
            return
        epoch = self.step // self.steps_per_epoch
        perm = epoch_permutation(self.args.seed, epoch, len(self.data.x_train))
        params = {n: _to_host(v) for n, v in self.params.value.items()}
        optim = {n: _to_host(v) for n, v in self.optimizer.state_dict().items()}
        optim["permutation"] = perm          # stored under optimizer/ so it is never a parameter
        save_checkpoint(path, params, optim, self._meta(), compression=states)

    def _gather_compression_states(self) -> list[dict[str, np.ndarray]] | None:
        """Every rank's compression_state(), in rank order, on rank 0 (None elsewhere): each
        rank's arrays packed into one byte string, gathered with ringsync's allgather."""
        blob = pack_state({k: _to_host(v) for k, v in self.optimizer.compression_state().items()})
        lengths = rs.allgather(np.array([blob.size], dtype=np.int64))
        blobs = rs.allgather(blob)
        if self.rank != 0:
            return None
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        return [unpack_state(blobs[a:b]) for a, b in itertools.pairwise(bounds)]

    def _compression_state_to_load(self, path: str, meta: dict,
                                   states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
        """Check the checkpoint's compression against this run's; return this rank's state to
        load (None: nothing to load). Raises CheckpointError naming the difference."""
        mine = self._meta()
        saved_signature = meta.get("compression_signature")
        saved_text = meta.get("compression", "none") if saved_signature is not None else "none"
        saved_feedback = bool(meta.get("error_feedback", False))
        same = (saved_signature == mine["compression_signature"] if saved_signature is not None
                else not self.compressing)
        if not same:
            theirs = compression_flags(saved_text, saved_feedback)
            ours = compression_flags(mine["compression"], mine["error_feedback"])
            if theirs == ours:
                theirs, ours = f"signature {saved_signature}", f"signature {mine['compression_signature']}"
            raise CheckpointError(f"--resume {path}: checkpoint was trained with {theirs}, this run "
                                  f"has {ours}; resume with the same compression")
        if not self.compressing:
            return None
        if not states:
            raise CheckpointError(f"--resume {path}: checkpoint holds no compression state")
        if len(states) == self.size:
            return states[self.rank]
        if saved_feedback:
            raise CheckpointError(f"--resume {path}: checkpoint holds the error-feedback residuals of "
                                  f"{len(states)} rank(s), this run has {self.size}; resume on "
                                  f"{len(states)} rank(s)")
        first = pack_state(states[0])
        if any(not np.array_equal(pack_state(s), first) for s in states[1:]):
            raise CheckpointError(f"--resume {path}: checkpoint holds the compression state of "
                                  f"{len(states)} rank(s), which differ; this run has {self.size}")
        return states[0]              # without error feedback every rank's state is the same

    def restore(self, path: str) -> None:
        """Load a checkpoint on every rank; raise CheckpointError naming any mismatch."""
        params, optim, states, meta = load_checkpoint_with_compression(path)
        mine = self._meta()
        for key in ("seed", "global_batch", "sizes", "dtype", "train_samples"):
            if meta.get(key) != mine[key]:
                raise CheckpointError(f"--resume {path}: checkpoint has {key}={meta.get(key)}, "
                                      f"this run has {key}={mine[key]}")
        for name in self.params.names:
            if name not in params or params[name].shape != self.params.value[name].shape:
                raise CheckpointError(f"--resume {path}: parameter {name} missing or mis-shaped")
        compression_state = self._compression_state_to_load(path, meta, states)
        perm = optim.pop("permutation", None)
        if not isinstance(meta.get("step"), int) or meta["step"] < 0:
            raise CheckpointError(f"--resume {path}: checkpoint has no valid step count")
        step = meta["step"]
        expected = epoch_permutation(self.args.seed, step // self.steps_per_epoch, len(self.data.x_train))
        if perm is None or not np.array_equal(perm, expected):
            raise CheckpointError(f"--resume {path}: stored sample order differs from this NumPy's; "
                                  "cannot resume exactly")
        try:
            self.optimizer.load_state_dict(optim)
        except ValueError as exc:
            raise CheckpointError(f"--resume {path}: {exc}") from None
        if compression_state is not None:
            try:
                self.optimizer.load_compression_state(compression_state)
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"--resume {path}: compression state: {exc}") from None
        for name in self.params.names:
            self.params.value[name][...] = self.xp.asarray(params[name])
        self.step = step

    # The single place that builds this rank's figures for the report (wrappers add fields).

    def rank_record(self) -> dict:
        steps = max(self.steps_run, 1)
        record = {"rank": self.rank, "steps": self.steps_run}
        for name in PHASES:
            record[f"{name}_s"] = self.phase_seconds[name]
            record[f"{name}_ms_per_step"] = 1e3 * self.phase_seconds[name] / steps
        return record


def gather_rank_records(record: dict) -> list[dict]:
    """Every rank's record, in rank order, on every rank (numbers only; ringsync's allgather)."""
    keys = sorted(record)
    row = np.array([[float(record[k]) for k in keys]], dtype=np.float64)
    rows = rs.allgather(row)
    kinds = {k: type(record[k]) for k in keys}
    return [{k: kinds[k](v) for k, v in zip(keys, r)} for r in rows]


HOST_BYTES = 64


def gather_hosts() -> list[str]:
    """Every rank's host name, in rank order, on every rank (ringsync's allgather)."""
    name = socket.gethostname().encode()[:HOST_BYTES]
    row = np.zeros((1, HOST_BYTES), dtype=np.uint8)
    row[0, :len(name)] = np.frombuffer(name, dtype=np.uint8)
    return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in rs.allgather(row)]


def params_identical(params_flat) -> tuple[bool, str]:
    """(whether every rank's parameters hash alike, rank 0's sha256) -- via ringsync's allgather."""
    digest = hashlib.sha256(_to_host(params_flat).tobytes()).digest()
    all_digests = rs.allgather(np.frombuffer(digest, dtype=np.uint8)).reshape(-1, len(digest))
    return bool((all_digests == all_digests[0]).all()), all_digests[0].tobytes().hex()


def compression_fields(trainer: Trainer) -> dict:
    """The report's compression figures, from the optimizer's compression_report(): the mean
    payload each rank put into the all-reduce per step (PowerSGD's first start_iter steps and
    fp16's fallbacks travel uncompressed, and count), one compressed step's payload, and the
    bytes a ring all-reduce of it sends. Those are computed, not measured: in a ring
    (reduce-scatter, then all-gather) each rank sends 2(p-1)/p x the payload, 0 on one rank;
    a small payload may take another path (riding the opening, shared memory), whose traffic
    differs: hence the names say "ring"."""
    got = trainer.optimizer.compression_report()
    ring = 2 * (trainer.size - 1) / trainer.size
    payload, full = float(got["payload_bytes_per_step"]), float(got["uncompressed_bytes_per_step"])
    fields = {
        "compression": trainer.args.compression_text,
        "error_feedback": bool(got["error_feedback"]),
        "payload_bytes_per_step": payload,
        "uncompressed_bytes_per_step": full,
        "ring_bytes_per_rank_per_step": ring * payload,
        "uncompressed_ring_bytes_per_rank_per_step": ring * full,
        "compression_ratio": float(got["compression_ratio"]),
        "fp16_fallbacks": int(got["fp16_fallbacks"]),
    }
    if "compressed_step_bytes" in got:         # one step once compression runs (no fallback)
        fields["compressed_step_bytes"] = float(got["compressed_step_bytes"])
        fields["compressed_step_ratio"] = full / fields["compressed_step_bytes"] if fields["compressed_step_bytes"] else 1.0
    return fields


def run(trainer: Trainer, quiet: bool = False, after_step: Callable[[], None] | None = None) -> float:
    """Train from trainer.step to trainer.total_steps; checkpoint as asked; return wall seconds.
    `after_step`, if given, is called after every step (the sync modes' learning curve)."""
    args, show = trainer.args, trainer.rank == 0 and not quiet
    bar = None
    if show:
        from tqdm import tqdm
        bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step", desc=PROG,
                   dynamic_ncols=True, file=sys.stderr)
    start = time.perf_counter()
    loss_sum = acc_sum = 0.0
    count = 0
    while trainer.step < trainer.total_steps:
        if trainer.step % trainer.steps_per_epoch == 0:
            loss_sum, acc_sum, count = 0.0, 0.0, 0
        t = time.perf_counter()
        loss, acc = trainer.train_step(*trainer.batch(trainer.step))
        step_ms = 1e3 * (time.perf_counter() - t)
        if after_step is not None:
            after_step()
        loss_sum, acc_sum, count = loss_sum + loss, acc_sum + acc, count + 1
        if bar is not None:
            epoch = (trainer.step - 1) // trainer.steps_per_epoch + 1
            bar.set_postfix_str(f"epoch {epoch} loss {loss_sum / count:.4f} acc {acc_sum / count:.3f} "
                                f"step {step_ms:.2f} ms", refresh=False)
            bar.update(1)
        end_of_epoch = trainer.step % trainer.steps_per_epoch == 0
        periodic = args.save_every and trainer.step % args.save_every == 0
        if args.save and (end_of_epoch or periodic or trainer.step == trainer.total_steps):
            trainer.save(args.save)
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return elapsed


def main(argv: Sequence[str] | None = None, xp=np) -> int:
    """Entry point of `ringsync-train` and `python -m ringsync.train`."""
    args = parse_args(argv)
    rs.init()
    if args.device == "gpu":                       # CuPy as xp; exit 2 on all ranks if any lacks a GPU
        xp, error = gpu.gpu_module_or_reason()
        _agree(error and f"--device gpu: {error}")
    data, error = None, None
    try:
        data = load_data(args)
    except DataError as exc:
        error = str(exc)
    _agree(error)
    if steps_per_epoch(len(data.x_train), args.batch_size * rs.size()) == 0:
        fail(f"global batch {rs.size()} x {args.batch_size} exceeds the {len(data.x_train)} "
             "training samples; lower --batch-size")
    sync.check_args(args, rs.size(), fail)
    trainer = Trainer(args, data, xp=xp)
    if args.resume:
        error = None
        try:
            trainer.restore(args.resume)
        except CheckpointError as exc:
            error = str(exc)
        _agree(error)
        broadcast_parameters(trainer.params, root=0)
    first_step = trainer.step
    mode = sync.SyncRun(args, trainer)             # bsp: train.run below, unchanged
    if rs.rank() == 0 and not args.quiet:
        print(f"{PROG}: {rs.size()} rank(s), {data.name} ({len(data.x_train)} train / {len(data.x_test)} "
              f"test), MLP {'-'.join(map(str, trainer.sizes))} {args.dtype}, global batch "
              f"{trainer.global_batch}, {trainer.steps_per_epoch} steps/epoch, --sync {args.sync.text}, "
              f"{compression_flags(args.compression_text, trainer.compression.error_feedback)}, "
              f"lr {args.lr}, momentum {args.momentum}"
              + (f", resuming at step {first_step}" if args.resume else ""), flush=True)

    timing.start_from_args(args, fail)
    seconds = mode.run(run, quiet=args.quiet)
    straggler_report = timing.finish()
    sync_fields, sync_timing = mode.finish(seconds)
    straggler_report = straggler_report or sync_timing

    final_loss, train_acc = trainer.evaluate(data.x_train, data.y_train)
    _, test_acc = trainer.evaluate(data.x_test, data.y_test)
    identical, digest = params_identical(trainer.params.data)
    ranks = gather_rank_records(trainer.rank_record())
    hosts = gather_hosts()
    for row, host in zip(ranks, hosts):
        row["host"] = host
    if straggler_report:                     # where the slowest rank runs (across hosts)
        straggler_report["straggler"]["slowest_host"] = hosts[straggler_report["straggler"]["slowest_rank"]]
    samples = trainer.steps_run * trainer.global_batch
    report = {
        "world_size": rs.size(), "steps": trainer.step, "steps_this_run": trainer.steps_run,
        "epochs": round(trainer.step / trainer.steps_per_epoch, 4), "steps_per_epoch": trainer.steps_per_epoch,
        "global_batch": trainer.global_batch, "batch_size": args.batch_size,
        "dataset": data.name, "train_samples": len(data.x_train), "test_samples": len(data.x_test),
        "model": trainer.sizes, "dtype": args.dtype, "device": args.device, "lr": args.lr, "momentum": args.momentum,
        "overlap_enabled": args.overlap, "buckets": trainer.optimizer.buckets,
        "bucket_count": len(trainer.optimizer.bucket_plan()),
        "backward_passes_per_step": args.backward_passes_per_step,
        "weight_decay": args.weight_decay, "seed": args.seed,
        "final_loss": final_loss, "train_accuracy": train_acc, "test_accuracy": test_acc,
        "train_seconds": seconds, "samples_per_second": samples / seconds if seconds > 0 else 0.0,
        "params_identical_across_ranks": identical, "params_sha256": digest,
        "resumed_from_step": first_step if args.resume else None,
        "ranks": ranks,
    }
    if args.sync.kind == "bsp":         # (the other modes make no such all-reduce per step)
        report.update(compression_fields(trainer))
    merge_report(report, straggler_report)   # ranks[i].compute_s/wait_s/..., "straggler"
    report.update(sync_fields)               # sync, curve, *_to_accuracy, and the mode's own
    if rs.rank() == 0:
        if args.report:
            text = json.dumps(report, indent=2) + "\n"
            atomic_write_text(args.report, text)
        if not args.quiet:
            print(f"{PROG}: {trainer.step} steps ({report['epochs']:.3g} epochs): final loss "
                  f"{final_loss:.4f}, train accuracy {train_acc:.4f}, test accuracy {test_acc:.4f}, "
                  f"{report['samples_per_second']:.0f} samples/s", flush=True)
            if trainer.compressing:
                print(f"{PROG}: --compression {report['compression']}: {report['payload_bytes_per_step']:,.0f} "
                      f"payload bytes/step on average ({report['compression_ratio']:.3g}x fewer than "
                      f"{report['uncompressed_bytes_per_step']:,.0f}); the ring sends "
                      f"{report['ring_bytes_per_rank_per_step']:,.0f} per rank per step", flush=True)
            if straggler_report:
                print(sync.format_timing(straggler_report), flush=True)
            if "overlap" in report:
                print(format_overlap(report["overlap"]), flush=True)
            print(f"{PROG}: parameters bitwise identical on all {rs.size()} rank(s): "
                  f"{'yes' if identical else 'NO'} (sha256 {digest[:16]})", flush=True)
    trainer.params.close()
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

"""SGD, and the DistributedOptimizer that makes it data-parallel (Horovod's name and role).

Synchronous data-parallel SGD in one sentence: every rank computes gradients on its own shard
of the batch, the gradients are averaged across ranks, and every rank applies the same update
to the same parameters -- so the model stays identical everywhere, bit for bit.
DistributedOptimizer is the "averaged across ranks" part: it wraps any local optimizer and
runs one fused ring all-reduce over the gradients before each step, optionally compressed
(fp16, bf16, PowerSGD: compression.py holds the arithmetic, this file the all-reduces).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .. import ops
from ..agreement import MismatchError
from ..collectives import allreduce_, allreduce_fused_, broadcast_, check_inplace
from ..context import size, world
from ..fusion import FlatViews, contiguous_span, fusion_threshold, grouped_allreduce_, plan_buckets
from ..handles import Handle, bucket_allreduce_async_, start
from ..transport.gpu import is_device_array
from .compression import (
    CastCompression,
    CastEngine,
    Compression,
    Compressor,
    PowerSGD,
    PowerSGDEngine,
    check_compressor,
    check_gradient,
)
from .nn import Params
from .overlap import Bucket, Reducer


class SGD:
    """Stochastic gradient descent with momentum and weight decay, over a Params store.

        g = grad + weight_decay * w;   v = momentum * v + g;   w -= lr * v

    (PyTorch's formulation.) The update runs on the flat buffers: one pass for the whole model.
    """

    def __init__(self, params: Params, lr: float = 0.1, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        if not isinstance(params, Params):
            raise TypeError(f"params must be a ringsync.nn.Params, got {type(params).__name__}")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and value >= 0 and np.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.velocity = params.data.copy()
        self.velocity[...] = 0

    def step(self) -> None:
        """Apply one update from the current gradients."""
        w, g = self.params.data, self.params.flat_grad
        if self.weight_decay:
            g = g + self.weight_decay * w
        if self.momentum:
            self.velocity *= self.momentum
            self.velocity += g
            g = self.velocity
        w -= self.lr * g

    def state_dict(self) -> dict[str, np.ndarray]:
        """Momentum buffers by parameter name (views of the flat velocity)."""
        out, offset = {}, 0
        for name in self.params.names:
            n = self.params.value[name].size
            out[name] = self.velocity[offset:offset + n].reshape(self.params.value[name].shape)
            offset += n
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore momentum buffers saved by state_dict()."""
        views = self.state_dict()
        for name, view in views.items():
            if name not in state or tuple(state[name].shape) != view.shape:
                raise ValueError(f"optimizer state for {name!r} is missing or has the wrong shape")
            view[...] = state[name]


class DistributedOptimizer:
    """Wrap a local optimizer so each step uses gradients averaged over all ranks.

    step() = synchronize() (one fused ring all-reduce of every gradient, op Average) followed
    by the wrapped optimizer's step(). Call synchronize() yourself to time the two apart; step()
    then does not reduce again. Gradients are views into one flat buffer, so fusion copies nothing.

    `compression` (Horovod's argument; training/compression.py, docs/compression.md):
    Compression.none (the default: exactly the plain fused all-reduce), Compression.fp16,
    Compression.bf16 or PowerSGD(rank=r); with op Average or Sum, on NumPy gradients only.
    The ranks must agree on it: at the first synchronize() a tiny all-reduce named by the
    compressor's signature makes ranks that differ (compressor, rank, error feedback, ...)
    raise MismatchError, all of them, before any gradient is sent (with the agreement check
    on: RINGSYNC_CHECK_AGREEMENT, the default).

    `overlap=True` (training/overlap.py, docs/overlap.md) starts each gradient bucket's
    all-reduce during backward, as soon as its last gradient is written; step() then waits
    only for what is still in flight. The buckets run from the last parameter to the first,
    the first one RINGSYNC_FIRST_BUCKET_BYTES, the others up to the fusion threshold.
    `buckets` picks the plan without overlap: "fused" (the default: the fusion threshold's
    buckets, in parameter order) or "backward" (overlap's buckets, reduced after backward:
    the same bits as overlap=True). `backward_passes_per_step=k` (Horovod's name) and
    no_sync() accumulate backward passes and reduce their mean once. These three need a
    ringsync.training.nn Params whose model announces its gradients (the MLP does).
    """

    def __init__(self, optimizer: SGD, op: str = ops.Average, fusion_bytes: int | None = None,
                 compression: Compressor = Compression.none, overlap: bool = False,
                 backward_passes_per_step: int = 1, buckets: str | None = None) -> None:
        if not hasattr(optimizer, "step") or not hasattr(optimizer, "params"):
            raise TypeError(f"optimizer must have .step() and .params, got {type(optimizer).__name__}")
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be True or False, got {overlap!r}")
        passes = backward_passes_per_step
        if isinstance(passes, bool) or not isinstance(passes, (int, np.integer)) or passes < 1:
            raise ValueError(f"backward_passes_per_step must be a whole number >= 1, got {passes!r}")
        buckets = ("backward" if overlap else "fused") if buckets is None else buckets
        if buckets not in ("fused", "backward") or (overlap and buckets != "backward"):
            raise ValueError(f"buckets must be 'fused' or 'backward' ('backward' with overlap=True), got {buckets!r}")
        self.optimizer = optimizer
        self.op = ops.resolve_op(op)
        self.fusion_bytes = fusion_bytes
        self.compression = check_compressor(compression)
        self.overlap, self.buckets = overlap, buckets
        self._signature = self.compression.signature()      # names every all-reduce it makes
        self._synchronized = False
        grads = list(self.params.grads())
        self._uncompressed_bytes = sum(g.nbytes for g in grads)
        self._elements = sum(g.size for g in grads)
        self._steps = 0                 # synchronize() calls (PowerSGD's start_iter counts them)
        self._sent = 0                  # bytes all-reduced by this process's calls, in all
        self._calls = 0                 # this process's synchronize() calls (a resumed run's too)
        self._engine: CastEngine | PowerSGDEngine | None = None
        self._agreed = self.compression.name == "none"    # the handshake is still to come
        if self.compression.name != "none":
            self._check_compressible(grads)
        # The reducer (training/overlap.py) listens to the model's backward: only when there is
        # something to listen for (overlap, passes to accumulate, backward's buckets, no_sync()),
        # so that the plain step pays nothing for it.
        self._reducer: Reducer | None = None
        self._passes = int(passes)
        if isinstance(self.params, Params):
            if overlap or passes > 1 or buckets != "fused":
                self._reducer = self._make_reducer(self._passes)
        elif overlap or passes > 1 or buckets != "fused":
            raise TypeError("overlap, backward_passes_per_step and buckets='backward' need a "
                            "ringsync.training.nn Params (its model announces gradients), got "
                            f"{type(self.params).__name__}")

    @property
    def params(self) -> Params:
        return self.optimizer.params

    def synchronize(self) -> None:
        """All-reduce (average) the gradients across ranks, in place (compressed if asked);
        with overlap, wait for the buckets that backward started."""
        if self._reducer is not None:
            self._reducer.finish(self._reduce_now)
        else:
            self._reduce_now()
        self._steps += 1
        self._calls += 1
        self._synchronized = True

    def _reduce_now(self) -> None:
        """The gradients' all-reduce, blocking (overlap off)."""
        if self.buckets == "backward" and not isinstance(self.compression, PowerSGD):
            self._reducer.reduce_buckets()
        elif self.compression.name == "none":
            grouped_allreduce_(self.params.grads(), op=self.op, fusion_bytes=self.fusion_bytes)
            self._sent += self._uncompressed_bytes
        else:
            self._sent += self._synchronize_compressed()

    def bucket_plan(self) -> list[tuple[int, int]]:
        """The all-reduce's buckets as (first, last + 1) element offsets of the flat gradient,
        in the order they run (one bucket for the whole gradient under "fused" when it fits)."""
        if self.buckets == "backward":
            return [(b.lo, b.hi) for b in self._reducer.buckets]
        grads = list(self.params.grads())
        plan = plan_buckets([g.nbytes for g in grads], [g.dtype for g in grads], fusion_threshold(self.fusion_bytes))
        offsets = np.cumsum([0] + [g.size for g in grads]).tolist()
        return [(offsets[b[0]], offsets[b[-1] + 1]) for b in plan]

    def close(self) -> None:
        """Stop listening to the model's backward (another DistributedOptimizer may then wrap
        the same parameters). Buckets in flight are not waited for: call step() first."""
        if self._reducer is not None:
            self._reducer.close()

    def no_sync(self):
        """`with opt.no_sync():` backward passes accumulate without communicating (DDP's name);
        the next pass outside starts the all-reduce of their mean (training/overlap.py)."""
        if self._reducer is None:
            if not isinstance(self.params, Params):
                raise TypeError("no_sync() needs a ringsync.training.nn Params (its model announces gradients)")
            self._reducer = self._make_reducer(self._passes)
        return self._reducer.no_sync()

    # -- the buckets of overlap (and of buckets="backward") -------------------------------------

    def _make_reducer(self, passes: int) -> Reducer:
        if isinstance(self.compression, PowerSGD) and (self.overlap or self.buckets == "backward"):
            raise ValueError("PowerSGD runs its own two all-reduces over every matrix at once: it "
                             "does not take overlap=True or buckets='backward'")
        if self.overlap and any(is_device_array(g) for g in self.params.grads()):
            raise TypeError("overlap=True runs on host (NumPy) gradients only; GPU (CuPy) "
                            "gradients are reduced after backward")
        if self.buckets == "backward":
            first, cap = world().settings.first_bucket_bytes, fusion_threshold(self.fusion_bytes)
        else:                   # (fused: the reducer only accumulates passes; no init() needed)
            first = cap = self.params.flat_grad.nbytes
        return Reducer(self.params, first, cap, self.overlap, passes, self._launch_bucket, self._reduce_bucket)

    def _bucket_shapes(self, bucket: Bucket) -> tuple[tuple[int, ...], ...]:
        values = self.params.value
        return tuple(values[self.params.names[i]].shape for i in bucket.members)

    def _reduce_bucket(self, bucket: Bucket, span: np.ndarray) -> None:
        """One bucket's all-reduce, blocking: fused (count and shapes checked), compressed if asked."""
        shapes = self._bucket_shapes(bucket)
        if self.compression.name == "none":
            allreduce_fused_(span, self.op, shapes)
            self._sent += span.nbytes
        else:
            if not self._agreed:
                self._handshake()
            self._sent += self._prepare().reduce_bucket_(span, bucket.lo, shapes, self.op, size(), self._reduce)

    def _launch_bucket(self, bucket: Bucket, span: np.ndarray) -> Handle:
        """One bucket's all-reduce on the communication thread (compressed as it is launched)."""
        shapes = self._bucket_shapes(bucket)
        if self.compression.name == "none":
            self._sent += span.nbytes
            return bucket_allreduce_async_(span, self.op, shapes)
        if not self._agreed:
            self._handshake()       # (blocking: the first launch, nothing in flight yet)
        engine, op, contributors = self._prepare(), self.op, size()

        def work() -> None:
            sent = engine.reduce_bucket_(span, bucket.lo, shapes, op, contributors, self._reduce)
            self._sent += sent          # (the only writer while buckets are in flight)
        return start(f"{self.compression.name} bucket of {len(shapes)} ({span.nbytes} B)", work)

    def step(self) -> None:
        """Average the gradients (unless synchronize() already did), then update."""
        if not self._synchronized:
            self.synchronize()
        self.optimizer.step()
        self._synchronized = False

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.optimizer.load_state_dict(state)

    # -- compression ------------------------------------------------------------------------

    def _check_compressible(self, grads: list[np.ndarray]) -> None:
        if self.op not in (ops.Average, ops.Sum):
            raise ValueError(f"compression {self.compression.name} works with op average or sum, "
                             f"got {self.op!r}")
        for i, g in enumerate(grads):
            if is_device_array(g):
                raise TypeError("gradient compression runs on the host (NumPy) only; GPU (CuPy) "
                                "gradients are not supported: use compression none")
            check_gradient(g, f"gradient {i}")
            check_inplace(g, f"gradient {i}")
        if len({g.dtype for g in grads}) > 1:
            raise TypeError("gradient compression needs every gradient in one dtype, got "
                            + ", ".join(sorted({g.dtype.name for g in grads})))
        if isinstance(self.compression, CastCompression):
            self.compression.payload_dtype()          # bf16 without ml_dtypes: ImportError now

    def _prepare(self) -> CastEngine | PowerSGDEngine:
        """The compressor's state (residuals, PowerSGD's Q), made once, on first need."""
        if self._engine is None:
            grads = list(self.params.grads())
            dtype = grads[0].dtype if grads else np.dtype(np.float32)
            if isinstance(self.compression, PowerSGD):
                self._engine = PowerSGDEngine(self.compression, [g.shape for g in grads], dtype)
            else:
                self._engine = CastEngine(self.compression, sum(g.size for g in grads), dtype)
        return self._engine

    def _reduce(self, flat: np.ndarray, shapes: tuple[tuple[int, ...], ...], op: str) -> None:
        """A compressed bucket's all-reduce: fused (tensor count and shapes checked), named by
        the compressor's signature, so that the agreement check compares the settings too."""
        allreduce_fused_(flat, op, shapes, name=self._signature)

    def _handshake(self) -> None:
        """One tiny all-reduce named by the signature: ranks whose compression settings differ
        raise MismatchError here, every one of them, before any gradient is sent."""
        try:
            allreduce_(np.zeros(1), op=ops.Sum, name=self._signature)
        except MismatchError as exc:
            raise MismatchError(f"ranks use different gradient compression (DistributedOptimizer("
                                f"compression=...)): {exc}") from exc
        self._agreed = True

    def _synchronize_compressed(self) -> int:
        """One compressed synchronize(); returns the bytes it all-reduced."""
        if not self._agreed:
            self._handshake()
        engine = self._prepare()
        grads = self.params.grads()
        if isinstance(engine, PowerSGDEngine):
            if self._steps < self.compression.start_iter:      # plain steps first (as none)
                grouped_allreduce_(grads, op=self.op, fusion_bytes=self.fusion_bytes)
                return self._uncompressed_bytes
            return engine.step_(list(grads), self.op, self._reduce, self._steps)
        sent, offset, contributors = 0, 0, size()
        for span, shapes, arrays in self._buckets(grads):
            sent += engine.reduce_bucket_(span, offset, shapes, self.op, contributors, self._reduce)
            offset += span.size
            if arrays is not None:                  # a packed bucket: unpack
                start = 0
                for a in arrays:
                    a.reshape(-1)[...] = span[start:start + a.size]
                    start += a.size
        return sent

    def _buckets(self, grads: Sequence[np.ndarray]) -> list[tuple[np.ndarray, tuple, list | None]]:
        """(span, its tensors' shapes, the arrays to unpack into or None) per fusion bucket, in
        gradient order: a FlatBuffer's slices where they lie, else adjacent arrays in place,
        else the arrays packed into a fresh buffer (fusion.py's rules, with one dtype)."""
        threshold = fusion_threshold(self.fusion_bytes)
        if isinstance(grads, FlatViews):
            return [(span, shapes, None) for span, shapes in grads.owner.buckets(threshold)]
        out = []
        for bucket in plan_buckets([g.nbytes for g in grads], [g.dtype for g in grads], threshold):
            arrays = [grads[i] for i in bucket]
            span = arrays[0].reshape(-1) if len(arrays) == 1 else contiguous_span(arrays)
            shapes = tuple(a.shape for a in arrays)
            if span is not None:
                out.append((span, shapes, None))
            else:
                out.append((np.concatenate([a.reshape(-1) for a in arrays]), shapes, arrays))
        return out

    def compression_state(self) -> dict[str, np.ndarray]:
        """This rank's compression state, as copies: "residual" (error feedback: one flat array
        over the gradients in order; it differs between ranks), and for PowerSGD "q" (every Q,
        flat; the same on every rank) and "step" (synchronize() calls made). Empty for none."""
        if self.compression.name == "none":
            return {}
        engine = self._prepare()
        state = {}
        if engine.residual is not None:
            state["residual"] = engine.residual.copy()
        if isinstance(engine, PowerSGDEngine):
            state["q"] = engine.q_buffer.copy()
            state["step"] = np.array(self._steps, dtype=np.int64)
        return state

    def load_compression_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what compression_state() gave (a checkpoint's), so that the following steps
        are the same bits as if the run had not stopped. ValueError names a missing, unexpected
        or wrongly shaped entry."""
        expected = self.compression_state()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(f"compression state for {self._signature!r} does not "
                             f"fit: missing {missing}, unexpected {extra}")
        for key, mine in expected.items():
            given = np.asarray(state[key])
            if given.shape != mine.shape:
                raise ValueError(f"compression state {key!r} has shape {given.shape}, "
                                 f"expected {mine.shape}")
        engine = self._engine
        if "residual" in state:
            engine.residual[...] = state["residual"]
        if isinstance(engine, PowerSGDEngine):
            engine.q_buffer[...] = state["q"]
            self._steps = int(state["step"])

    def compression_report(self) -> dict:
        """What compression did: "compression" (the signature), "error_feedback", the mean
        bytes each rank all-reduced per synchronize() ("payload_bytes_per_step"; before any,
        those of one compressed step) against the gradients' ("uncompressed_bytes_per_step"),
        their ratio ("compression_ratio"), and "fp16_fallbacks" (fp16/bf16 buckets sent
        uncompressed because their result was not finite). The one-time handshake is not
        counted."""
        c = self.compression
        engine = None if c.name == "none" else self._prepare()
        if isinstance(engine, PowerSGDEngine):
            per_compressed_step = engine.step_bytes()
        elif isinstance(engine, CastEngine):
            per_compressed_step = engine.step_bytes(self._elements)
        else:
            per_compressed_step = self._uncompressed_bytes
        payload = self._sent / self._calls if self._calls else float(per_compressed_step)
        return {
            "compression": self._signature,
            "error_feedback": bool(c.error_feedback),
            "payload_bytes_per_step": payload,
            "uncompressed_bytes_per_step": self._uncompressed_bytes,
            "compression_ratio": self._uncompressed_bytes / payload if payload else 1.0,
            "fp16_fallbacks": engine.fallbacks if isinstance(engine, CastEngine) else 0,
            "compressed_step_bytes": per_compressed_step,
            "steps": self._steps,
        }


def broadcast_parameters(params: Params | Mapping[str, np.ndarray] | Sequence[np.ndarray],
                         root: int = 0) -> None:
    """Overwrite every rank's parameters with root's, in place (so all ranks start equal).

    Accepts a Params store (one broadcast of its flat buffer), a dict of arrays (in sorted
    name order, so all ranks agree) or a list of arrays.
    """
    if isinstance(params, Params):
        broadcast_(params.data, root=root)
        return
    if isinstance(params, Mapping):
        arrays = [params[k] for k in sorted(params)]
    elif isinstance(params, (list, tuple)):
        arrays = list(params)
    else:
        raise TypeError(f"params must be Params, a dict or a list of arrays, got {type(params).__name__}")
    # One broadcast per array: how the arrays happen to lie in memory may differ between
    # ranks, so it must not decide how many calls each rank makes.
    for a in arrays:
        broadcast_(a, root=root)

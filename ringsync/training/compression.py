"""Gradient compression: fewer bytes per all-reduce (Horovod's Compression, PyTorch DDP's hooks).

Three compressors, each a frozen dataclass with Horovod's shape, `compress(x, scale=1) ->
(payload, ctx)` and `decompress(payload, ctx)`:

    Compression.none    the gradients travel as they are
    Compression.fp16    the payload is float16: x/scale rounded to float16 (2 bytes a value)
    Compression.bf16    the same in bfloat16 (ml_dtypes, optional): float32's range, 8 bits
    PowerSGD(rank=r)    a matrix M (n x m) travels as P (n x r) and Q (m x r): M ~ P Q^T

`scale` is a pre-scale: the payload holds x/scale, so an average over c ranks divides
*before* the cast (c·65504 fits where 65504 alone would not) and the ranks then sum.

**Error feedback** (`error_feedback=True`): what compression loses this step is added to the
next step's gradient, so nothing is lost for good, only delayed. Each rank keeps a residual
e and sends compress(g + e); then e = (g + e) - decompress(compress(g + e)), computed from its
own payload (decompressed at its own scale). Default: on for PowerSGD, off for fp16 and bf16,
as in Horovod and DDP.

This module is pure NumPy, with no MPI: the per-optimizer state machines below (CastEngine,
PowerSGDEngine) are handed the all-reduce as a function, so the serial tests run them on one
"rank" with an identity reduce. ringsync/training/optim.py wires them to the collectives.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import ops

# reduce(flat, shapes, op): all-reduce the 1-D buffer `flat` (tensors of `shapes`, packed)
# in place with `op` (ops.Sum or ops.Average), the same call on every rank.
Reduce = Callable[[np.ndarray, tuple[tuple[int, ...], ...], str], None]


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


def _check_bool(value: object, arg: str) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{arg} must be a bool, got {value!r}")


def _check_int(value: object, arg: str, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{arg} must be an int >= {least}, got {value!r}")


def check_gradient(x: object, arg: str = "x") -> np.ndarray:
    """`x` as a host (NumPy) array of float16/32/64: what the compressors accept.

    GPU (CuPy) arrays are not supported by compression: they raise TypeError here."""
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__cuda_array_interface__") or type(x).__module__.startswith("cupy"):
            raise TypeError(f"{arg}: gradient compression runs on the host (NumPy) only; GPU "
                            f"({type(x).__name__}) gradients are not supported: use compression none")
        x = np.asarray(x)
    if x.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{arg}: gradient compression needs float16/32/64 gradients, got {x.dtype}")
    return x


# --- the compressors ----------------------------------------------------------------------------

@dataclass(frozen=True)
class NoCompression:
    """`Compression.none`: the payload is the gradient itself (divided by `scale`)."""

    error_feedback: bool = False
    name: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        _check_bool(self.error_feedback, "error_feedback")
        if self.error_feedback:
            raise ValueError("compression none loses nothing: error_feedback must be False")

    def signature(self) -> str:
        return "none"

    def compress(self, x: np.ndarray, scale: float = 1) -> tuple[np.ndarray, None]:
        x = np.asarray(x)
        return (x.copy() if scale == 1 else x / scale), None

    def decompress(self, payload: np.ndarray, ctx: None) -> np.ndarray:
        return payload


@dataclass(frozen=True)
class CastCompression:
    """`Compression.fp16` and `Compression.bf16`: the payload is x/scale rounded to a 16-bit float.

    The division runs in x's dtype, then one rounding to the payload's (round to nearest
    even); values past float16's 65504 become inf there, and optim.py's fallback catches them.
    """

    name: str
    error_feedback: bool = False

    def __post_init__(self) -> None:
        if self.name not in ("fp16", "bf16"):
            raise ValueError(f"a cast compressor is fp16 or bf16, got {self.name!r}")
        _check_bool(self.error_feedback, "error_feedback")

    def payload_dtype(self) -> np.dtype:
        """float16, or ml_dtypes' bfloat16 (ImportError, one line, without ml_dtypes)."""
        return np.dtype(np.float16) if self.name == "fp16" else ops.require_bfloat16()

    def signature(self) -> str:
        return f"{self.name} error_feedback={_on_off(self.error_feedback)}"

    def compress(self, x: np.ndarray, scale: float = 1) -> tuple[np.ndarray, np.dtype]:
        x = check_gradient(x)
        payload = np.empty(x.shape, self.payload_dtype())
        cast_(x, scale, payload)
        return payload, x.dtype

    def decompress(self, payload: np.ndarray, ctx: np.dtype) -> np.ndarray:
        out = np.empty(payload.shape, ctx)
        np.copyto(out, payload, casting="unsafe")     # (exact: every 16-bit value fits)
        return out


@dataclass(frozen=True)
class PowerSGD:
    """Low-rank compression (Vogels et al. 2019; DDP's powerSGD_hook), for matrices.

    A tensor is viewed as a matrix M of (shape[0], the rest) and compressed when that saves
    enough: (n + m)·r·min_compression_rate < n·m (r = min(rank, n, m)); 1-D and small
    tensors travel uncompressed. For the first `start_iter` steps, every gradient travels
    uncompressed (a plain all-reduce). `seed` draws the first Q, the same on every rank.
    """

    rank: int = 1
    start_iter: int = 10
    min_compression_rate: float = 2.0
    error_feedback: bool = True
    seed: int = 0
    name: ClassVar[str] = "powersgd"

    def __post_init__(self) -> None:
        _check_int(self.rank, "rank", 1)
        _check_int(self.start_iter, "start_iter", 0)
        _check_int(self.seed, "seed", 0)
        rate = self.min_compression_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float, np.floating, np.integer)) \
                or not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"min_compression_rate must be a finite number > 0, got {rate!r}")
        _check_bool(self.error_feedback, "error_feedback")

    def signature(self) -> str:
        return (f"powersgd:{self.rank} error_feedback={_on_off(self.error_feedback)} "
                f"start_iter={self.start_iter} min_rate={self.min_compression_rate!r} seed={self.seed}")

    def matrix_rank(self, shape: Sequence[int]) -> int:
        """The rank a tensor of `shape` is compressed to, or 0 if it travels uncompressed."""
        if len(shape) < 2:
            return 0
        n, m = int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))
        r = min(self.rank, n, m)
        return r if r > 0 and (n + m) * r * self.min_compression_rate < n * m else 0

    def initial_q(self, index: int, m: int, r: int, dtype: np.dtype) -> np.ndarray:
        """The first Q (m x r, orthonormal columns) of tensor number `index`: from the seed, so
        the same bits on every rank."""
        q = np.random.default_rng([self.seed, index]).standard_normal((m, r)).astype(dtype)
        return orthogonalize_(q)

    def compress(self, x: np.ndarray, scale: float = 1) -> tuple[object, tuple]:
        """One rank's rank-r approximation from the seed's Q: ((P̂, Q), ctx) with P̂ = orth(M Q0)
        and Q = M^T P̂ / scale; a tensor that is not compressed comes back whole (x / scale)."""
        x = check_gradient(x)
        r = self.matrix_rank(x.shape)
        if not r:
            return (x.copy() if scale == 1 else x / scale), (x.shape, False)
        m_mat = x.reshape(x.shape[0], -1)
        p = m_mat @ self.initial_q(0, m_mat.shape[1], r, x.dtype)
        orthogonalize_(p)
        q = m_mat.T @ p
        if scale != 1:
            q /= scale
        return (p, q), (x.shape, True)

    def decompress(self, payload: object, ctx: tuple) -> np.ndarray:
        shape, compressed = ctx
        if not compressed:
            return payload
        p, q = payload
        out = np.empty((p.shape[0], q.shape[0]), p.dtype)
        return low_rank_product_(p, q, out).reshape(shape)


class Compression:
    """Horovod's names: `Compression.none`, `Compression.fp16`, `Compression.bf16`."""

    none = NoCompression()
    fp16 = CastCompression("fp16")
    bf16 = CastCompression("bf16")


Compressor = NoCompression | CastCompression | PowerSGD
COMPRESSORS = (NoCompression, CastCompression, PowerSGD)

_POWERSGD = re.compile(r"powersgd:([1-9][0-9]*)")


def parse_compression(text: str, error_feedback: bool | None = None) -> Compressor:
    """A compressor from "none", "fp16", "bf16" or "powersgd:R" (R >= 1), as ringsync-train's
    --compression takes it. error_feedback None keeps the compressor's default (on for
    PowerSGD, off for fp16/bf16); none has no error to feed back (True raises ValueError).
    bf16 without ml_dtypes raises ImportError (one line)."""
    if not isinstance(text, str):
        raise TypeError(f"compression must be a str, got {type(text).__name__}")
    if error_feedback is not None:
        _check_bool(error_feedback, "error_feedback")
    found = _POWERSGD.fullmatch(text)
    if found:
        c: Compressor = PowerSGD(rank=int(found.group(1)))
    elif text in ("none", "fp16", "bf16"):
        c = getattr(Compression, text)
    else:
        raise ValueError(f"compression must be none, fp16, bf16 or powersgd:R (R >= 1), got {text!r}")
    if c.name == "bf16":
        c.payload_dtype()
    if error_feedback is None or error_feedback == c.error_feedback:
        return c
    if c.name == "none":
        raise ValueError("compression none has no error to feed back: error feedback must be off")
    return dataclasses.replace(c, error_feedback=bool(error_feedback))


def check_compressor(c: object) -> Compressor:
    """`c` if it is one of the compressors, else TypeError naming what came."""
    if not isinstance(c, COMPRESSORS):
        raise TypeError("compression must be Compression.none, Compression.fp16, Compression.bf16 "
                        f"or PowerSGD(...), got {c!r}")
    return c


# --- the arithmetic, pure NumPy ------------------------------------------------------------------

def cast_(x: np.ndarray, scale: float, payload: np.ndarray) -> np.ndarray:
    """payload = x / scale, divided in x's dtype and rounded once to payload's dtype.
    Values past the payload's range become inf (no warning: the caller checks the result)."""
    with np.errstate(over="ignore"):
        if scale == 1:
            np.copyto(payload, x, casting="unsafe")
        else:
            np.divide(x, x.dtype.type(scale), out=payload, dtype=x.dtype, casting="unsafe")
    return payload


def cast_with_feedback_(span: np.ndarray, residual: np.ndarray | None, scale: float,
                        payload: np.ndarray) -> None:
    """One rank's side of a cast compressor with error feedback (residual None: without):

        span += residual;   payload = cast(span / scale);   residual = span - scale·payload

    The residual is what this rank's payload lost, at the gradient's scale."""
    if residual is None:
        cast_(span, scale, payload)
        return
    np.add(span, residual, out=span)
    cast_(span, scale, payload)
    np.copyto(residual, payload, casting="unsafe")
    if scale != 1:
        np.multiply(residual, residual.dtype.type(scale), out=residual)
    np.subtract(span, residual, out=residual)


def orthogonalize_(p: np.ndarray) -> np.ndarray:
    """Gram-Schmidt on the columns of `p` (n x r), in place: orthonormal columns spanning
    what p's columns span; a column with nothing left becomes zeros.

    Elementwise NumPy and its own sums only, no BLAS: the same input gives the same bits on
    every host whatever BLAS it uses, which is what makes PowerSGD's result bitwise
    identical on every rank (each orthogonalizes the same all-reduced P)."""
    for j in range(p.shape[1]):
        col = p[:, j]
        for k in range(j):
            prev = p[:, k]
            col -= np.add.reduce(prev * col) * prev
        norm = np.sqrt(np.add.reduce(col * col))
        if norm > 0:
            col /= norm
        else:
            col[...] = 0
    return p


def low_rank_product_(p: np.ndarray, q: np.ndarray, out: np.ndarray,
                      scratch: np.ndarray | None = None) -> np.ndarray:
    """out = p q^T (n x m) as a sum of r outer products, elementwise (no BLAS: the same bits
    on every host, as orthogonalize_). `scratch` (n x m) is needed when r > 1."""
    np.multiply(p[:, 0:1], q[:, 0], out=out)
    for k in range(1, p.shape[1]):
        if scratch is None:
            scratch = np.empty_like(out)
        np.multiply(p[:, k:k + 1], q[:, k], out=scratch)
        out += scratch
    return out


# --- per-optimizer state: what DistributedOptimizer keeps between steps ------------------------

class CastEngine:
    """fp16/bf16 for one optimizer: a reused payload buffer, the residuals, the fallbacks.

    Residuals are indexed by element offset in the gradients taken in order (one flat array,
    whatever the buckets), so a checkpoint does not depend on the fusion threshold.
    """

    def __init__(self, compressor: CastCompression, total: int, dtype: np.dtype) -> None:
        self.compressor = compressor
        self.payload_dtype = compressor.payload_dtype()
        self.residual = np.zeros(total, dtype) if compressor.error_feedback else None
        self.fallbacks = 0
        self._payload = np.empty(0, self.payload_dtype)

    def step_bytes(self, total: int) -> int:
        """Bytes one step all-reduces when nothing falls back."""
        return total * self.payload_dtype.itemsize

    def reduce_bucket_(self, span: np.ndarray, offset: int, shapes: tuple[tuple[int, ...], ...],
                       op: str, contributors: int, reduce: Reduce) -> int:
        """All-reduce one bucket (`span`, gradients from element `offset` on) through the
        payload; returns the bytes all-reduced.

        An average is pre-scaled (divided by `contributors`) before the cast and the payloads
        summed. If the result is not finite (float16 past 65504, or NaN/inf in a gradient),
        the bucket falls back to an uncompressed all-reduce of `span` (with op), counted: the
        result is the same bits on every rank, so every rank decides alike."""
        if self._payload.size < span.size:
            self._payload = np.empty(span.size, self.payload_dtype)
        payload = self._payload[:span.size]
        residual = None if self.residual is None else self.residual[offset:offset + span.size]
        scale = contributors if op == ops.Average else 1
        cast_with_feedback_(span, residual, scale, payload)
        try:
            with np.errstate(over="ignore"):        # (an overflow is caught just below)
                reduce(payload, shapes, ops.Sum)
            finite = ops.all_finite(payload)
        except FloatingPointError:
            # RINGSYNC_CHECK_FINITE: some rank's payload passed float16's range (every rank
            # raises alike, the payload untouched); the fallback's own call checks the gradient.
            finite = False
        if finite:
            np.copyto(span, payload, casting="unsafe")
            return payload.nbytes
        self.fallbacks += 1
        if residual is not None:
            residual[...] = 0           # span holds g + e: the fallback sends it all
        reduce(span, shapes, op)
        return payload.nbytes + span.nbytes


class PowerSGDEngine:
    """PowerSGD for one optimizer's gradients (tensors of `shapes`, one float dtype).

    Two fused all-reduces a step: [every P | every uncompressed tensor], then [every Q]:

        M = g (+ e);  P = M Q;  all-reduce P;  P̂ = orth(P);  Q = M^T P̂
        e = M - P̂ Q^T (this rank's own Q: error feedback);  all-reduce Q;  g = P̂ Q̄^T

    Warm start: Q̄ stays for the next step's P = M Q̄. Everything after an all-reduce
    (orthogonalize_, low_rank_product_) avoids BLAS, so every rank gets the same bits.
    """

    def __init__(self, compressor: PowerSGD, shapes: Sequence[tuple[int, ...]], dtype: np.dtype) -> None:
        self.compressor = compressor
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.dtype = np.dtype(dtype)
        sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = [0, *np.cumsum(sizes, dtype=np.int64).tolist()]
        ranks = [compressor.matrix_rank(s) for s in self.shapes]
        self.low = [(i, s[0], sizes[i] // s[0], r) for i, (s, r) in enumerate(zip(self.shapes, ranks)) if r]
        self.plain = [i for i, r in enumerate(ranks) if not r]
        self.p_shapes = tuple((n, r) for _, n, _, r in self.low) + tuple(self.shapes[i] for i in self.plain)
        self.q_shapes = tuple((m, r) for _, _, m, r in self.low)
        self.p_buffer, p_views = _flat_views(self.p_shapes, self.dtype)
        self.q_buffer, q_views = _flat_views(self.q_shapes, self.dtype)
        self.ps, self.plain_views = p_views[:len(self.low)], p_views[len(self.low):]
        self.qs = q_views
        for (i, _, m, r), q in zip(self.low, self.qs):
            q[...] = compressor.initial_q(i, m, r, self.dtype)
        total = self.offsets[-1]
        self.residual = np.zeros(total, self.dtype) if compressor.error_feedback else None
        largest = max((n * m for _, n, m, r in self.low if r > 1), default=0)
        self._scratch = np.empty(largest, self.dtype)

    def step_bytes(self) -> int:
        """Bytes one compressed step all-reduces."""
        return self.p_buffer.nbytes + self.q_buffer.nbytes

    def step_(self, grads: Sequence[np.ndarray], op: str, reduce: Reduce, step: int = 0) -> int:
        """Replace `grads` (this rank's, in order) by their compressed all-reduce; returns the
        bytes all-reduced. `step`: the optimizer's step number (the same on every rank, and
        restored on resume), which seeds a Q column that has died (below)."""
        matrices = []
        for (i, n, m, _), p, q in zip(self.low, self.ps, self.qs):
            mat = grads[i].reshape(n, m)           # (a view: gradients are C-contiguous)
            if self.residual is not None:
                mat += self.residual[self.offsets[i]:self.offsets[i + 1]].reshape(n, m)
            np.matmul(mat, q, out=p)               # (BLAS is fine here: P is all-reduced next)
            matrices.append(mat)
        for i, view in zip(self.plain, self.plain_views):
            view[...] = grads[i]
        if self.p_buffer.size:
            reduce(self.p_buffer, self.p_shapes, op)
        for i, view in zip(self.plain, self.plain_views):
            grads[i][...] = view
        for (i, n, m, _), p, q, mat in zip(self.low, self.ps, self.qs, matrices):
            orthogonalize_(p)
            np.matmul(mat.T, p, out=q)
            if self.residual is not None:
                e = self.residual[self.offsets[i]:self.offsets[i + 1]].reshape(n, m)
                np.matmul(p, q.T, out=e)
                np.subtract(mat, e, out=e)
        if self.q_buffer.size:
            reduce(self.q_buffer, self.q_shapes, op)
        for (i, n, m, r), p, q, mat in zip(self.low, self.ps, self.qs, matrices):
            low_rank_product_(p, q, mat, self._scratch[:n * m].reshape(n, m) if r > 1 else None)
            # A column of Q that came back all zeros (a zero gradient, say) would stay zero under
            # warm start, and its direction would never be sent again: draw it afresh from the
            # seed. Q is the all-reduced one, the same bits everywhere: every rank draws alike.
            dead = ~q.any(axis=0)
            if dead.any():
                fresh = np.random.default_rng([self.compressor.seed, i, step]).standard_normal((m, r))
                q[:, dead] = fresh[:, dead]
        return self.p_buffer.nbytes + self.q_buffer.nbytes


def _flat_views(shapes: Sequence[tuple[int, ...]], dtype: np.dtype) -> tuple[np.ndarray, list[np.ndarray]]:
    """One flat buffer and its shaped views, back to back (as fusion.FlatBuffer, with no MPI)."""
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    flat = np.zeros(sum(sizes), dtype)
    views, offset = [], 0
    for s, n in zip(shapes, sizes):
        views.append(flat[offset:offset + n].reshape(s))
        offset += n
    return flat, views

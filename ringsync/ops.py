"""Reduction operations and the dtypes ringsync reduces.

An op is named by a string; each maps to a NumPy ufunc that combines two chunks in place.
"average" divides by the number of contributing ranks without overflowing (see the end).
"""
from __future__ import annotations

import numpy as np

Sum = "sum"
Average = "average"
Min = "min"
Max = "max"

OPS: dict[str, np.ufunc] = {
    Sum: np.add,
    Average: np.add,
    Min: np.minimum,
    Max: np.maximum,
}

# Real numbers only: complex has no min/max, bool and objects are not arithmetic.
SUPPORTED_DTYPES: tuple[np.dtype, ...] = tuple(np.dtype(t) for t in (
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
))

SUPPORTED = frozenset(SUPPORTED_DTYPES)     # for `in` on the hot path


def resolve_op(op: object) -> str:
    """Return the canonical op name, or raise ValueError naming the bad value."""
    if type(op) is str and op in OPS:   # already a canonical name: the common case
        return op
    name = op.lower() if isinstance(op, str) else op
    if name not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    return name


def check_dtype(dtype: np.dtype, arg: str = "x") -> None:
    """Raise TypeError unless `dtype` is one ringsync can reduce."""
    if dtype not in SUPPORTED and np.dtype(dtype) not in SUPPORTED:  # a set: hot path
        names = ", ".join(d.name for d in SUPPORTED_DTYPES)
        dt = np.dtype(dtype)
        order = f" ({dt.str}: not this machine's byte order)" if not dt.isnative else ""
        raise TypeError(f"{arg} has unsupported dtype {dt.name}{order}; supported: {names}")


# --- averages that cannot overflow --------------------------------------------------------------
# Floats: each rank divides by the number of contributors before the sum (the front doors do
# it on the way into the algorithm). Integers: the floor of the exact mean, in two steps around
# a sum across ranks, so that neither sum can overflow 64 bits:
#     x = c*q + r with 0 <= r < c on every rank;   floor(sum x / c) = sum q + (sum r) // c

def average_parts(x: np.ndarray, contributors: int) -> np.ndarray:
    """Step 1 of an integer average: [x // c | x % c] in 64 bits, to be summed across ranks."""
    wide = np.dtype(np.int64 if x.dtype.kind == "i" else np.uint64)
    c, n = wide.type(contributors), x.size
    parts = np.empty(2 * n, dtype=wide)
    wide_x = x.reshape(-1).astype(wide)
    np.floor_divide(wide_x, c, out=parts[:n])
    np.remainder(wide_x, c, out=parts[n:])
    return parts


def finish_average_(out: np.ndarray, summed: np.ndarray, contributors: int) -> None:
    """Step 2: `out` (any integer dtype) = sum q + (sum r) // c, from the summed parts."""
    n = summed.size // 2
    q, r = summed[:n], summed[n:]
    np.floor_divide(r, summed.dtype.type(contributors), out=r)
    np.add(q, r, out=q)
    np.copyto(out.reshape(-1), q, casting="unsafe")   # the mean of in-range values is in range

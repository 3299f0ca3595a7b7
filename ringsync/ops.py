"""Reduction operations and the dtypes ringsync reduces.

An op is named by a string; each maps to a NumPy ufunc that combines two chunks in place.
"average" is a sum followed by a division by the number of ranks (floor division for ints).
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


def finish_average_(buf: np.ndarray, nranks: int) -> None:
    """Turn a sum into an average in place: true division for floats, floor for integers."""
    if np.issubdtype(buf.dtype, np.integer):
        np.floor_divide(buf, nranks, out=buf)
    else:
        np.divide(buf, nranks, out=buf)

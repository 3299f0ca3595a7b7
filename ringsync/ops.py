"""Reduction operations and the dtypes ringsync reduces.

An op is named by a string; each maps to a NumPy ufunc that combines two chunks in place.
"average" divides by the number of contributing ranks without overflowing (see the end).

bfloat16 comes from ml_dtypes, an optional dependency (`pip install 'ringsync[bf16]'`), which
registers NumPy ufunc loops for it. Each of those loops computes in float32 and rounds the
result to bfloat16, so every addition of a reduction (each hop of the ring, each step of the
rank-order sum) is rounded to bfloat16: partial sums are NOT widened across hops. A sum of
p values is rounded p-1 times (an average once more, at its pre-scaling) to bfloat16's 8
significant bits (eps 2**-7); tests/test_mpi_bf16.py checks 2 p eps sum|x| against float64.
Importing ml_dtypes costs about 0.8 s (measured here), so ringsync never imports it itself
until asked: check_dtype registers bfloat16 when it first meets an array of it (whoever made
that array has imported ml_dtypes already), and require_bfloat16() imports it on demand.
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

# Every dtype ringsync can reduce, by name; its code (agreement.py's records, which ranks
# exchange) is its position here, from 1. Names are only ever appended, so codes never change.
# Real numbers only: complex has no min/max, bool and objects are not arithmetic.
DTYPE_NAMES: tuple[str, ...] = (
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bfloat16",                             # ml_dtypes (optional): registered when first seen
)
DTYPE_CODES: dict[str, int] = {name: code for code, name in enumerate(DTYPE_NAMES, start=1)}

BF16_MISSING = "bf16 needs the optional package ml_dtypes: pip install 'ringsync[bf16]'"

# The dtypes this process can reduce now: bfloat16 joins them once registered (_register).
SUPPORTED_DTYPES: tuple[np.dtype, ...] = tuple(np.dtype(name) for name in DTYPE_NAMES[:-1])
SUPPORTED = frozenset(SUPPORTED_DTYPES)     # for `in` on the hot path
_bfloat16: np.dtype | None = None           # ml_dtypes' bfloat16 once registered


def __getattr__(name: str) -> object:
    """`ops.BFLOAT16`: np.dtype(ml_dtypes.bfloat16), or None without ml_dtypes (imports it)."""
    if name == "BFLOAT16":
        try:
            return require_bfloat16()
        except ImportError:
            return None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16 as a NumPy dtype, registered; ImportError (one line) without ml_dtypes."""
    if _bfloat16 is not None:
        return _bfloat16
    try:
        import ml_dtypes
    except ImportError as exc:
        raise ImportError(BF16_MISSING) from exc
    return _register(np.dtype(ml_dtypes.bfloat16))


def _register(dtype: np.dtype) -> np.dtype:
    global SUPPORTED_DTYPES, SUPPORTED, _bfloat16
    if _bfloat16 is None:
        _bfloat16 = dtype
        SUPPORTED_DTYPES = (*SUPPORTED_DTYPES, dtype)
        SUPPORTED = frozenset(SUPPORTED_DTYPES)
    return _bfloat16


def _is_bfloat16(dtype: np.dtype) -> bool:
    """ml_dtypes' bfloat16 (kind "V", like raw bytes: told apart by name and size)."""
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16" and dtype.isnative


def is_float(dtype: np.dtype) -> bool:
    """Whether `dtype` is a floating-point dtype: NumPy's (kind "f") or bfloat16."""
    return dtype.kind == "f" or _is_bfloat16(dtype)


def all_finite(x: np.ndarray) -> bool:
    """Whether every value of the host float array `x` is finite (no NaN, no Inf).

    A 16-bit float (float16, bfloat16) is judged by its bits: exponent all ones means Inf or
    NaN, so the largest |bits| is compared with Inf's. NumPy's isfinite widens every float16
    value one at a time, about 15 times slower; this is what fp16 compression pays per bucket."""
    if x.dtype.itemsize == 2 and x.dtype.isnative and is_float(x.dtype):
        if x.size == 0:
            return True
        inf_bits = int(np.array(np.inf, x.dtype).view(np.uint16))
        return int(np.max(x.view(np.uint16) & 0x7FFF)) < inf_bits
    return bool(np.isfinite(x).all())


def finfo(dtype: np.dtype) -> np.finfo:
    """np.finfo, or ml_dtypes.finfo for bfloat16 (older NumPy's finfo does not know it)."""
    if dtype.kind == "f":
        return np.finfo(dtype)
    import ml_dtypes  # (a bfloat16 dtype exists, so this import is already done)
    return ml_dtypes.finfo(dtype)


def dtype_code(dtype: np.dtype | None) -> int:
    """The code of a dtype in records (0 for none, or one ringsync does not know)."""
    return 0 if dtype is None else DTYPE_CODES.get(np.dtype(dtype).name, 0)


def dtype_name(code: int) -> str:
    """The name of a dtype code, whether or not this process can reduce that dtype."""
    if 0 < code <= len(DTYPE_NAMES):
        return DTYPE_NAMES[code - 1]
    return "-" if code == 0 else f"dtype #{code}"


def dtype_of(code: int) -> np.dtype | None:
    """The dtype of a code (None for 0); bfloat16 needs ml_dtypes (require_bfloat16)."""
    name = dtype_name(code)
    if name == "bfloat16":
        return require_bfloat16()
    return np.dtype(name) if code else None


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
        dt = np.dtype(dtype)
        if _is_bfloat16(dt) and dt == require_bfloat16():   # the first bfloat16 seen: register
            return
        names = ", ".join(DTYPE_NAMES[:-1]) + ", bfloat16 (with ml_dtypes)"
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

"""bfloat16 (ml_dtypes) all-reduces: every op, every path, bitwise the same on every rank.

The oracle is the chain of bfloat16 additions that collectives.summation_order names, each
rounded to bfloat16 as ml_dtypes' ufunc loops round it (nothing is widened across hops), so
the result must match it bit for bit; where that order is not one chain (recursive doubling
on 3+ ranks), the result must lie within 2 p eps sum|x| of the float64 sum (eps = 2**-7).
"""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, ringsync_settings, same_bits_everywhere

from ringsync.collectives import summation_order

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bf16 needs ml_dtypes: pip install 'ringsync[bf16]'")
BF16 = np.dtype(ml_dtypes.bfloat16)
COMM = MPI.COMM_WORLD
R, P = COMM.rank, COMM.size
LENGTHS = sorted({0, 1, max(P - 1, 0), P + 1, 1000, 70_000})     # rides, rings, shared memory
OPS = ["sum", "average", "min", "max"]


def expected(x, op):
    """(the chain oracle in bfloat16, or None without one chain; the float64 sum; its bound)."""
    parts = COMM.allgather(x)
    if op in ("min", "max"):
        exact = (np.minimum if op == "min" else np.maximum).reduce(np.stack(parts), axis=0)
        return exact, exact.astype(np.float64), 0.0
    if op == "average":
        parts = [np.divide(part, P) for part in parts]     # pre-scaled, as ringsync does
    wide = np.stack(parts).astype(np.float64)
    bound = 2 * P * float(ml_dtypes.finfo(BF16).eps) * np.abs(wide).sum(axis=0)
    order = summation_order(x.size, BF16)
    if order is None:
        return None, wide.sum(axis=0), bound
    chain = np.empty_like(x)
    for lo, hi, ranks in order:
        chain[lo:hi] = parts[ranks[0]][lo:hi]
        for q in ranks[1:]:
            chain[lo:hi] += parts[q][lo:hi]         # one bfloat16 rounding per addition
    return chain, wide.sum(axis=0), bound


def check(rs, n, op):
    x = np.random.default_rng([n, R]).standard_normal(n).astype(BF16)
    got = rs.allreduce(x, op=op)
    chain, exact, bound = expected(x, op)
    what = f"{op} of {n} bfloat16"
    assert_everywhere(got.dtype == BF16 and got.shape == x.shape, what)
    assert_everywhere(same_bits_everywhere(got), f"{what}: not bitwise identical across ranks")
    if chain is not None:
        assert_everywhere(np.array_equal(got.view(np.uint16), chain.view(np.uint16)),
                          f"{what}: differs from the chain of bfloat16 additions")
    assert_everywhere(bool(np.all(np.abs(got.astype(np.float64) - exact) <= bound)),
                      f"{what}: outside 2 p eps sum|x| of the float64 sum")


@pytest.mark.mpi
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", LENGTHS)
def test_every_op_and_length(rs, n, op):
    check(rs, n, op)


@pytest.mark.mpi
def test_over_messages_only(rs):
    with ringsync_settings(RINGSYNC_TRANSPORT="p2p"):
        for n in LENGTHS:
            for op in OPS:
                check(rs, n, op)


@pytest.mark.mpi(min_size=3)
def test_additions_are_not_widened(rs):
    # 1 + 2**-8 rounds back to 1 in bfloat16 (a tie, to even), so rank order gives 1 again
    # and again; a float32 accumulator would reach 1 + (P-1) 2**-8.
    x = np.array([1.0 if R == 0 else 2.0 ** -8], dtype=BF16)
    got = float(rs.allreduce(x)[0])
    assert_everywhere(summation_order(1, BF16)[0][2] != tuple(range(P)) or got == 1.0, f"got {got}")


@pytest.mark.mpi(min_size=2)
def test_float16_against_bfloat16_raises_everywhere(rs):
    try:
        rs.allreduce(np.ones(8, dtype=np.float16 if R == 0 else BF16))
        got = "no error"
    except rs.MismatchError as exc:
        got = str(exc)
    others = "rank 1" if P == 2 else "ranks " + ", ".join(map(str, range(1, P)))
    assert_everywhere(f"dtype differs: float16 on rank 0 vs bfloat16 on {others}" in got, got)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("op", OPS)
def test_a_joined_rank_adds_nothing(rs, op):
    # The last rank joins at once: it takes part with bfloat16 zeros or infinities (uneven.neutral).
    got, active = None, np.arange(1, P, dtype=np.float64)
    if R < P - 1:
        got = rs.allreduce(np.full(5, R + 1, dtype=BF16), op=op).astype(np.float64)
    rs.join()
    want = {"sum": active.sum(), "average": active.mean(), "min": 1, "max": P - 1}[op]
    assert_everywhere(got is None or np.allclose(got, want, rtol=2 ** -7), f"{op}: {got}")

"""allreduce against an oracle (MPI's own Allreduce for floats, exact NumPy arithmetic on the gathered
inputs for integers): every length, shape, dtype and op."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI
from mpitools import Verdicts, assert_everywhere, exact_integer_allreduce

DTYPES = ["float16", "float32", "float64", "int32", "int64"]
OPS = ["sum", "average", "min", "max"]
MPI_OP = {"sum": MPI.SUM, "average": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}
COMM = MPI.COMM_WORLD


def rank_data(shape, dtype, seed):
    """Different data on every rank, reproducible from the seed."""
    rng = np.random.default_rng([seed, COMM.rank])
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


def oracle(x, op):
    """The expected result and a float error bound (None: exact). Floats: MPI's Allreduce on
    float64. Integers: exact arithmetic on the gathered inputs (MPIs differ on overflow)."""
    p = COMM.size
    if x.dtype.kind == "f":
        wide = x.astype(np.float64)
        ref, scale = np.empty_like(wide), np.empty_like(wide)
        COMM.Allreduce(wide, ref, op=MPI_OP[op])
        COMM.Allreduce(np.abs(wide), scale, op=MPI.SUM)
        # Summing p numbers rounds at most p times, each by eps of the running magnitude.
        bound = 2 * p * np.finfo(x.dtype).eps * scale if op in ("sum", "average") else 0 * scale
        if op == "average":
            ref, bound = ref / p, bound / p
        return ref, bound
    return exact_integer_allreduce(x, op), None


def check_against_oracle(rs, x, op):
    before = x.copy()
    got = rs.allreduce(x, op=op)
    ref, bound = oracle(x, op)
    if bound is None:
        ok = got.dtype == x.dtype and np.array_equal(got, ref)
    else:
        ok = got.dtype == x.dtype and got.shape == x.shape and bool(
            np.all(np.abs(got.astype(np.float64) - ref) <= bound + np.finfo(x.dtype).tiny))
    v = Verdicts()                  # one sync point for the three checks
    v.expect(ok, f"allreduce {op} {x.dtype} {x.shape} disagrees with the oracle")
    v.expect(np.array_equal(x, before), "out-of-place allreduce modified its input")
    v.same_bits(got, f"allreduce {op} {x.dtype} {x.shape}")
    v.check()


@pytest.mark.mpi
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [0, 1, 2, 3, 5, 7, 64, 1001, 65537])
def test_allreduce_matches_mpi_for_every_length(rs, length, dtype, op):
    check_against_oracle(rs, rank_data((length,), dtype, seed=length), op)


@pytest.mark.mpi
@pytest.mark.parametrize("shape", [(), (1,), (0, 3), (2, 3, 4), (5, 1, 7)])
def test_allreduce_keeps_any_shape(rs, shape):
    check_against_oracle(rs, rank_data(shape, "float32", seed=len(shape)), "sum")


@pytest.mark.mpi
def test_non_contiguous_and_fortran_inputs(rs):
    base = rank_data((8, 6), "float64", seed=3)
    for x in (base[::2, 1::2], base.T, np.asfortranarray(base)):
        check_against_oracle(rs, x, "sum")


@pytest.mark.mpi
@pytest.mark.parametrize("op", OPS)
def test_in_place_fills_and_returns_its_argument(rs, op):
    x = rank_data((4, 33), "float32", seed=9)
    expected = rs.allreduce(x, op=op)
    out = rs.allreduce_(x, op=op)
    assert_everywhere(out is x and np.array_equal(x, expected), "allreduce_ differs from allreduce")


@pytest.mark.mpi
def test_average_of_integers_floors(rs):
    x = np.array([COMM.rank, -COMM.rank, 7], dtype=np.int64)
    p = COMM.size
    total = p * (p - 1) // 2
    expected = np.array([total // p, -total // p, 7], dtype=np.int64)
    assert_everywhere(np.array_equal(rs.allreduce(x, op=rs.Average), expected))


@pytest.mark.mpi
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
       dtype=st.sampled_from(DTYPES + ["int8", "uint16"]),
       op=st.sampled_from(OPS), seed=st.integers(0, 2**16))
def test_property_matches_mpi_bitwise_across_ranks(rs, shape, dtype, op, seed):
    # derandomize=True: every rank draws the same examples, so all ranks make the same calls.
    # int8 and uint16 data wrap into the whole range, so their sums overflow: the modular case.
    x = rank_data(tuple(shape), dtype, seed)
    check_against_oracle(rs, x, op)

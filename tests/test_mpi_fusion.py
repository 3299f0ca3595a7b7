"""grouped_allreduce(_) equals one allreduce per array, on every rank count.

Integers, min and max: exactly. Float sums: within rounding, because the ring adds an element's
contributions in an order set by the chunk it falls in, and fusion moves elements between
chunks. Across ranks the results are always bitwise identical.
"""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, same_bits_everywhere

COMM = MPI.COMM_WORLD


def close(got, want, op):
    """Exact for integers and min/max; float sums within p roundings of the magnitude."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.dtype.kind != "f" or op in ("min", "max"):
        return np.array_equal(got, want)
    eps = np.finfo(got.dtype).eps
    scale = 4 * COMM.size * eps * (np.abs(want.astype(np.float64)) + 4.0)
    return bool(np.all(np.abs(got.astype(np.float64) - want) <= scale))
THRESHOLDS = [0, 1, 64, 1000, 1 << 20, None]


def mixed_arrays(seed):
    """Different data on every rank: mixed dtypes, shapes and sizes, some empty."""
    rng = np.random.default_rng([seed, COMM.rank])
    specs = [("float32", (3, 5)), ("float64", (17,)), ("int32", (0,)), ("float32", ()),
             ("int64", (2, 2, 2)), ("float32", (1000,)), ("float16", (7,)), ("float64", (1,)),
             ("int32", (33,)), ("float32", (0, 4)), ("uint8", (9,))]
    out = []
    for dtype, shape in specs:
        if np.dtype(dtype).kind == "f":
            out.append(rng.standard_normal(shape).astype(dtype))
        else:
            out.append(rng.integers(0, 50, size=shape).astype(dtype))
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("op", ["sum", "average", "max"])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_grouped_equals_one_by_one(rs, threshold, op):
    arrays = mixed_arrays(seed=7)
    expected = [rs.allreduce(a, op=op) for a in arrays]
    inputs = [a.copy() for a in arrays]
    got = rs.grouped_allreduce(inputs, op=op, fusion_bytes=threshold)
    ok = all(close(g, e, op) for g, e in zip(got, expected))
    assert_everywhere(ok, f"grouped_allreduce differs (threshold {threshold}, op {op})")
    assert_everywhere(all(np.array_equal(a, b) for a, b in zip(inputs, arrays)),
                      "out-of-place grouped_allreduce modified its inputs")
    in_place = [a.copy() for a in arrays]
    returned = rs.grouped_allreduce_(in_place, op=op, fusion_bytes=threshold)
    ok = all(r is a and close(a, e, op) for r, a, e in zip(returned, in_place, expected))
    assert_everywhere(ok, f"grouped_allreduce_ differs (threshold {threshold}, op {op})")
    assert_everywhere(all(same_bits_everywhere(a) for a in in_place), "ranks disagree")


@pytest.mark.mpi
@pytest.mark.parametrize("as_list", [False, True])     # FlatViews fast path / adjacency check
@pytest.mark.parametrize("threshold", [0, 24, 1 << 20])
def test_flat_buffer_views_are_reduced_in_place(rs, threshold, as_list):
    fb = rs.FlatBuffer([(3, 4), (5,), (0,), (2, 2)], np.float64)
    fb.flat[...] = np.random.default_rng([1, COMM.rank]).standard_normal(fb.flat.size)
    expected = rs.allreduce(fb.flat, op="sum")
    views = list(fb.views) if as_list else fb.views
    returned = rs.grouped_allreduce_(views, op="sum", fusion_bytes=threshold)
    assert_everywhere(all(r is v for r, v in zip(returned, fb.views)), "must return the views")
    assert_everywhere(close(fb.flat, expected, "sum"), f"FlatBuffer views, threshold {threshold}")
    assert_everywhere(same_bits_everywhere(fb.flat), "ranks disagree")


@pytest.mark.mpi
def test_many_small_arrays_fused_across_several_buckets(rs):
    rng = np.random.default_rng([3, COMM.rank])
    sizes = np.random.default_rng(3).integers(1, 300, 50)
    arrays = [rng.standard_normal(int(n)).astype(np.float32) for n in sizes]   # same sizes everywhere
    expected = [rs.allreduce(a) for a in arrays]
    rs.grouped_allreduce_(arrays, fusion_bytes=4096)
    assert_everywhere(all(close(a, e, "sum") for a, e in zip(arrays, expected)))
    assert_everywhere(all(same_bits_everywhere(a) for a in arrays), "ranks disagree")


@pytest.mark.mpi
def test_bad_arguments_raise_naming_them(rs):
    with pytest.raises(TypeError, match="arrays"):
        rs.grouped_allreduce_(np.zeros(3))
    with pytest.raises(ValueError, match="op"):
        rs.grouped_allreduce_([np.zeros(3)], op="median")
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"arrays\[1\]"):
        rs.grouped_allreduce_([np.zeros(2), ro])
    with pytest.raises(ValueError, match=r"arrays\[0\]"):
        rs.grouped_allreduce_([np.zeros((4, 4))[:, 0]])
    with pytest.raises(TypeError, match=r"arrays\[0\]"):
        rs.grouped_allreduce([np.zeros(2, dtype=complex)])
    with pytest.raises(ValueError, match="fusion_bytes"):
        rs.grouped_allreduce_([np.zeros(2)], fusion_bytes=-1)

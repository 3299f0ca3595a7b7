"""Serial tests of the pure logic: the chunk plan, the op table, dtype checks."""
import itertools
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringsync import ops
from ringsync.algorithms.ring import chunk_bounds


@given(n=st.integers(0, 10_000), p=st.integers(1, 64))
def test_chunks_tile_the_buffer_and_differ_by_at_most_one(n, p):
    bounds = chunk_bounds(n, p)
    assert len(bounds) == p
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes[0] == max(sizes), "chunk 0 is the largest, so it sizes the scratch buffer"


def test_chunks_when_fewer_elements_than_ranks():
    assert chunk_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert chunk_bounds(0, 3) == [(0, 0), (0, 0), (0, 0)]


@pytest.mark.parametrize("name", ["sum", "SUM", "average", "min", "max", ops.Average])
def test_resolve_op_accepts_every_op(name):
    assert ops.resolve_op(name) in ops.OPS


@pytest.mark.parametrize("bad", ["prod", "", None, 3, np.add])
def test_resolve_op_names_the_bad_value(bad):
    with pytest.raises(ValueError, match="op must be one of"):
        ops.resolve_op(bad)


@pytest.mark.parametrize("dtype", ["complex64", "bool", "object", "U3", "datetime64[s]"])
def test_unsupported_dtypes_are_refused_by_name(dtype):
    with pytest.raises(TypeError, match=re.escape(np.dtype(dtype).name)):
        ops.check_dtype(np.dtype(dtype), "grad")


def test_average_floors_integers_without_overflow():
    # Two ranks hold [7, -7, 8] and [0, 0, 0]: their parts are summed, then finished.
    ints = np.array([7, -7, 8], dtype=np.int32)
    summed = ops.average_parts(ints, 2) + ops.average_parts(np.zeros(3, np.int32), 2)
    ops.finish_average_(ints, summed, 2)
    assert ints.tolist() == [3, -4, 4]
    big = np.full(2, 100, dtype=np.int8)            # 100 + 100 overflows int8; the mean does not
    summed = ops.average_parts(big, 2) + ops.average_parts(big, 2)
    ops.finish_average_(big, summed, 2)
    assert big.tolist() == [100, 100]

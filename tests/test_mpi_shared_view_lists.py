"""A list of a shared FlatBuffer's views is the same buffer as its views (fusion.contiguous_span).

The shared window's memory belongs to an array of raw bytes (transport/shm.py); the views
are typed views of it. A list of them must still be found to tile one span, typed as the
views, lying in the window: so it takes the zero-copy path, and ranks passing `fb.views` and
ranks passing `list(fb.views)` make the same call (the same place in the same window).
"""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, exact_integer_allreduce, ringsync_settings, same_bits_everywhere
from test_mpi_allreduce import OPS, rank_data

from ringsync import collectives

COMM = MPI.COMM_WORLD
R, P = COMM.rank, COMM.size
SHAPES = [(300, 70), (70,), (0,), (13, 3, 2)]       # 21148 elements: above the 16 KB small limit
SMALL = {"RINGSYNC_TRANSPORT": "shm", "RINGSYNC_SHM_SMALL_BYTES": "16384"}


@pytest.fixture
def zero_copy(rs, monkeypatch):
    """Counts the all-reduces that took the zero-copy path (algorithms/shared.py), under the
    shared-memory transport with a 16 KB small limit."""
    taken, real = [], collectives.shared_allreduce_in_place_

    def counted(flat, *args, **kwargs):
        taken.append(flat.size)
        return real(flat, *args, **kwargs)

    monkeypatch.setattr(collectives, "shared_allreduce_in_place_", counted)
    with ringsync_settings(**SMALL):
        yield taken


def oracle(rs, dtype, op, seed):
    """What the copy-in all-reduce of every rank's data gives: the same bits, as each element
    is reduced in rank order on both paths, and averages divided first (integers: exact)."""
    data = rank_data((sum(int(np.prod(s)) for s in SHAPES),), dtype, seed)
    return exact_integer_allreduce(data, op) if data.dtype.kind in "iu" else rs.allreduce(data, op=op)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "float64"])
def test_a_list_of_a_shared_flatbuffers_views_takes_the_zero_copy_path(rs, zero_copy, dtype):
    for op in OPS:
        want = oracle(rs, dtype, op, seed=3)
        with rs.FlatBuffer(SHAPES, dtype, shared=True) as fb:
            for views in (list(fb.views), [v for v in fb.views if v.size], fb.views):
                fb.flat[...] = rank_data(fb.flat.shape, dtype, seed=3)
                del zero_copy[:]
                rs.grouped_allreduce_(views, op=op)
                # an integer average goes in parts, through a buffer of its own
                zero = P > 1 and not (op == "average" and np.dtype(dtype).kind in "iu")
                assert_everywhere(len(zero_copy) == zero,
                                  f"{dtype} {op} {type(views).__name__}: zero-copy taken {len(zero_copy)} times")
                assert_everywhere(np.array_equal(fb.flat, want), f"{dtype} {op}: wrong result")
                assert_everywhere(same_bits_everywhere(fb.flat), f"{dtype} {op}: ranks differ")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float32", "int64"])
def test_views_on_some_ranks_and_a_list_of_them_on_others_agree(rs, zero_copy, dtype):
    for op in OPS:
        want = oracle(rs, dtype, op, seed=4)
        with rs.FlatBuffer(SHAPES, dtype, shared=True) as fb:
            fb.flat[...] = rank_data(fb.flat.shape, dtype, seed=4)
            rs.grouped_allreduce_(fb.views if R % 2 else list(fb.views), op=op)
            assert_everywhere(np.array_equal(fb.flat, want), f"{dtype} {op}: wrong result")
            assert_everywhere(same_bits_everywhere(fb.flat), f"{dtype} {op}: ranks differ")


@pytest.mark.mpi
def test_adjacent_views_of_a_shared_flatbuffer_in_several_buckets(rs, zero_copy):
    """A bucket of some of the views (a fusion threshold that splits them) is a span of the
    window too; a bucket of views that are not adjacent is packed (not zero-copy)."""
    with rs.FlatBuffer([(6000,), (6000,), (5,), (6000,)], np.float32, shared=True) as fb:
        fb.flat[...] = rank_data(fb.flat.shape, "float32", seed=5)
        want = rs.allreduce(fb.flat)
        del zero_copy[:]
        rs.grouped_allreduce_(list(fb.views[:2]), fusion_bytes=48_000)     # one bucket of two views
        rs.grouped_allreduce_([fb.views[3], fb.views[2]], fusion_bytes=48_000)
        assert_everywhere(zero_copy == ([12_000] if P > 1 else []), f"zero-copy calls: {zero_copy}")
        assert_everywhere(np.array_equal(fb.flat, want), "wrong result")

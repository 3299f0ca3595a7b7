"""Bad arguments raise ValueError/TypeError naming the argument, on every rank, before any traffic."""
import numpy as np
import pytest
from mpi4py import MPI


@pytest.mark.mpi
def test_unknown_op(rs):
    with pytest.raises(ValueError, match="op must be one of .*'prod'"):
        rs.allreduce(np.ones(3), op="prod")


@pytest.mark.mpi
def test_unsupported_dtype(rs):
    with pytest.raises(TypeError, match="x has unsupported dtype complex128"):
        rs.allreduce(np.ones(3, dtype=complex))
    with pytest.raises(TypeError, match="x has unsupported dtype object"):
        rs.allreduce(np.array([object()]))


@pytest.mark.mpi
def test_in_place_needs_writeable_contiguous_ndarray(rs):
    ro = np.ones(4)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="x is read-only"):
        rs.allreduce_(ro)
    with pytest.raises(ValueError, match="x is not C-contiguous"):
        rs.allreduce_(np.ones((4, 4))[:, 1])
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        rs.allreduce_([1.0, 2.0])


@pytest.mark.mpi
def test_root_out_of_range(rs):
    with pytest.raises(ValueError, match=r"root must be in \[0, "):
        rs.broadcast(np.ones(2), root=MPI.COMM_WORLD.size)
    with pytest.raises(TypeError, match="root must be an int"):
        rs.broadcast(np.ones(2), root="0")


@pytest.mark.mpi
def test_world_facts(rs):
    assert rs.size() == MPI.COMM_WORLD.size and rs.rank() == MPI.COMM_WORLD.rank
    assert 0 <= rs.local_rank() < rs.local_size() <= rs.size()


@pytest.mark.mpi
def test_name_byte_order_and_fused_layout(rs):
    with pytest.raises(TypeError, match="name must be a str or None, got int"):
        rs.allreduce(np.ones(2), name=3)
    with pytest.raises(TypeError, match="unsupported dtype float64 \\(>f8: not this machine's byte order\\)"):
        rs.allreduce(np.ones(2, dtype=">f8"))
    with pytest.raises(ValueError, match="shapes hold 5 elements but flat has 6"):
        rs.allreduce_fused_(np.ones(6), "sum", ((2,), (3,)))
    with pytest.raises(ValueError, match="flat must be 1-D"):
        rs.allreduce_fused_(np.ones((2, 3)), "sum", ((6,),))
    with pytest.raises(ValueError, match="root must be in"):
        rs.broadcast_(np.ones(2), root=-1)
    with pytest.raises(ValueError, match="x is read-only"):
        ro = np.ones(2)
        ro.flags.writeable = False
        rs.broadcast_(ro)


@pytest.mark.mpi(min_size=2)
def test_one_rank_refusing_a_grouped_call_fails_it_on_every_rank(rs):
    from mpitools import assert_everywhere

    good = [np.ones(4), np.ones((3, 3))]
    mine = [good[0], np.ones((3, 6))[:, ::2]] if MPI.COMM_WORLD.rank == 1 else good
    with pytest.raises(ValueError):
        rs.grouped_allreduce_(mine)          # rank 1: not C-contiguous; the others: refused
    assert_everywhere(np.array_equal(rs.allreduce(np.ones(3)), np.full(3, MPI.COMM_WORLD.size)))

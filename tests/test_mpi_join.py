"""join(): ranks with different amounts of work finish together instead of deadlocking."""
import numpy as np
import pytest
from mpi4py import MPI

from mpitools import assert_everywhere

COMM = MPI.COMM_WORLD
R, P = COMM.rank, COMM.size


@pytest.mark.mpi
@pytest.mark.parametrize("op", ["sum", "average", "min", "max"])
def test_ranks_with_fewer_batches_join_and_add_nothing(rs, op):
    # Rank r has P - r batches: rank 0 the most, rank P-1 a single one.
    ok = True
    for step in range(P - R):
        got = rs.allreduce(np.full(5, R + 1, dtype=np.int64 if op != "average" else np.float64),
                           op=op, name=f"grad{step}")
        active = np.arange(1, P - step + 1)          # the ranks (+1) that still have batch `step`
        want = {"sum": active.sum(), "average": active.mean(), "min": active.min(),
                "max": active.max()}[op]
        ok = ok and bool(np.all(got == want))
    last = rs.join()
    assert_everywhere(ok, "a reduction with joined ranks gave the wrong result")
    assert_everywhere(last == 0, f"join() returned {last}, not rank 0, which joined last")


@pytest.mark.mpi
def test_other_collectives_while_ranks_have_joined(rs):
    ok = True
    if R == 0 or P == 1:
        b = rs.broadcast(np.full(3, 7.0), root=0)
        g = rs.allgather(np.full((1, 2), R, dtype=np.int32))
        rs.barrier()
        e = rs.allreduce(np.ones(0))
        ok = np.array_equal(b, np.full(3, 7.0)) and g.shape == (1, 2) and e.shape == (0,)
    rs.join()
    assert_everywhere(ok)


@pytest.mark.mpi
def test_everyone_joining_at_once_returns(rs):
    for _ in range(2):                               # and join() can be used again
        last = rs.join()
        assert_everywhere(0 <= last < P)
    assert_everywhere(np.array_equal(rs.allreduce(np.ones(2)), np.full(2, P)))


@pytest.mark.mpi(min_size=3)
def test_disagreement_among_the_active_ranks_still_raises_everywhere(rs):
    if R == P - 1:
        with pytest.raises(rs.MismatchError, match="shape differs"):
            rs.join()
        rs.join()
    else:
        with pytest.raises(rs.MismatchError, match="shape differs"):
            rs.allreduce(np.ones(3 + R))
        rs.join()
    assert_everywhere(True)

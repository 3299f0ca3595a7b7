"""broadcast, allgather and barrier on real ranks, checked against MPI's own collectives."""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, ringsync_settings, same_bits_everywhere

COMM = MPI.COMM_WORLD


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float16", "float64", "int32"])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7, 3), (1000,)])
def test_broadcast_from_every_root(rs, shape, dtype):
    for root in range(COMM.size):
        x = np.full(shape, COMM.rank + 1, dtype=dtype)
        before = x.copy()
        got = rs.broadcast(x, root=root)
        assert_everywhere(np.array_equal(got, np.full(shape, root + 1, dtype=dtype)),
                          f"broadcast from root {root}")
        assert_everywhere(np.array_equal(x, before), "broadcast modified its input")
        y = x.copy()
        assert_everywhere(rs.broadcast_(y, root=root) is y and np.array_equal(y, got))


@pytest.mark.mpi
def test_allgather_ragged_first_dimension(rs):
    r = COMM.rank
    x = np.arange((r + 1) * 3, dtype=np.float32).reshape(r + 1, 3) + 100 * r
    got = rs.allgather(x)
    expected = np.concatenate(COMM.allgather(x))
    same = same_bits_everywhere(got)        # (collective: never behind `and`, or ranks part ways)
    assert_everywhere(np.array_equal(got, expected) and same)


@pytest.mark.mpi
def test_allgather_empty_and_scalar(rs):
    got = rs.allgather(np.zeros((0, 2), dtype=np.int64) if COMM.rank % 2 else np.ones((1, 2), dtype=np.int64))
    assert_everywhere(got.shape == ((COMM.size + 1) // 2, 2))
    scalars = rs.allgather(np.float64(COMM.rank))
    assert_everywhere(np.array_equal(scalars, np.arange(COMM.size, dtype=np.float64)))


@pytest.mark.mpi(min_size=2)
def test_allgather_mismatched_trailing_shape_raises_on_every_rank(rs):
    x = np.zeros((2, 3 if COMM.rank == 0 else 4), dtype=np.float32)
    with pytest.raises(ValueError, match="trailing shape differ"):
        rs.allgather(x)
    # the world is still usable afterwards
    assert_everywhere(np.array_equal(rs.allreduce(np.ones(3)), np.full(3, COMM.size)))


@pytest.mark.mpi
def test_barrier_returns_on_every_rank(rs):
    for _ in range(3):
        rs.barrier()
    assert_everywhere(True)


@pytest.mark.mpi
@pytest.mark.parametrize("transport", ["p2p", "shm"])
def test_allgather_layouts_too_big_for_the_opening_go_separately(rs, transport, monkeypatch):
    # The layouts (88 bytes a rank) ride on the opening when its payload holds them.
    from ringsync.context import world

    with ringsync_settings(RINGSYNC_SMALL_BYTES="64", RINGSYNC_SHM_SMALL_BYTES="64", RINGSYNC_TRANSPORT=transport):
        checker, rode = world().checker, []
        slots = checker.slots
        monkeypatch.setattr(checker, "slots", lambda *args: rode.append(args) or slots(*args))
        x = np.arange((COMM.rank + 1) * 3, dtype=np.int32).reshape(COMM.rank + 1, 3)
        got = rs.allgather(x)
        assert_everywhere(np.array_equal(got, np.concatenate(COMM.allgather(x))) and not rode)

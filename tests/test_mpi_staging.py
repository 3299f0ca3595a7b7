"""The staged (pinned host) transport's bookkeeping, run on the CPU with a NumPy stand-in device.

LOGIC COVERAGE ONLY. The stand-in (tests/staging_standin.py) queues copies and reductions
like a CUDA stream and runs them only at a wait, so a missing wait or a wrongly indexed
segment changes the result. These tests say nothing about CuPy or a GPU: tests/test_gpu.py
does, and skips without one.
"""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, same_bits_everywhere
from staging_standin import ForgetfulStandIn, HostStandIn

from ringsync.algorithms.ring import ring_allgather_, ring_allreduce_
from ringsync.algorithms.staged import staged_allgather_, staged_allreduce_, staged_broadcast_

COMM = MPI.COMM_WORLD


def rank_data(n, dtype, seed):
    rng = np.random.default_rng([seed, COMM.rank])
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(n).astype(dtype)
    return rng.integers(-1000, 1000, size=n).astype(dtype)


@pytest.mark.mpi
@pytest.mark.parametrize("segment", [1, 3, 1 << 20])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 17, 1000])
@pytest.mark.parametrize("dtype,ufunc", [("float32", np.add), ("float64", np.add),
                                         ("int64", np.add), ("float32", np.maximum)])
def test_staged_allreduce_matches_the_host_ring_bit_for_bit(n, dtype, ufunc, segment):
    x = rank_data(n, dtype, seed=n)
    expected = ring_allreduce_(x.copy(), COMM, ufunc)
    dev = HostStandIn()
    got = x.copy()
    staged_allreduce_(got, COMM, ufunc, dev, segment)
    # Same chunks reduced in the same order as the host ring, so the same bits.
    assert_everywhere(got.tobytes() == expected.tobytes(),
                      f"staged allreduce n={n} {dtype} {ufunc.__name__} segment={segment} differs")
    assert_everywhere(same_bits_everywhere(got), "staged results differ across ranks")
    # Everything queued has run when the call returns: the pinned buffers are free again.
    assert_everywhere(dev.done == len(dev.queue), "staged allreduce returned with work pending")


@pytest.mark.mpi
def test_staged_buffers_are_allocated_once():
    dev = HostStandIn()
    for _ in range(3):
        staged_allreduce_(rank_data(100, "float32", 1), COMM, np.add, dev, segment=7)
    staged_allreduce_(rank_data(40, "float32", 1), COMM, np.add, dev, segment=7)
    expected = 0 if COMM.size == 1 else 3   # pinned mirror, pinned inbox, device landing area
    assert_everywhere(dev.cache.allocations == expected,
                      f"{dev.cache.allocations} allocations, expected {expected}")


@pytest.mark.mpi(min_size=2)
def test_a_device_that_skips_waits_gives_wrong_results():
    # The check above can fail: with waits that do not wait, the staged data is stale.
    x = rank_data(64, "float64", 2)
    expected = ring_allreduce_(x.copy(), COMM, np.add)
    got = x.copy()
    staged_allreduce_(got, COMM, np.add, ForgetfulStandIn(), segment=5)
    assert_everywhere(not np.array_equal(got, expected), "a forgetful device went unnoticed")


@pytest.mark.mpi
@pytest.mark.parametrize("n", [0, 1, 33])
def test_staged_broadcast_matches_the_root(n):
    for root in range(COMM.size):
        x = rank_data(n, "float32", seed=7)
        ref = COMM.bcast(x.copy(), root=root)   # the oracle (a test may use MPI's own)
        staged_broadcast_(x, COMM, root, HostStandIn())
        assert_everywhere(np.array_equal(x, ref), f"staged broadcast from {root} n={n} differs")


@pytest.mark.mpi
def test_staged_allgather_matches_the_host_ring():
    p = COMM.size
    sizes = [(3 * r + 1) % 5 for r in range(p)]          # ragged, some may be empty
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    mine = rank_data(sizes[COMM.rank], "int32", seed=3)
    host, staged = np.zeros(offsets[-1], np.int32), np.full(offsets[-1], -1, np.int32)
    blocks_h = [host[offsets[i]:offsets[i + 1]] for i in range(p)]
    blocks_s = [staged[offsets[i]:offsets[i + 1]] for i in range(p)]
    blocks_h[COMM.rank][...] = mine
    blocks_s[COMM.rank][...] = mine
    ring_allgather_(blocks_h, COMM, owned=COMM.rank)
    staged_allgather_(blocks_s, COMM, COMM.rank, HostStandIn())
    assert_everywhere(np.array_equal(host, staged), "staged allgather differs from the host ring")

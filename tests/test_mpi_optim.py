"""DistributedOptimizer and broadcast_parameters across ranks."""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, same_bits_everywhere

from ringsync.training.nn import MLP

COMM = MPI.COMM_WORLD


@pytest.mark.mpi
def test_broadcast_parameters_makes_every_rank_equal_roots(rs):
    root = COMM.size - 1
    model = MLP([4, 6, 3], seed=COMM.rank)            # different on every rank
    expected = MLP([4, 6, 3], seed=root).params.data.copy()
    rs.broadcast_parameters(model.params, root=root)
    assert_everywhere(np.array_equal(model.params.data, expected), "Params")
    named = {"b": np.full(3, float(COMM.rank)), "a": np.full(2, float(COMM.rank))}
    rs.broadcast_parameters(named, root=root)
    listed = [np.full(5, COMM.rank, dtype=np.int32)]
    rs.broadcast_parameters(listed, root=root)
    ok = all((v == root).all() for v in named.values()) and (listed[0] == root).all()
    assert_everywhere(ok, "dict and list forms")


@pytest.mark.mpi
@pytest.mark.parametrize("fusion_bytes", [0, 64, None])
def test_distributed_step_uses_the_average_gradient(rs, fusion_bytes):
    model = MLP([4, 5, 3], seed=0, dtype=np.float64)
    local = model.params
    opt = rs.DistributedOptimizer(rs.SGD(local, lr=0.5, momentum=0.9), fusion_bytes=fusion_bytes)
    start = local.data.copy()
    rng = np.random.default_rng(COMM.rank)
    grads = rng.standard_normal(local.data.size)
    mean = np.mean([np.random.default_rng(r).standard_normal(local.data.size) for r in range(COMM.size)],
                   axis=0)
    local.flat_grad[...] = grads
    opt.step()
    ok = np.allclose(local.data, start - 0.5 * mean, rtol=1e-12, atol=1e-12)
    assert_everywhere(ok, "one step = lr * mean gradient")
    assert_everywhere(same_bits_everywhere(local.data), "parameters identical across ranks")
    # synchronize() then step() reduces once, not twice
    local.flat_grad[...] = grads
    opt.synchronize()
    opt.step()
    velocity = 0.9 * mean + mean
    assert_everywhere(np.allclose(local.data, start - 0.5 * mean - 0.5 * velocity, atol=1e-12),
                      "synchronize() + step() must reduce exactly once")

"""GPU tests: CuPy arrays through the collectives, checked against the CPU path.

They need CuPy and a CUDA device and skip cleanly (with the reason) without them. `make
test-gpu` runs them on 1 and 2 ranks; 2 ranks on a 1-GPU machine share device 0. Results
must be bitwise identical across ranks, exact for integers and min/max, and within the
rounding bound of p additions for float sums, compared with the NumPy (host) path.
"""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, same_bits_everywhere

from ringsync.transport import gpu

COMM = MPI.COMM_WORLD
pytestmark = [pytest.mark.gpu, pytest.mark.mpi]
REASON = gpu.gpu_unavailable_reason()
if REASON is not None:   # the same on every rank of one machine, so all ranks skip together
    pytest.skip(f"no GPU: {REASON}", allow_module_level=True)


@pytest.fixture(scope="module")
def cp(rs):
    import cupy
    rs.use_gpu()
    return cupy


@pytest.fixture(params=[gpu.STAGED, gpu.CUDA_AWARE])
def transport(request, cp):
    """Run the test once per transport; CUDA-aware only where the MPI library supports it."""
    if request.param == gpu.CUDA_AWARE and not gpu.mpi_cuda_support()[0]:
        pytest.skip(f"this MPI is not CUDA-aware ({gpu.mpi_cuda_support()[1]})")
    gpu.force_transport(request.param)
    yield request.param
    gpu.force_transport(None)


def rank_data(shape, dtype, seed):
    rng = np.random.default_rng([seed, COMM.rank])
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


def close_to_host(got, expected, x, op):
    """Exact for integers and min/max; for float sums within 2p eps of the magnitudes."""
    if x.dtype.kind != "f" or op in ("min", "max"):
        return np.array_equal(got, expected)
    scale = np.empty(x.shape, np.float64)
    COMM.Allreduce(np.abs(x.astype(np.float64)), scale, op=MPI.SUM)
    bound = 2 * COMM.size * np.finfo(x.dtype).eps * scale + np.finfo(x.dtype).tiny
    return bool(np.all(np.abs(got.astype(np.float64) - expected) <= bound))


@pytest.mark.parametrize("op", ["sum", "average", "min", "max"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 1000), (1 << 18,)])
def test_allreduce_on_gpu_matches_the_host_path(rs, cp, transport, shape, dtype, op):
    x = rank_data(shape, dtype, seed=sum(shape))
    gx = cp.asarray(x)
    got = rs.allreduce(gx, op=op)
    expected = rs.allreduce(x, op=op)
    ok = isinstance(got, cp.ndarray) and got.shape == x.shape and got.dtype == x.dtype
    host = cp.asnumpy(got)
    assert_everywhere(ok, f"allreduce returned {type(got).__name__} {got.shape} {got.dtype}")
    assert_everywhere(close_to_host(host, expected, x, op), f"{transport} {op} {dtype} {shape} off")
    assert_everywhere(same_bits_everywhere(host), "GPU results differ across ranks")
    assert_everywhere(np.array_equal(cp.asnumpy(gx), x), "out-of-place allreduce changed its input")


def test_allreduce_in_place_small_segments_and_own_stream(rs, cp, transport, monkeypatch):
    monkeypatch.setenv("RINGSYNC_STAGING_SEGMENT", "256")   # many segments: the pipelined path
    x = rank_data(100_003, "float32", seed=5)
    expected = rs.allreduce(x)
    with cp.cuda.Stream(non_blocking=True):
        gx = cp.asarray(x) * 1     # pending work on this stream that the collective must follow
        same = rs.allreduce_(gx)
        host = cp.asnumpy(gx)
    assert_everywhere(same is gx, "allreduce_ did not return its argument")
    assert_everywhere(close_to_host(host, expected, x, "sum"), "in-place GPU allreduce off")
    assert_everywhere(same_bits_everywhere(host), "GPU results differ across ranks")


def test_non_contiguous_input(rs, cp, transport):
    x = rank_data((40, 30), "float64", seed=9)
    got = rs.allreduce(cp.asarray(x).T, op="max")
    assert_everywhere(np.array_equal(cp.asnumpy(got), rs.allreduce(x.T, op="max")), "transposed input")


@pytest.mark.parametrize("n", [0, 5, 70_001])
def test_broadcast_on_gpu(rs, cp, transport, n):
    for root in range(COMM.size):
        x = rank_data(n, "float32", seed=11)
        expected = rs.broadcast(x, root=root)
        gx = cp.asarray(x)
        out = rs.broadcast(gx, root=root)
        rs.broadcast_(gx, root=root)
        ok = isinstance(out, cp.ndarray) and np.array_equal(cp.asnumpy(out), expected)
        assert_everywhere(ok and np.array_equal(cp.asnumpy(gx), expected), f"broadcast from {root}")


def test_allgather_on_gpu(rs, cp, transport):
    rows = (3 * COMM.rank + 1) % 4          # ragged first dimension, possibly 0
    x = rank_data((rows, 3), "int64", seed=13)
    got = rs.allgather(cp.asarray(x))
    expected = rs.allgather(x)
    ok = isinstance(got, cp.ndarray) and np.array_equal(cp.asnumpy(got), expected)
    assert_everywhere(ok, "GPU allgather differs from the host path")


def test_device_choice_follows_the_local_rank(rs, cp):
    expected = rs.local_rank() % cp.cuda.runtime.getDeviceCount()
    assert_everywhere(cp.cuda.Device().id == expected, "use_gpu picked an unexpected device")
    assert_everywhere(gpu.describe().startswith("GPU: CuPy"), gpu.describe())


def test_fusion_on_gpu(rs, cp):
    from ringsync.fusion import FlatBuffer
    shapes = [(3, 4), (5,), (), (0,), (257, 3)]
    host = [rank_data(s, "float32", seed=i) for i, s in enumerate(shapes)]
    expected = rs.grouped_allreduce([h for h in host], op="average")
    got = rs.grouped_allreduce([cp.asarray(h) for h in host], op="average", fusion_bytes=1024)
    ok = all(isinstance(g, cp.ndarray) and np.allclose(cp.asnumpy(g), e, rtol=1e-5, atol=1e-6)
             for g, e in zip(got, expected))
    assert_everywhere(ok, "grouped_allreduce on CuPy arrays differs from NumPy")
    # In place on separate device arrays: packed into the (device) fusion buffer.
    separate = [cp.asarray(h) for h in host]
    rs.grouped_allreduce_(separate, op="average")
    ok = all(np.allclose(cp.asnumpy(g), e, rtol=1e-5, atol=1e-6) for g, e in zip(separate, expected))
    assert_everywhere(ok, "grouped_allreduce_ packing CuPy arrays differs from NumPy")
    # In place on views of one device buffer: reduced where they lie, no packing.
    flat = FlatBuffer(shapes, np.float32, xp=cp)
    for view, h in zip(flat.views, host):
        view[...] = cp.asarray(h)
    rs.grouped_allreduce_(flat.views, op="average")
    ok = all(np.allclose(cp.asnumpy(v), e, rtol=1e-5, atol=1e-6) for v, e in zip(flat.views, expected))
    assert_everywhere(ok, "grouped_allreduce_ on a CuPy FlatBuffer differs from NumPy")
    assert_everywhere(same_bits_everywhere(cp.asnumpy(flat.flat)), "fused GPU results differ across ranks")


@pytest.mark.mpi(min_size=2)
def test_join_with_device_arrays(rs, cp, transport):
    from ringsync.uneven import join
    if COMM.rank != 0:                          # rank 0 has no work: it joins at once
        out = rs.allreduce(cp.full(5, float(COMM.rank)), op="average")
        ok = np.array_equal(cp.asnumpy(out), np.full(5, COMM.size / 2.0))   # mean of ranks 1..p-1
    else:
        ok = True
    join()
    assert_everywhere(ok, "a device all-reduce while rank 0 had joined went wrong")

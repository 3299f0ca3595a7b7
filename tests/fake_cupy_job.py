"""Run under mpiexec: ringsync's CuPy glue on the NumPy-backed fake CuPy (tests/fake_cupy.py).

    mpiexec -n 3 python tests/fake_cupy_job.py collectives
    mpiexec -n 2 python tests/fake_cupy_job.py train [ringsync-train flags]

GLUE COVERAGE ONLY: nothing here runs on a GPU.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fake_cupy
from mpitools import ringsync_settings

cp = fake_cupy.install()

import numpy as np
from mpi4py import MPI

import ringsync as rs
from ringsync.fusion import FlatBuffer
from ringsync.transport import gpu

COMM = MPI.COMM_WORLD


def rank_data(shape, dtype, seed):
    rng = np.random.default_rng([seed, COMM.rank])
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


def same(got, expected, exact):
    if type(got) is not cp.ndarray or got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    host = cp.asnumpy(got)
    return np.array_equal(host, expected) if exact else np.allclose(host, expected, rtol=1e-5, atol=1e-5)


def collectives() -> list[str]:
    bad = []
    rs.use_gpu()
    for transport in (gpu.STAGED, gpu.CUDA_AWARE):
        gpu.force_transport(transport)
        for op in ("sum", "average", "min", "max"):
            for dtype in ("float32", "int64"):
                for shape in [(0,), (1,), (7,), (3, 333)]:
                    x = rank_data(shape, dtype, seed=sum(shape))
                    gx = cp.asarray(x)
                    got = rs.allreduce(gx, op=op)
                    if not same(got, rs.allreduce(x, op=op), exact=dtype != "float32" or op in ("min", "max")):
                        bad.append(f"{transport} allreduce {op} {dtype} {shape}")
                    if not np.array_equal(cp.asnumpy(gx), x):
                        bad.append(f"{transport} allreduce changed its input")
        with ringsync_settings(RINGSYNC_STAGING_SEGMENT="12"):     # many segments per chunk
            gpu.force_transport(transport)
            x = rank_data(1001, "float64", 3)
            gx = cp.asarray(x)
            returned, host = rs.allreduce_(gx), rs.allreduce(x)       # (every rank calls both)
            if returned is not gx or not same(gx, host, exact=False):
                bad.append(f"{transport} allreduce_ in place, small segments")
        gpu.force_transport(transport)
        for root in range(COMM.size):
            x = rank_data(50, "float32", 4)
            gx = cp.asarray(x)
            out = rs.broadcast(gx, root=root)
            rs.broadcast_(gx, root=root)
            expected = rs.broadcast(x, root=root)
            if not (same(out, expected, exact=True) and same(gx, expected, exact=True)):
                bad.append(f"{transport} broadcast from {root}")
        x = rank_data(((3 * COMM.rank + 1) % 4, 2), "int32", 5)
        if not same(rs.allgather(cp.asarray(x)), rs.allgather(x), exact=True):
            bad.append(f"{transport} allgather")
        shapes = [(3, 4), (5,), (), (257,)]
        host = [rank_data(s, "float32", i) for i, s in enumerate(shapes)]
        expected = rs.grouped_allreduce(host, op="average")
        got = rs.grouped_allreduce([cp.asarray(h) for h in host], op="average", fusion_bytes=64)
        if not all(same(g, e, exact=False) for g, e in zip(got, expected)):
            bad.append(f"{transport} grouped_allreduce")
        separate = [cp.asarray(h) for h in host]     # not adjacent: packed into the fusion buffer
        rs.grouped_allreduce_(separate, op="average", fusion_bytes=1 << 20)
        if not all(same(g, e, exact=False) for g, e in zip(separate, expected)):
            bad.append(f"{transport} grouped_allreduce_ (packed)")
        flat = FlatBuffer(shapes, np.float32, xp=cp)
        for view, h in zip(flat.views, host):
            view[...] = cp.asarray(h)
        rs.grouped_allreduce_(flat.views, op="average")
        if not all(same(v, e, exact=False) for v, e in zip(flat.views, expected)):
            bad.append(f"{transport} grouped_allreduce_ (in place on a FlatBuffer)")
    return bad


def layers_check() -> list[str]:
    """A device buffer's trip through allreduce_ goes down the layers too (tests/test_layout.py)."""
    from test_mpi_layout import trace
    bad = []
    for transport in (gpu.STAGED, gpu.CUDA_AWARE):
        gpu.force_transport(transport)
        gx = cp.asarray(np.ones(1000, np.float32))
        rs.allreduce_(gx)
        path, climbs = trace(lambda gx=gx: rs.allreduce_(gx))
        if climbs:
            bad.append(f"{transport}: calls that climb back up a layer: {climbs}")
        if COMM.rank == 0 and "--show-path" in sys.argv:
            print(f"{transport}: {' -> '.join(path)}")
    return bad


def join_check() -> list[str]:
    """Rank 0 joins at once (uneven.py); the others reduce and broadcast device arrays without it."""
    from ringsync.uneven import join
    bad = []
    if COMM.rank != 0:
        for transport in (gpu.STAGED, gpu.CUDA_AWARE):
            gpu.force_transport(transport)
            out = rs.allreduce(cp.asarray(np.full(5, float(COMM.rank))), op="average")
            if not same(out, np.full(5, COMM.size / 2.0), exact=True):   # mean of ranks 1..p-1
                bad.append(f"{transport} allreduce while rank 0 has joined: {cp.asnumpy(out)}")
            got = rs.broadcast(cp.asarray(np.full(3, float(COMM.rank))), root=1)
            if not same(got, np.full(3, 1.0), exact=True):
                bad.append(f"{transport} broadcast while rank 0 has joined")
    join()
    return bad


def host_against_device_check() -> list[str]:
    """A NumPy buffer on one rank and a CuPy one on the others: every rank raises (the two take
    different paths; the agreement check compares where a buffer lives)."""
    x = np.ones(100, np.float32)
    mine = x if COMM.rank == 0 else cp.asarray(x)
    bad = []
    for name, call in (("allreduce_", lambda: rs.allreduce_(mine)), ("broadcast_", lambda: rs.broadcast_(mine)),
                       ("allgather", lambda: rs.allgather(mine))):
        try:
            call()
            bad.append(f"host against device went through {name}")
        except rs.MismatchError as exc:
            if "buffer differs" not in str(exc):
                bad.append(f"host against device, {name}: {exc}")
    return bad


def main() -> int:
    rs.init()
    if sys.argv[1] == "train":
        from ringsync.training.train import main as train
        return train(sys.argv[2:])
    bad = collectives() + layers_check() + (join_check() + host_against_device_check() if COMM.size > 1 else [])
    everyone = COMM.allgather(bad)
    if COMM.rank == 0:
        failures = [f"rank {r}: {m}" for r, ms in enumerate(everyone) for m in ms]
        print("\n".join(failures) if failures else f"fake-cupy glue: ok on {COMM.size} ranks")
    return 1 if any(everyone) else 0


if __name__ == "__main__":
    sys.exit(main())

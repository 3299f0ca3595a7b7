"""An average never overflows where its inputs do not, on every path (docs/ring.md, docs/shared-memory.md).

Floats are divided by the number of contributing ranks before the sum, as NCCL does, so
values near the dtype's largest (3e38 in float32, 58000 in float16) average to a finite,
correct result where their sum would be inf. Each path a call can take: riding on the
opening, the gathered reduce, recursive doubling, the ring, the pipelined ring, shared memory
copied in (one piece or many), separate arrays fused as they lie or packed, hierarchical
(simulated nodes), a joined rank, and the zero-copy shared FlatBuffer (its views, or a list
of them). Every result: finite, the mean to rounding, bitwise identical on every rank.
"""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import Verdicts, assert_everywhere, ringsync_settings

from ringsync import collectives

COMM = MPI.COMM_WORLD
R, P = COMM.rank, COMM.size

SMALL = {"RINGSYNC_SHM_SMALL_BYTES": "16384"}     # the shared-memory small limit: 16 KB
CONFIGS = {
    "shm": {"RINGSYNC_TRANSPORT": "shm", **SMALL},
    "shm-unchecked": {"RINGSYNC_TRANSPORT": "shm", "RINGSYNC_CHECK_AGREEMENT": "0", **SMALL},
    "pieces": {"RINGSYNC_TRANSPORT": "shm", "RINGSYNC_SHM_SLOT_BYTES": "1024"},
    "nodes-of-2": {"RINGSYNC_TRANSPORT": "shm", "RINGSYNC_NODE_SIZE": "2", "RINGSYNC_SHM_SLOT_BYTES": "8192"},
    "nodes-of-1": {"RINGSYNC_TRANSPORT": "shm", "RINGSYNC_NODE_SIZE": "1"},
    "p2p": {"RINGSYNC_TRANSPORT": "p2p"},
    "p2p-unchecked": {"RINGSYNC_TRANSPORT": "p2p", "RINGSYNC_CHECK_AGREEMENT": "0"},
    "p2p-ring": {"RINGSYNC_TRANSPORT": "p2p", "RINGSYNC_ALLREDUCE": "ring"},
    "p2p-pipelined": {"RINGSYNC_TRANSPORT": "p2p", "RINGSYNC_ALLREDUCE": "pipelined",
                      "RINGSYNC_SEGMENT_BYTES": "4096"},
    "p2p-doubling": {"RINGSYNC_TRANSPORT": "p2p", "RINGSYNC_ALLREDUCE": "doubling"},
}
DTYPES = ["float16", "float32", "float64"]
LENGTHS = [1, 7, 3000, 20_001]              # rides on the opening .. many pieces, pipelined
SHAPES = [(100, 100), (7,), (0,), (3, 5)]   # a FlatBuffer above the 16 KB small limit, even in float16
SEPARATE = [15_001, 3, 0, 4_000]


def big(n, dtype, rank, seed=0):
    """Values near the dtype's largest (3e38 in float32), of both signs, different on every rank."""
    i = np.arange(n)
    sign = np.where((i + seed) % 3 == 0, -1.0, 1.0)
    return (sign * np.finfo(dtype).max * (0.88 - 0.01 * ((i + rank + seed) % 5))).astype(dtype)


def expected(n, dtype, ranks, seed=0):
    """The mean over `ranks` (each input divided first, in float64: no overflow)."""
    return sum(big(n, dtype, r, seed).astype(np.float64) / len(ranks) for r in ranks)


def correct(got, n, dtype, ranks, seed=0):
    """Finite and the mean to rounding (a few units in the last place per rank)."""
    want = expected(n, dtype, ranks, seed)
    tol = 2 * len(ranks) * np.finfo(dtype).eps
    return bool(np.isfinite(got).all()) and np.allclose(got.astype(np.float64), want, rtol=tol, atol=0)


@pytest.fixture(params=list(CONFIGS))
def config(request, rs):
    with ringsync_settings(**CONFIGS[request.param]):
        yield request.param


@pytest.fixture
def zero_copy(monkeypatch):
    """Counts the all-reduces that took the zero-copy path (algorithms/shared.py)."""
    taken, real = [], collectives.shared_allreduce_in_place_

    def counted(flat, *args, **kwargs):
        taken.append(flat.size)
        return real(flat, *args, **kwargs)

    monkeypatch.setattr(collectives, "shared_allreduce_in_place_", counted)
    return taken


def check(verdicts, ok, got, what):
    verdicts.expect(ok, f"{what}: not finite or not the mean")
    verdicts.same_bits(got, what)


@pytest.mark.mpi
def test_an_average_of_values_near_the_largest_is_finite_and_the_mean_on_every_path(rs, config):
    everyone, v = range(P), Verdicts()
    total = sum(int(np.prod(s)) for s in SHAPES)
    for dtype in DTYPES:
        for n in LENGTHS:                                       # one array: small to pipelined
            got = rs.allreduce(big(n, dtype, R), op="average")
            check(v, correct(got, n, dtype, everyone), got, f"{config} allreduce {n} {dtype}")
            x = big(n, dtype, R, seed=1)
            rs.allreduce_(x.reshape(1, n), op="average")
            check(v, correct(x, n, dtype, everyone, seed=1), x, f"{config} allreduce_ {n} {dtype}")
        arrays = [big(n, dtype, R, seed=k) for k, n in enumerate(SEPARATE)]     # separate arrays
        rs.grouped_allreduce_(arrays, op="average")
        for k, (n, got) in enumerate(zip(SEPARATE, arrays)):
            check(v, correct(got, n, dtype, everyone, seed=k), got, f"{config} grouped [{k}] {dtype}")
        got = rs.grouped_allreduce([big(n, dtype, R, seed=k) for k, n in enumerate(SEPARATE)], op="average")
        for k, (n, out) in enumerate(zip(SEPARATE, got)):
            check(v, correct(out, n, dtype, everyone, seed=k), out, f"{config} grouped_allreduce [{k}] {dtype}")
        for shared in (False, True):                            # a FlatBuffer: its views, or a list
            with rs.FlatBuffer(SHAPES, dtype, shared=shared) as fb:
                for views in (fb.views, list(fb.views)):
                    fb.flat[...] = big(total, dtype, R)
                    rs.grouped_allreduce_(views, op="average")
                    check(v, correct(fb.flat, total, dtype, everyone), fb.flat,
                          f"{config} FlatBuffer shared={shared} {type(views).__name__} {dtype}")
    v.check()


@pytest.mark.mpi(min_size=2)
def test_an_average_with_a_joined_rank_divides_by_the_contributors_first(rs, config):
    """A joined rank contributes nothing; the others divide by P-1 before the sum."""
    if "unchecked" in config:
        pytest.skip("join() needs the agreement check")
    ok, results = True, []
    if R != P - 1:
        for dtype in DTYPES:
            for n in LENGTHS:
                got = rs.allreduce(big(n, dtype, R), op="average")
                ok = ok and correct(got, n, dtype, range(P - 1))
                results.append(got.tobytes())
    rs.join()
    assert_everywhere(ok, f"{config}: an average with a joined rank is not finite or not the mean")
    theirs = COMM.allgather(results)
    assert_everywhere(all(t == theirs[0] for t in theirs[:P - 1]), "the contributing ranks' results differ")


@pytest.mark.mpi
def test_the_zero_copy_average_divides_first_and_matches_the_copy_in_path(rs, zero_copy):
    """A shared FlatBuffer on one node (the trainer's gradients) takes the zero-copy path,
    which divides each input as it reads it: the same bits as the copy-in path, which
    divides on the way into its slots."""
    total, v = sum(int(np.prod(s)) for s in SHAPES), Verdicts()
    with ringsync_settings(RINGSYNC_TRANSPORT="shm", **SMALL):
        for dtype in DTYPES:
            with rs.FlatBuffer(SHAPES, dtype, shared=True) as fb:
                for views in (fb.views, list(fb.views)):
                    fb.flat[...] = big(total, dtype, R)
                    private = fb.flat.copy()
                    del zero_copy[:]
                    rs.grouped_allreduce_(views, op="average")
                    v.expect(len(zero_copy) == (P > 1),
                             f"zero-copy path taken {len(zero_copy)} times ({type(views).__name__} {dtype})")
                    check(v, correct(fb.flat, total, dtype, range(P)), fb.flat,
                          f"zero-copy {type(views).__name__} {dtype}")
                    rs.allreduce_(private, op="average")        # the copy-in path, same data
                    v.expect(np.array_equal(private, fb.flat), f"zero-copy and copy-in differ ({dtype})")
    v.check()

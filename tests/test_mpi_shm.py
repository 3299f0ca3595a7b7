"""The shared-memory transport (transport/shm.py, algorithms/shared.py) on every path:

  p2p         messages only (RINGSYNC_TRANSPORT=p2p): the path every other test now skips,
              as auto picks shared memory whenever ranks share a node
  pieces      one node, slots of 1 KB: every buffer crosses many pieces and both slot parities
  nodes-of-2  RINGSYNC_NODE_SIZE=2: hierarchical, 2 nodes of 2 on 4 ranks, nodes of 2 and 1 on 3
  nodes-of-1  every rank a node of its own: the ring across nodes carries everything

and the zero-copy FlatBuffer (shared=True). Each configuration: every length, dtype and op
against the oracle, bitwise identical everywhere; a mismatch and join() on its path.
"""
import itertools

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import Verdicts, assert_everywhere, exact_integer_allreduce, ringsync_settings, same_bits_everywhere
from test_memcopy import at_page_offset, count_trapped_copies
from test_mpi_allreduce import DTYPES, OPS, check_against_oracle, rank_data

from ringsync.context import world
from ringsync.transport.memcopy import PAGE, address

COMM = MPI.COMM_WORLD
R, P = COMM.rank, COMM.size
LENGTHS = [0, 1, 2, 3, 7, 1001, 65537]
# Where the slots are small (1 KB in pieces, 8 KB in nodes-of-2) a fraction of the largest
# sizes still crosses dozens of pieces and both slot parities, and each piece is a sync point
# every rank must reach: at full size these tests took a third or more of the 300 s limit of
# the 3- and 4-rank steps on a loaded machine (tests/loops/make_test_loop.sh).
SMALL_SLOTS = {"pieces": 10, "nodes-of-2": 4}


def scaled(config: str, n: int) -> int:
    """n, or (for n of 10,000 and more) a fraction of it, made odd, where the slots are small."""
    k = SMALL_SLOTS.get(config, 1)
    return n if k == 1 or n < 10_000 else (n // k) | 1

CONFIGS = {
    "p2p": {"RINGSYNC_TRANSPORT": "p2p"},
    "pieces": {"RINGSYNC_TRANSPORT": "shm", "RINGSYNC_SHM_SLOT_BYTES": "1024"},
    "nodes-of-2": {"RINGSYNC_TRANSPORT": "shm", "RINGSYNC_NODE_SIZE": "2", "RINGSYNC_SHM_SLOT_BYTES": "8192"},
    "nodes-of-1": {"RINGSYNC_TRANSPORT": "shm", "RINGSYNC_NODE_SIZE": "1"},
}


def expected_shape(name: str) -> tuple[bool, bool]:
    """(has a node segment, all ranks on one node) for a configuration on P ranks."""
    if name == "p2p" or P == 1:
        return False, False
    if name == "nodes-of-2":
        return True, P <= 2
    if name == "nodes-of-1":
        return True, False
    return True, True


@pytest.fixture(params=list(CONFIGS))
def config(request, rs):
    with ringsync_settings(**CONFIGS[request.param]):
        w = world()
        assert_everywhere((w.node is not None, w.single_node) == expected_shape(request.param),
                          f"{request.param}: node {w.node is not None}, single node {w.single_node}")
        yield request.param


def raised_everywhere(call, error, match=""):
    try:
        call()
    except error as exc:
        return match in str(exc)
    return False


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_length_and_op_on_every_path(rs, config, dtype):
    for length in (scaled(config, n) for n in LENGTHS):
        for op in OPS:
            check_against_oracle(rs, rank_data((length,), dtype, seed=length), op)


@pytest.mark.mpi(min_size=2)
def test_a_mismatch_raises_everywhere_on_every_path(rs, config):
    for n in (100, 100_000):        # rides on the opening; opens, then the transport's path
        x = np.ones(n + (R == P - 1), np.float32)
        ok = raised_everywhere(lambda x=x: rs.allreduce(x), rs.MismatchError, "shape differs")
        assert_everywhere(ok, f"{config}: {n} elements against {n + 1} did not raise everywhere")
    got = rs.allreduce(np.full(70_000, R + 1.0))
    assert_everywhere(np.array_equal(got, np.full(70_000, P * (P + 1) / 2)), "allreduce after a mismatch")


@pytest.mark.mpi(min_size=2)
def test_join_on_every_path(rs, config):
    ok = True
    if R != P - 1:                  # the last rank has no work at all
        for n in (5, 70_000):
            got = rs.allreduce(np.full(n, R + 1.0), op="sum")
            ok = ok and bool(np.all(got == (P - 1) * P / 2))
    rs.join()
    assert_everywhere(ok, f"{config}: a reduction with a joined rank gave the wrong result")


@pytest.mark.mpi
def test_broadcast_and_allgather_on_every_path(rs, config):
    for n in (0, 1, 3000, 70_000):           # pieces: 1 KB slots, so one piece to hundreds
        for root in range(P):
            x = rank_data((n,), "float32", seed=R)
            got = rs.broadcast(x, root=root)
            assert_everywhere(np.array_equal(got, COMM.bcast(x, root=root)), f"{config}: broadcast {n} from {root}")
        rows = rank_data((n // 100 * (R + 1), 2), "int16", seed=n + R)     # ragged, up to ~11 KB
        got = rs.allgather(rows)
        assert_everywhere(np.array_equal(got, np.concatenate(COMM.allgather(rows))), f"{config}: allgather {n}")


@pytest.mark.mpi(min_size=2)
def test_broadcast_and_allgather_with_a_joined_rank_on_every_path(rs, config):
    ok = True
    if R != P - 1:
        b = rs.broadcast(np.full(70_000, 7.0), root=0)
        g = rs.allgather(np.full((R + 1, 2), R, dtype=np.int32))
        want = np.concatenate([np.full((r + 1, 2), r, dtype=np.int32) for r in range(P - 1)])
        ok = np.array_equal(b, np.full(70_000, 7.0)) and np.array_equal(g, want)
    rs.join()
    assert_everywhere(ok, f"{config}: broadcast or allgather with a joined rank")


# --- memcpy's trap (transport/memcopy.py) -----------------------------------------------------

def trap_offsets() -> list[int]:
    """Page offsets for a user buffer that put its copies to or from some rank's slot in memcpy's
    trap: 16 bytes before or after each slot's offset on any node (the same list on every rank)."""
    node = world().node
    mine = {address(s) % PAGE for parity in node.slots for s in parity} if node is not None else set()
    slots = set().union(*COMM.allgather(mine))
    return sorted({(o + d) % PAGE for o in slots for d in (-16, 16)}) or [0]


@pytest.fixture
def trapped(monkeypatch):
    """The copies memcopy.copy_ makes around the trap, recorded (checked on any processor)."""
    return count_trapped_copies(monkeypatch)


@pytest.mark.mpi
@pytest.mark.parametrize("nodes", ["one", "of-2"])
def test_allreduce_of_buffers_in_memcpys_trap(rs, trapped, nodes):
    """Buffers placed in the trap against every rank's slots: 160 KB (riding on the opening on
    2 ranks) and 1.5 MB (pieces, chunks of 128 KB and more on up to 4 ranks), against the same
    data in a plain buffer, bitwise; some copies must have gone around the trap."""
    with ringsync_settings(RINGSYNC_TRANSPORT="shm", RINGSYNC_NODE_SIZE="0" if nodes == "one" else "2"):
        for n in (40_000, 390_000):
            for offset in trap_offsets():
                x = at_page_offset(n, np.float32, offset)
                x[...] = rank_data((n,), "float32", seed=offset)
                plain = x.copy()
                rs.allreduce_(x)
                rs.allreduce_(plain)
                same = same_bits_everywhere(x)      # (collective: never behind `and`)
                assert_everywhere(np.array_equal(x, plain) and same,
                                  f"{nodes}: allreduce of {n} at page offset {offset}")
        went_around = COMM.allreduce(len(trapped))
    assert_everywhere(P == 1 or went_around > 0, f"{nodes}: no copy went around the trap")


@pytest.mark.mpi
def test_a_shared_flatbuffer_whose_parts_lie_in_memcpys_trap(rs, shm, trapped):
    n = (200 * PAGE + 16) // 4      # above the small limit; rank q's part lies 16 bytes further into a page
    with rs.FlatBuffer([(n,)], np.int32, shared=True) as fb:
        fb.flat[...] = rank_data((n,), "int32", seed=9)
        rs.grouped_allreduce_(fb.views)
        ok = np.array_equal(fb.flat, exact_integer_allreduce(rank_data((n,), "int32", 9), "sum"))
        parts = [address(part) % PAGE for part in fb.window.peers] if fb.shared else []
    assert_everywhere(ok, "a shared FlatBuffer of 200 pages + 16 bytes")
    laid_out = len(set(parts)) == P       # MPI laid the parts back to back, each 16 bytes further on
    went_around = COMM.allreduce(len(trapped))
    assert_everywhere(P == 1 or not laid_out or went_around > 0, "no copy between the parts went around the trap")


# --- the zero-copy FlatBuffer ----------------------------------------------------------------

SHAPES = [(300, 70), (70,), (0,), (13, 3, 2)]


def shared_buffer(rs, dtype, seed):
    fb = rs.FlatBuffer(SHAPES, dtype, shared=True)
    fb.flat[...] = rank_data(fb.flat.shape, dtype, seed)
    return fb


@pytest.fixture
def shm(rs):
    with ringsync_settings(RINGSYNC_TRANSPORT="shm"):
        yield


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "float16", "int64"])
@pytest.mark.parametrize("op", OPS)
def test_a_shared_flatbuffer_reduces_in_place_and_matches_the_copy_in_path(rs, shm, dtype, op):
    with shared_buffer(rs, dtype, seed=5) as fb:
        assert_everywhere(fb.shared == (P > 1), f"shared: {fb.shared}")
        private = fb.flat.copy()
        rs.allreduce_(private, op=op)                  # the copy-in path, same data
        rs.grouped_allreduce_(fb.views, op=op)
        got = fb.flat.copy()
    if np.dtype(dtype).kind in "iu":
        ok = np.array_equal(got, exact_integer_allreduce(rank_data(got.shape, dtype, 5), op))
    else:       # each element: rank 0 (op) rank 1 (op) ..., an average's inputs divided first
        ok = np.array_equal(got, private)
    assert_everywhere(ok, f"shared FlatBuffer {op} {dtype} differs from the copy-in path")
    assert_everywhere(same_bits_everywhere(got), "results are not bitwise identical across ranks")


@pytest.mark.mpi
def test_a_rank_may_overwrite_its_shared_buffer_as_soon_as_the_call_returns(rs, shm):
    ok = True
    with rs.FlatBuffer([(1 << 18,)], np.float32, shared=True) as fb:
        for step in range(20):
            fb.flat[...] = R + step
            rs.grouped_allreduce_(fb.views)
            ok = ok and bool(np.all(fb.flat == P * step + P * (P - 1) / 2))
            fb.flat[...] = np.nan                      # no other rank may still be reading it
    assert_everywhere(ok, "a rank read another's buffer after the call had returned")


@pytest.mark.mpi(min_size=2)
def test_shared_against_private_memory_raises_everywhere(rs, shm):
    with rs.FlatBuffer([(100_000,)], np.float32, shared=True) as fb:   # above the small limit
        views = fb.views if R == 0 else [np.ones(100_000, np.float32)]
        ok = raised_everywhere(lambda: rs.grouped_allreduce_(views), rs.MismatchError, "buffer differs")
    assert_everywhere(ok, "a shared buffer on one rank and private memory on another went through")


@pytest.mark.mpi(min_size=2)
def test_shared_buffers_of_different_sizes_raise_everywhere(rs, shm):
    ok = raised_everywhere(lambda: rs.FlatBuffer([(10 + R,)], np.float32, shared=True), ValueError,
                           "same shapes")
    assert_everywhere(ok and not world().windows, "shared FlatBuffers of different sizes")


@pytest.mark.mpi(min_size=2)
def test_join_while_others_reduce_a_shared_buffer(rs, shm):
    with rs.FlatBuffer([(50_000,)], np.float64, shared=True) as fb:
        ok = True
        if R != P - 1:
            fb.flat[...] = R + 1
            rs.grouped_allreduce_(fb.views, op="average")
            ok = bool(np.all(fb.flat == P / 2))         # the mean of 1 .. P-1
        rs.join()
    assert_everywhere(ok, "joined rank and shared buffer")


@pytest.mark.mpi
def test_close_and_shutdown_free_the_windows(rs, shm):
    fb = rs.FlatBuffer([(10,)], np.float32, shared=True)
    fb.close()
    fb.close()                                          # idempotent
    assert_everywhere(not world().windows and not fb.shared)
    rs.FlatBuffer([(10,)], np.float32, shared=True)     # left open: shutdown frees it
    rs.shutdown()
    rs.init()
    assert_everywhere(not world().windows)


@pytest.mark.mpi(min_size=2)
def test_different_shared_buffers_raise_everywhere(rs, shm):
    # The others read a rank's buffer where its own lies: ranks must pass the same one.
    with rs.FlatBuffer([(100_000,), (100_000,)], np.float32, shared=True) as fb:
        view = fb.views[R % 2]
        ok = raised_everywhere(lambda: rs.grouped_allreduce_([view]), rs.MismatchError, "buffer differs")
    assert_everywhere(ok, "different views of one shared FlatBuffer went through")


# --- separate arrays fused with no fusion buffer (algorithms/scattered.py) ----------------------

SEPARATE = [0, 150_001, 3, 0, 40_000, 1, 2]     # above the small limit even as float16


def separate_arrays(dtype, seed, config=""):
    sizes = [scaled(config, n) for n in SEPARATE]
    data = rank_data((sum(sizes),), dtype, seed)
    bounds = np.cumsum([0, *sizes])
    return [data[lo:hi].copy() for lo, hi in itertools.pairwise(bounds)]     # separate allocations


@pytest.fixture
def unpacked(monkeypatch):
    """Counts the buckets fusion.py reduces as they lie (algorithms/scattered.py)."""
    from ringsync import fusion

    made, scattered = [], fusion.Scattered

    def counted(arrays):
        made.append(len(arrays))
        return scattered(arrays)

    monkeypatch.setattr(fusion, "Scattered", counted)
    return made


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int32"])
def test_separate_arrays_give_the_bits_of_their_concatenation_on_every_path(rs, config, dtype, unpacked):
    v = Verdicts()
    for op in OPS:
        arrays = separate_arrays(dtype, seed=7, config=config)
        reference = rs.allreduce(np.concatenate(arrays), op=op)
        del unpacked[:]
        rs.grouped_allreduce_(arrays, op=op)
        got = np.concatenate(arrays)
        v.expect(np.array_equal(got, reference, equal_nan=True),
                 f"{config}: {op} {dtype} of separate arrays differs from their concatenation's")
        v.same_bits(got, f"{config}: {op} {dtype}")
        as_they_lie = config != "p2p" and P > 1 and not (op == "average" and dtype == "int32")
        v.expect(unpacked == ([len(SEPARATE)] if as_they_lie else []),
                 f"{config}: {op} {dtype}: buckets reduced as they lie {unpacked}")
    v.check()


@pytest.mark.mpi
def test_an_array_twice_or_overlapping_views_are_packed_not_reduced_twice(rs, config, unpacked):
    k = 100_000 // SMALL_SLOTS.get(config, 1)
    a = np.full(k, 1.0 + R, np.float32)
    b = np.full(k, 1.0 + R, np.float32)
    base = np.full(3 * k, 1.0 + R, np.float32)
    for arrays in ([a, a], [b, base[:2 * k], base[k:]]):
        rs.grouped_allreduce_(arrays)
        total = P * (P + 1) / 2
        ok = all(np.all(x == total) for x in arrays[:1]) and not unpacked
        assert_everywhere(ok, f"{config}: overlapping arrays in a bucket")
        a[...], b[...], base[...] = 1.0 + R, 1.0 + R, 1.0 + R
    views = [base[:k], base[2 * k:]]                            # separate views of one array
    rs.grouped_allreduce_(views)
    assert_everywhere(all(np.all(v == P * (P + 1) / 2) for v in views)
                      and unpacked == ([2] if config != "p2p" and P > 1 else []), f"{config}: separate views")


@pytest.mark.mpi(min_size=2)
def test_adjacent_views_on_one_rank_and_separate_arrays_on_the_others_agree(rs, shm):
    fb = rs.FlatBuffer([(n,) for n in SEPARATE], np.float32)          # private, adjacent views
    arrays = list(fb.views) if R == 0 else separate_arrays(np.float32, seed=3)
    if R == 0:
        fb.flat[...] = np.concatenate(separate_arrays(np.float32, seed=3))
    reference = rs.allreduce(np.concatenate(arrays))
    rs.grouped_allreduce_(arrays)
    assert_everywhere(np.array_equal(np.concatenate(arrays), reference), "views against separate arrays")


@pytest.mark.mpi(min_size=2)
def test_separate_arrays_split_differently_or_holding_nan_raise_everywhere(rs, shm):
    arrays = separate_arrays(np.float32, seed=1)
    if R == P - 1:                                   # the same elements, cut elsewhere
        arrays = [np.concatenate(arrays[:2]), *arrays[2:]]
    ok = raised_everywhere(lambda: rs.grouped_allreduce_(arrays), rs.MismatchError)
    checker = world().checker
    checker.finite = True
    try:
        arrays = separate_arrays(np.float32, seed=1)
        arrays[4][7] = np.nan if R == P - 1 else 0
        nan_raised = raised_everywhere(lambda: rs.grouped_allreduce_(arrays), FloatingPointError,
                                       f"NaN or Inf in the input on rank {P - 1}")   # (every rank calls)
        ok = ok and nan_raised
    finally:
        checker.finite = False
    assert_everywhere(ok, "a different split or a NaN in separate arrays did not raise everywhere")


@pytest.mark.mpi(min_size=2)
def test_join_while_others_reduce_separate_arrays(rs, shm):
    ok = True
    if R != P - 1:
        arrays = [np.full(n, R + 1.0, np.float32) for n in SEPARATE]
        rs.grouped_allreduce_(arrays, op="sum")
        ok = all(np.all(a == (P - 1) * P / 2) for a in arrays)
    rs.join()
    assert_everywhere(ok, "separate arrays with a joined rank gave the wrong result")

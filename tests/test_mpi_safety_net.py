"""The safety net in every mode: mismatches raise on every rank in passive and barrier timing,
no receive is shorter than what can arrive, settings are compared at init(), float16 needs no
MPI datatype, averages do not overflow, and the agreement check adds at most ceil(log2 p) hops.
"""
import os
import re

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, ringsync_settings

from ringsync.context import world

COMM = MPI.COMM_WORLD
R, P = COMM.rank, COMM.size


def raised_everywhere(call, error=ValueError, match=""):
    """Run call() on every rank; True on this rank if it raised `error` matching `match`."""
    try:
        call()
    except error as exc:
        return re.search(match, str(exc)) is not None
    return False


def world_still_works(rs):
    x = np.arange(7, dtype=np.float64) + R
    assert_everywhere(np.array_equal(rs.allreduce(x), np.arange(7) * P + P * (P - 1) / 2),
                      "allreduce after a mismatch")


def read_only_on_rank_1():
    x = np.ones(5)
    x.flags.writeable = R != 1
    return x


# Each makes ranks disagree in one way; every rank must raise (ValueError or MismatchError).
MISMATCHES = {
    "size": lambda rs: rs.allreduce(np.ones(4 + (R == P - 1))),
    "size across the small limit": lambda rs: rs.allreduce(np.ones(4096 + 8 * (R == P - 1), np.float32)),
    "large vs small": lambda rs: rs.allreduce(np.ones(70_000 if R == 0 else 4_000, np.uint8)),
    "dtype": lambda rs: rs.allreduce(np.ones(64, np.float32 if R == 1 else np.float64)),
    "shape": lambda rs: rs.allreduce(np.ones((3, 2) if R == 0 else (2, 3))),
    "op": lambda rs: rs.allreduce(np.ones(10), op="max" if R == P - 1 else "sum"),
    "op, large": lambda rs: rs.allreduce(np.ones(100_000, np.float32), op="max" if R == 0 else "sum"),
    "tensor count": lambda rs: rs.grouped_allreduce_([np.ones(4), np.ones(4)] if R == 0 else [np.ones(8)]),
    "call order": lambda rs: rs.allreduce(np.ones(3), name="w" if R == 0 else "b"),
    "collective": lambda rs: rs.broadcast(np.ones(3)) if R == 1 else rs.allreduce(np.ones(3)),
    "broadcast root": lambda rs: rs.broadcast(np.ones(4), root=R % 2),
    "refused arguments": lambda rs: rs.allreduce_(read_only_on_rank_1()),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["passive", "barrier"])
@pytest.mark.parametrize("mismatch", list(MISMATCHES))
def test_every_mismatch_raises_on_every_rank_in_every_timing_mode(rs, mode, mismatch):
    # In barrier mode the probe's barrier runs inside a timed step, just before the step's
    # first collective: the mismatched call is that first collective.
    rs.timing.start(mode, every=0)
    try:
        rs.timing.begin_step()
        ok = raised_everywhere(lambda: MISMATCHES[mismatch](rs))
        rs.timing.end_step()
    finally:
        rs.timing.finish()
    assert_everywhere(ok, f"{mismatch} in {mode} mode did not raise on rank {R}")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["passive", "barrier"])
def test_nonfinite_input_raises_on_every_rank_in_every_timing_mode(rs, mode):
    checker = world().checker
    checker.finite = True
    rs.timing.start(mode, every=0)
    try:
        rs.timing.begin_step()
        x = np.ones(8, dtype=np.float32)
        x[3] = np.nan if R == P - 1 else 1.0
        ok = raised_everywhere(lambda: rs.allreduce(x), FloatingPointError, f"on rank {P - 1}")
        rs.timing.end_step()
    finally:
        rs.timing.finish()
        checker.finite = False
    assert_everywhere(ok, f"NaN on rank {P - 1} not reported in {mode} mode")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["passive", "barrier"])
def test_join_in_every_timing_mode(rs, mode):
    rs.timing.start(mode, every=0)
    got = None
    try:
        rs.timing.begin_step()
        if R == 0:          # rank 0 has no work: it joins at once
            rs.join()
            rs.timing.end_step()
        else:
            got = rs.allreduce(np.full(3, float(R)))
            rs.timing.end_step()
            rs.join()
    finally:
        rs.timing.finish()
    want = np.full(3, float(sum(range(1, P))))
    assert_everywhere(R == 0 or np.array_equal(got, want), f"rank {R} got {got} with rank 0 joined")


# --- calls whose signatures collide in a tag-sized hash --------------------------------------

def colliding_names(tries=100_000):
    """Two names for which (allreduce, sum, float64, (16,), name_a) and (allreduce, max,
    float64, (16,), name_b) hash to the same value modulo this MPI's tag space, as a check
    that folds the signature into the MPI tag would see them: a birthday search."""
    space = (COMM.Get_attr(MPI.TAG_UB) - 2) // 2
    import zlib

    def signature_hash(op_code, name):
        return hash((1, op_code, 3, (16,), -1, 1, 0, zlib.crc32(name.encode()) + 1)) % space

    seen = {signature_hash(4, f"a{i}"): f"a{i}" for i in range(tries)}     # op codes: max 2, sum 4
    for i in range(tries):
        other = seen.get(signature_hash(2, f"b{i}"))
        if other is not None:
            return other, f"b{i}"
    return None


@pytest.mark.mpi(min_size=2)
def test_signatures_that_collide_in_a_tag_sized_hash_still_raise_on_every_rank(rs):
    names = colliding_names()
    assert names is not None
    op, name = ("sum", names[0]) if R == 0 else ("max", names[1])
    x = np.arange(16, dtype=np.float64) + R
    before = x.copy()
    ok = raised_everywhere(lambda: rs.allreduce_(x, op=op, name=name), rs.MismatchError, "op differs")
    assert_everywhere(ok and np.array_equal(x, before), f"rank {R}: colliding calls went through")
    world_still_works(rs)


# --- no receive shorter than what can arrive -----------------------------------------------

@pytest.mark.mpi(min_size=2)
def test_opening_receives_have_room_for_the_largest_block_any_rank_sends(rs):
    from ringsync.agreement import TRAILER_BYTES

    checker = world().checker
    largest = checker.capacity                   # payload limit + trailer, the same everywhere
    ok = True
    for nbytes in (0, 8, 4096, checker.payload_limit):
        step = ((nbytes + 7) & ~7) + TRAILER_BYTES
        for send, _, recv, _, expected in checker._plan(step):
            count = expected // step
            ok = ok and recv.nbytes >= count * largest and send.nbytes == expected
            ok = ok and recv.obj is checker.blocks and (
                np.frombuffer(recv, np.uint8).ctypes.data + recv.nbytes
                <= checker.blocks.ctypes.data + checker.blocks.nbytes)
    assert_everywhere(ok, "an opening receive is shorter than a block another rank may send")


# --- settings that change what a rank sends are compared at init() ---------------------------

SKEWED = {
    "RINGSYNC_ALLREDUCE": ("ring", "auto"),
    "RINGSYNC_SMALL_BYTES": ("1024", "16384"),
    "RINGSYNC_SEGMENT_BYTES": ("4096", "524288"),
    "RINGSYNC_CHECK_AGREEMENT": ("0", "1"),
    "RINGSYNC_CHECK_FINITE": ("1", "0"),
    "RINGSYNC_FUSION_THRESHOLD": ("0", "67108864"),
    "RINGSYNC_TIMING": ("barrier", "passive"),
    "RINGSYNC_TIMING_EVERY": ("3", "1000"),
    "RINGSYNC_CUDA_AWARE": ("1", "auto"),
    "RINGSYNC_STAGING_SEGMENT": ("4096", "1048576"),
}


def reinit_with(rs, name, value):
    """init() under `name=value` on this rank; True if it raised ValueError naming the variable."""
    saved = os.environ.get(name)
    os.environ[name] = value
    rs.shutdown()
    try:
        rs.init()
        message = ""
    except ValueError as exc:
        message = str(exc)
    finally:
        os.environ.pop(name) if saved is None else os.environ.__setitem__(name, saved)
    rs.shutdown()
    rs.init()
    return message


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", list(SKEWED))
def test_settings_that_differ_across_ranks_raise_on_every_rank(rs, name):
    odd, usual = SKEWED[name]
    message = reinit_with(rs, name, odd if R == 0 else usual)
    others = "rank 1" if P == 2 else f"ranks {', '.join(map(str, range(1, P)))}"
    shown = {"0": "false", "1": "true"} if name.startswith("RINGSYNC_CHECK_") else {}   # as read
    want = f"{name}: '{shown.get(odd, odd)}' on rank 0; '{shown.get(usual, usual)}' on {others}"
    assert_everywhere(want in message, f"rank {R}: {message!r}")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_a_malformed_setting_on_one_rank_raises_on_every_rank(rs):
    message = reinit_with(rs, "RINGSYNC_SMALL_BYTES", "lots" if R == P - 1 else "16384")
    assert_everywhere(f"rank {P - 1}: RINGSYNC_SMALL_BYTES must be a whole number" in message, message)
    world_still_works(rs)


# --- float16 needs no MPI datatype --------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["auto", "doubling", "ring", "pipelined"])
def test_float16_without_an_mpi_float16_datatype(rs, algorithm):
    # Some MPIs have no float16 datatype (mpi4py then cannot map 'e'): ringsync sends bytes.
    removed = MPI._typedict.pop("e", None)
    try:
        with ringsync_settings(RINGSYNC_ALLREDUCE=algorithm, RINGSYNC_SEGMENT_BYTES="64"):
            failures = []
            for n in (1, 3, 1000, 100_000):
                base = np.arange(n) % 7
                x = (base + R).astype(np.float16)
                want = (base * P + P * (P - 1) // 2).astype(np.float16)
                gathered = np.concatenate([base + q for q in range(P)]).astype(np.float16)
                got = (rs.allreduce(x), rs.broadcast(x, root=0), rs.allgather(x))   # every rank calls all three
                if not (np.array_equal(got[0], want) and np.array_equal(got[1], base.astype(np.float16))
                        and np.array_equal(got[2], gathered)):
                    failures.append(n)
    finally:
        if removed is not None:
            MPI._typedict["e"] = removed
    assert_everywhere(not failures, f"float16 {algorithm}: wrong for lengths {failures}")


# --- averages of in-range values stay in range -------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["auto", "ring"])
def test_averages_do_not_overflow(rs, algorithm):
    cases = {
        np.float16: (40000.0, 40000.0),
        np.float32: (3e38, 3e38),
        np.int8: (100, 100),
        np.uint8: (250, 250),
        np.int16: (-32000, -32000),
        np.int64: (2**62 + 3, 2**62 + 3),
        np.uint64: (2**63 + 5, 2**63 + 5),
    }
    failures = []
    with ringsync_settings(RINGSYNC_ALLREDUCE=algorithm):
        for dtype, (value, want) in cases.items():
            got = rs.allreduce(np.full(5, value, dtype=dtype), op="average")
            if got.dtype != np.dtype(dtype) or not np.array_equal(got, np.full(5, want, dtype=dtype)):
                failures.append(f"{np.dtype(dtype).name}: {got[:2]}")
        # The floor of the exact mean, on every rank alike: ranks hold 0..P-1 plus a big offset.
        offset = np.int64(2**62)
        got = rs.allreduce(np.full(3, offset + R, dtype=np.int64), op="average")
        if not np.array_equal(got, np.full(3, offset + (P - 1) // 2, dtype=np.int64)):
            failures.append(f"int64 mean of offset+rank: {got}")
    assert_everywhere(not failures, f"{algorithm}: {failures}")


# --- grouped calls: a FlatBuffer's views and a list of them agree ----------------------------

@pytest.mark.mpi
def test_flatbuffer_views_and_a_list_of_them_are_the_same_call(rs):
    fb = rs.FlatBuffer([(40,), (3, 5), (100,), (7,)], np.float32)
    for i, v in enumerate(fb.views):
        v[...] = i + R
    views = fb.views if R == 0 else list(fb.views)
    rs.grouped_allreduce_(views, fusion_bytes=200)          # several buckets
    ok = all(np.all(v == P * i + P * (P - 1) / 2) for i, v in enumerate(fb.views))
    assert_everywhere(ok, "views vs list of views")


# --- the agreement check adds at most ceil(log2 p) hops ------------------------------------

class CountingComm:
    """A communicator that counts the messages this rank sends (every other call passes)."""

    SENDS = ("Sendrecv", "Send", "Isend")

    def __init__(self, comm):
        self._comm, self.sent = comm, 0

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name not in self.SENDS:
            return attr

        def counted(*args, **kwargs):
            self.sent += 1
            return attr(*args, **kwargs)
        return counted


def messages_sent(rs, call):
    """How many messages this rank sends during call()."""
    w = world()
    real, counting = w.comm, CountingComm(w.comm)
    w.comm = w.checker.comm = counting
    try:
        call()
    finally:
        w.comm = w.checker.comm = real
    return counting.sent


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("nbytes", [4096, 1 << 20])
def test_the_check_costs_at_most_ceil_log2_p_extra_hops(rs, nbytes):
    x = np.ones(nbytes // 4, dtype=np.float32)
    with ringsync_settings(RINGSYNC_TRANSPORT="p2p"):
        checker = world().checker
        on = messages_sent(rs, lambda: rs.allreduce_(x))
        checker.enabled = False
        try:
            off = messages_sent(rs, lambda: rs.allreduce_(x))
        finally:
            checker.enabled = True
    extra = on - off
    limit = (P - 1).bit_length()             # ceil(log2 p)
    assert_everywhere(extra <= limit, f"{nbytes} B: {on} messages with the check, {off} without")
    if nbytes == 4096:                        # the small all-reduce rides on the opening alone
        assert_everywhere(on == limit, f"4 KB: {on} messages, want {limit}")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("nbytes", [4096, 1 << 20])
def test_on_shared_memory_the_check_costs_one_sync_point_and_no_message(rs, nbytes):
    x = np.ones(nbytes // 4, dtype=np.float32)
    with ringsync_settings(RINGSYNC_TRANSPORT="shm"):
        checker, seg = world().checker, world().node

        def syncs(call) -> tuple[int, int]:
            before = seg.stage
            sent = messages_sent(rs, call)
            return sent, seg.stage - before

        on = syncs(lambda: rs.allreduce_(x))
        checker.enabled = False
        try:
            off = syncs(lambda: rs.allreduce_(x))
        finally:
            checker.enabled = True
    assert_everywhere(on[0] == off[0] == 0, f"{nbytes} B: messages sent {on[0]} / {off[0]}")
    assert_everywhere(on[1] - off[1] <= 1, f"{nbytes} B: {on[1]} sync points with the check, {off[1]} without")
    if nbytes == 4096:                        # the small all-reduce rides on the opening alone
        assert_everywhere(on[1] == 1, f"4 KB: {on[1]} sync points, want 1")


@pytest.mark.mpi
def test_small_buffers_above_the_opening_payload_limit(rs):
    # RINGSYNC_SMALL_BYTES beyond what an opening carries: such buffers open with the trailer
    # alone, then run recursive doubling; mismatches still raise everywhere.
    with ringsync_settings(RINGSYNC_SMALL_BYTES=str(1 << 20), RINGSYNC_TRANSPORT="p2p"):
        assert_everywhere(world().checker.payload_limit < (1 << 20))
        x = np.full(100_000, R + 1, dtype=np.float32)          # 400 KB
        assert_everywhere(np.array_equal(rs.allreduce(x), np.full(100_000, P * (P + 1) / 2, np.float32)))
        if P > 1:
            n = 100_000 + (R == P - 1)
            ok = raised_everywhere(lambda: rs.allreduce(np.ones(n, np.float32)), rs.MismatchError)
            assert_everywhere(ok, "a mismatch above the payload limit went through")

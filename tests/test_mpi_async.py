"""The asynchronous API (ringsync/handles.py): allreduce_async_, allreduce_async,
grouped_allreduce_async_, poll and synchronize, on every rank count.

Every test ends with each rank's handles synchronized (shutdown() refuses otherwise, and
other files re-initialize ringsync), and every verdict goes through assert_everywhere.
"""
import re
import sys
import threading
import types

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, ringsync_settings, same_bits_everywhere

COMM = MPI.COMM_WORLD
R, P = COMM.rank, COMM.size
MB = 1 << 20


def rank_data(shape, dtype, seed):
    """This rank's input: random, different on every rank and for every seed."""
    rng = np.random.default_rng([seed, R])
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(-1000, 1000, size=shape).astype(dtype)


def outcome(call):
    """(the exception type's name, its message), or ("ok", result) when call() returns."""
    try:
        return "ok", call()
    except Exception as exc:  # noqa: BLE001 - the test compares what every rank got
        return type(exc).__name__, str(exc)


def drain(rs, handles):
    """Synchronize every handle not yet used, whatever it holds (a test's clean-up)."""
    for h in handles:
        if isinstance(h, rs.Handle) and not h.used:
            outcome(lambda h=h: rs.synchronize(h))     # its error was what the test checked, or is moot


def world_still_works(rs):
    x = np.arange(7, dtype=np.float64) + R
    expected = np.arange(7) * P + P * (P - 1) / 2
    ok = np.array_equal(rs.allreduce(x), expected)
    y = np.arange(7, dtype=np.float64) + R
    ok = ok and rs.synchronize(rs.allreduce_async_(y)) is y and np.array_equal(y, expected)
    assert_everywhere(ok, "the world after the test: a blocking and an asynchronous all-reduce")
    assert_everywhere(rs.context.world().comm_thread.broken is None, "the thread is out of step")


# --- 1. the handle API --------------------------------------------------------------------------

SHAPES = [(0,), (1,), (5, 3), (300_000,)]      # empty, one element, 2-D, 1.2-2.4 MB (the ring)


@pytest.mark.mpi
@pytest.mark.parametrize("dtype, op", [("float32", "sum"), ("float64", "average"), ("float32", "max"),
                                       ("int32", "min"), ("int64", "average")])
def test_results_are_the_blocking_calls_bits_on_every_rank(rs, dtype, op):
    problems = []
    for seed, shape in enumerate(SHAPES):
        x = rank_data(shape, dtype, seed)
        inplace, original = x.copy(), x.copy()
        strided = np.repeat(x.reshape(-1), 2)[::2].reshape(shape)       # not contiguous
        h1 = rs.allreduce_async_(inplace, op=op, name=f"t{seed}")
        h2 = rs.allreduce_async(strided, op=op, name=f"u{seed}")
        h3 = rs.allreduce_async(x.tolist(), op=op)                       # any array-like
        got1, got2, got3 = rs.synchronize(h1), rs.synchronize(h2), rs.synchronize(h3)
        want_inplace = rs.allreduce_(x.copy(), op=op, name=f"t{seed}")
        want = rs.allreduce(strided, op=op, name=f"u{seed}")
        want3 = rs.allreduce(x.tolist(), op=op)
        if got1 is not inplace:
            problems.append(f"{shape}: allreduce_async_ returned another object than its input")
        if not (type(got2) is np.ndarray and got2.shape == x.shape and got2.dtype == x.dtype
                and got2.flags.c_contiguous and not np.shares_memory(got2, strided)):
            problems.append(f"{shape}: allreduce_async returned {type(got2).__name__} "
                            f"{getattr(got2, 'shape', None)} {getattr(got2, 'dtype', None)}")
        if not (np.array_equal(x, original) and np.array_equal(strided, original)):
            problems.append(f"{shape}: allreduce_async changed its input")
        if inplace.tobytes() != want_inplace.tobytes():
            problems.append(f"{shape}: allreduce_async_ != allreduce_")
        if got2.tobytes() != want.tobytes():
            problems.append(f"{shape}: allreduce_async != allreduce")
        if got3.shape != x.shape or got3.dtype != want3.dtype or got3.tobytes() != want3.tobytes():
            problems.append(f"{shape}: allreduce_async of a list != allreduce")
        if not (same_bits_everywhere(inplace) and same_bits_everywhere(got2)):
            problems.append(f"{shape}: the ranks' results differ")
    assert_everywhere(not problems, f"rank {R}: {problems}")


@pytest.mark.mpi
@pytest.mark.parametrize("fusion_bytes", [None, 64])
def test_grouped_async_returns_its_arrays_reduced_as_grouped_allreduce_(rs, fusion_bytes):
    shapes = [((3, 4), "float32"), ((100_000,), "float64"), ((0,), "float32"), ((7,), "int64"),
              ((2, 2, 2), "float64")]
    arrays = [rank_data(shape, dtype, seed=40 + i) for i, (shape, dtype) in enumerate(shapes)]
    copies = [a.copy() for a in arrays]
    h = rs.grouped_allreduce_async_(arrays, op="sum", fusion_bytes=fusion_bytes)
    got = rs.synchronize(h)
    want = rs.grouped_allreduce_(copies, op="sum", fusion_bytes=fusion_bytes)
    ok = isinstance(got, list) and len(got) == len(arrays) and all(g is a for g, a in zip(got, arrays))
    ok = ok and all(a.tobytes() == w.tobytes() and a.dtype == w.dtype for a, w in zip(arrays, want))
    ok = ok and all(same_bits_everywhere(a) for a in arrays)
    exact = [a.copy() for a in arrays[3:4]]                       # integers: the exact sum
    assert_everywhere(ok, f"rank {R}: grouped_allreduce_async_ differs from grouped_allreduce_")
    total = sum(COMM.allgather(rank_data((7,), "int64", seed=43)))
    assert_everywhere(np.array_equal(exact[0], total), "the int64 member of the group")


@pytest.mark.mpi
def test_poll_never_waits_and_is_true_once_done(rs):
    # Rank 0 submits first and polls while the others cannot have submitted yet (they are
    # held at an MPI barrier that rank 0 reaches only after its poll): the call cannot be
    # done on 2+ ranks, so poll must say False, and say it at once. (A poll that waited
    # would return only once the others submit: reported, never a hang.)
    x = np.full(1000, float(R + 1))
    h, polled = None, []
    if R == 0:
        h = rs.allreduce_async_(x)
        poller = threading.Thread(target=lambda: polled.append(rs.poll(h)), daemon=True)
        poller.start()
        poller.join(60)         # only a broken poll ever takes this long
    COMM.Barrier()
    if R != 0:
        h = rs.allreduce_async_(x)
    rs.barrier()                # a blocking call runs after the asynchronous calls in flight ...
    done = rs.poll(h)           # ... so this one is finished now
    again = rs.poll(h)
    result = rs.synchronize(h)
    if R == 0:
        poller.join()
    assert_everywhere(R != 0 or P == 1 or polled == [False], f"rank 0 polled {polled} before the others submitted")
    assert_everywhere(done is True and again is True, f"poll after a barrier: {done}, {again}")
    assert_everywhere(result is x and np.array_equal(x, np.full(1000, P * (P + 1) / 2)))


@pytest.mark.mpi
def test_a_handle_is_used_once(rs):
    x = np.ones(4)
    h = rs.allreduce_async_(x)
    first = outcome(lambda: rs.synchronize(h))
    second = outcome(lambda: rs.synchronize(h))
    polled = outcome(lambda: rs.poll(h))
    assert_everywhere(first[0] == "ok" and first[1] is x and np.array_equal(x, np.full(4, P)), str(first))
    pattern = re.compile(r"already synchronized; each handle is used once")
    assert_everywhere(second[0] == "ValueError" and pattern.search(second[1]) is not None, str(second))
    assert_everywhere(polled[0] == "ValueError" and pattern.search(polled[1]) is not None, str(polled))
    assert_everywhere("synchronized" in repr(h), repr(h))


@pytest.mark.mpi
@pytest.mark.parametrize("thing", [None, 3, "handle", object()])
def test_a_non_handle_raises_type_error(rs, thing):
    got = [outcome(lambda: rs.synchronize(thing)), outcome(lambda: rs.poll(thing))]
    assert_everywhere(all(kind == "TypeError" and "handle must be a ringsync Handle" in text
                          for kind, text in got), str(got))


@pytest.mark.mpi
def test_a_handle_from_before_shutdown_and_init_raises_value_error(rs):
    x = np.ones(3)
    h = rs.allreduce_async_(x)
    rs.synchronize(h)
    old = h.owner
    rs.shutdown()
    rs.init()
    # The only handles shutdown() lets through are synchronized ones ...
    used = [outcome(lambda: rs.poll(h)), outcome(lambda: rs.synchronize(h))]
    # ... and one that was not would belong to the stopped thread: refused as well.
    stale = rs.Handle(h.number + 1, "allreduce_async_", None, old)
    stale.done = True                   # (so that a missing check fails here instead of waiting)
    stale_got = [outcome(lambda: rs.poll(stale)), outcome(lambda: rs.synchronize(stale))]
    assert_everywhere(all(kind == "ValueError" for kind, _ in used), str(used))
    assert_everywhere(all(kind == "ValueError" and "has been shut down" in text for kind, text in stale_got),
                      str(stale_got))
    assert_everywhere(not old.thread.is_alive(), "the old communication thread still runs")
    world_still_works(rs)


def bad_call(rs, case):
    """(a call whose arguments are wrong, the error and message it must raise at submission,
    and the matching call with good arguments)."""
    good = np.ones(6)
    readonly = np.ones(6)
    readonly.flags.writeable = False
    strided = np.ones(12)[::2]
    cases = {
        "read-only": (lambda: rs.allreduce_async_(readonly), ValueError, "x is read-only",
                      lambda: rs.allreduce_async_(good)),
        "not contiguous": (lambda: rs.allreduce_async_(strided), ValueError, "not C-contiguous",
                           lambda: rs.allreduce_async_(good)),
        "not an array": (lambda: rs.allreduce_async_([1.0] * 6), TypeError, "must be a numpy.ndarray",
                         lambda: rs.allreduce_async_(good)),
        "bad op": (lambda: rs.allreduce_async_(good, op="mean"), ValueError, "op must be one of",
                   lambda: rs.allreduce_async_(good)),
        "bad name": (lambda: rs.allreduce_async_(good, name=7), TypeError, "name must be a str",
                     lambda: rs.allreduce_async_(good, name="7")),
        "bad dtype": (lambda: rs.allreduce_async_(np.ones(6, dtype=complex)), TypeError, "complex",
                      lambda: rs.allreduce_async_(good)),
        "out of place, bad op": (lambda: rs.allreduce_async(good, op=None), ValueError, "op must be one of",
                                 lambda: rs.allreduce_async(good)),
        "out of place, bad name": (lambda: rs.allreduce_async(good, name=b"w"), TypeError, "name must be a str",
                                   lambda: rs.allreduce_async(good, name="w")),
        "out of place, bad dtype": (lambda: rs.allreduce_async(np.array(["a"] * 6)), TypeError, "dtype",
                                    lambda: rs.allreduce_async(good)),
        "grouped, read-only member": (lambda: rs.grouped_allreduce_async_([good, readonly]), ValueError,
                                      r"arrays\[1\] is read-only",
                                      lambda: rs.grouped_allreduce_async_([good, np.ones(6)])),
        "grouped, not a list": (lambda: rs.grouped_allreduce_async_(good), TypeError, "list or tuple",
                                lambda: rs.grouped_allreduce_async_([good])),
        "grouped, bad op": (lambda: rs.grouped_allreduce_async_([good], op="prod"), ValueError,
                            "op must be one of", lambda: rs.grouped_allreduce_async_([good])),
    }
    return cases[case], good


@pytest.mark.mpi
@pytest.mark.parametrize("who", ["last rank", "every rank"])
@pytest.mark.parametrize("case", ["read-only", "not contiguous", "not an array", "bad op", "bad name",
                                  "bad dtype", "out of place, bad op", "out of place, bad name",
                                  "out of place, bad dtype", "grouped, read-only member",
                                  "grouped, not a list", "grouped, bad op"])
def test_bad_arguments_raise_at_submission_and_fail_the_others_call(rs, case, who):
    (bad, error, says, fine), good = bad_call(rs, case)
    before = np.full(50_000, float(R + 1))          # a call in flight before the bad one
    h0 = rs.allreduce_async_(before)
    wrong = who == "every rank" or R == P - 1
    handles = [h0]
    try:
        if wrong:
            got = outcome(bad)
            ok = got[0] == error.__name__ and re.search(says, got[1]) is not None
        else:
            h = fine()
            handles.append(h)
            got = outcome(lambda: rs.synchronize(h))
            ok = got[0] == "MismatchError" and re.search(
                rf"refused because of invalid arguments \({error.__name__} on rank {P - 1}; see the error there\)",
                got[1]) is not None
            ok = ok and np.array_equal(good, np.ones(6))     # nothing written before the verdict
        first = rs.synchronize(h0)
    finally:
        drain(rs, handles)
    assert_everywhere(ok, f"rank {R}: {got}")
    assert_everywhere(first is before and np.array_equal(before, np.full(50_000, P * (P + 1) / 2)),
                      "the call submitted before the refused one")
    world_still_works(rs)


class _FakeDeviceArray(np.ndarray):
    """A NumPy array posing as a CuPy one (gpu.array_module looks at sys.modules['cupy'])."""


@pytest.mark.mpi
@pytest.mark.parametrize("call", ["allreduce_async_", "allreduce_async", "grouped_allreduce_async_"])
def test_device_arrays_are_refused(rs, call, monkeypatch):
    fake = types.ModuleType("cupy")
    fake.ndarray = _FakeDeviceArray
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "cupy", fake)
        got, ok = device_array_refused(rs, call)
    assert_everywhere(ok, f"rank {R}: {got}")
    world_still_works(rs)


def device_array_refused(rs, call):
    host = np.ones(8)
    device = np.ones(8).view(_FakeDeviceArray) if R == P - 1 else np.ones(8)
    submit = {"allreduce_async_": lambda a: rs.allreduce_async_(a),
              "allreduce_async": lambda a: rs.allreduce_async(a),
              "grouped_allreduce_async_": lambda a: rs.grouped_allreduce_async_([host, a])}[call]
    got = outcome(lambda: submit(device))
    handles = [got[1]] if got[0] == "ok" else []
    try:
        if R == P - 1:
            ok = got[0] == "TypeError" and "takes host (NumPy) arrays" in got[1]
        else:
            got = outcome(lambda: rs.synchronize(handles[0])) if handles else got
            ok = got[0] == "MismatchError" and f"TypeError on rank {P - 1}" in got[1]
    finally:
        drain(rs, handles)
    return got, ok


# --- 2. ranks that submit in different orders ---------------------------------------------------

@pytest.mark.mpi(min_size=2)
def test_mismatched_submission_order_raises_on_every_rank(rs):
    a, b = np.full(4, float(R)), np.full(5, float(R))
    first, second = (a, b) if R == 0 else (b, a)
    h1, h2 = rs.allreduce_async_(first), rs.allreduce_async_(second)
    got = [outcome(lambda: rs.synchronize(h1)), outcome(lambda: rs.synchronize(h2))]
    ok = all(kind == "MismatchError" and "shape differs" in text for kind, text in got)
    msg = got[0][1]
    assert_everywhere(ok, f"rank {R}: {got}")
    assert_everywhere("(4,) on rank 0" in msg and "(5,) on rank" in msg, msg)
    assert_everywhere(np.array_equal(a, np.full(4, float(R))) and np.array_equal(b, np.full(5, float(R))),
                      "a refused in-place call changed its buffer")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_names_submitted_in_another_order_raise_on_every_rank(rs):
    w, b = np.ones(16), np.ones(16)
    names = ["w", "b"] if R == 0 else ["b", "w"]
    handles = [rs.allreduce_async_(w, name=names[0]), rs.allreduce_async_(b, name=names[1])]
    got = [outcome(lambda h=h: rs.synchronize(h)) for h in handles]
    assert_everywhere(all(kind == "MismatchError" and "name differs" in text for kind, text in got), str(got))
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("next_call", ["barrier", "allreduce", "allreduce_async_"])
def test_a_surplus_async_call_meets_the_others_next_call(rs, next_call):
    # Rank 0 submits one call the others do not make: it meets their next collective.
    calls = {"barrier": rs.barrier,
             "allreduce": lambda: rs.allreduce(np.ones(3)),
             "allreduce_async_": lambda: rs.synchronize(rs.allreduce_async_(np.ones(3)))}
    handles = []
    try:
        if R == 0:
            handles.append(rs.allreduce_async_(np.ones(9), name="surplus"))
            got = outcome(lambda: rs.synchronize(handles[0]))
        else:
            got = outcome(calls[next_call])
        ok = got[0] == "MismatchError" and ("name differs" in got[1] or "shape differs" in got[1]
                                            or "collective differs" in got[1])
        # Then they are in step again: the same next call on every rank works.
        again = outcome(calls[next_call])
    finally:
        drain(rs, handles)
    assert_everywhere(ok, f"rank {R}: {got}")
    assert_everywhere(again[0] == "ok", f"rank {R}: {again}")
    world_still_works(rs)


# --- 3. blocking calls queued behind asynchronous ones -------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("blocking", ["allreduce", "allreduce_", "grouped_allreduce_", "broadcast",
                                      "allgather", "barrier"])
def test_a_blocking_call_runs_after_the_calls_in_flight(rs, blocking):
    sizes = [3 * MB // 8, 7, 4 * MB // 8, 1000]          # float64: 3 MB, tiny, 4 MB, 8 KB
    inputs = [np.arange(n, dtype=np.float64) + 1000 * i + R for i, n in enumerate(sizes)]
    handles = [rs.allreduce_async_(x, name=f"g{i}") for i, x in enumerate(inputs)]
    # At once, with all four in flight: a blocking call with values of its own.
    mine = np.full(1000, 7.0 * (R + 1))
    got = {"allreduce": lambda: rs.allreduce(mine),
           "allreduce_": lambda: rs.allreduce_(mine.copy()),
           "grouped_allreduce_": lambda: rs.grouped_allreduce_([mine.copy()])[0],
           "broadcast": lambda: rs.broadcast(mine, root=P - 1),
           "allgather": lambda: rs.allgather(mine.reshape(1, -1)),
           "barrier": lambda: rs.barrier()}[blocking]()
    finished = [rs.poll(h) for h in handles]          # it ran after them: all done already
    results = [rs.synchronize(h) for h in handles]
    want = {"allreduce": np.full(1000, 7.0 * P * (P + 1) / 2),
            "broadcast": np.full(1000, 7.0 * P),
            "allgather": np.repeat(7.0 * np.arange(1, P + 1), 1000).reshape(P, 1000)}
    want["allreduce_"] = want["grouped_allreduce_"] = want["allreduce"]
    ok_blocking = got is None if blocking == "barrier" else np.array_equal(got, want[blocking])
    ok_async = all(r is x and np.array_equal(x, (np.arange(n) + 1000 * i) * P + P * (P - 1) / 2)
                   for i, (r, x, n) in enumerate(zip(results, inputs, sizes)))
    assert_everywhere(all(finished), f"rank {R}: not finished when the {blocking} returned: {finished}")
    assert_everywhere(ok_blocking, f"rank {R}: the blocking {blocking} gave {got}")
    assert_everywhere(ok_async, f"rank {R}: an asynchronous result is wrong")


@pytest.mark.mpi
def test_a_blocking_call_with_nothing_in_flight(rs):
    x = np.full(5, float(R))
    rs.synchronize(rs.allreduce_async_(x))           # the thread is started, then idle
    thread = rs.context.world().comm_thread
    ok = thread is not None and thread.pending == 0 and not thread.live
    submitted = thread.submitted
    y = rs.allreduce(np.full(5, float(R + 1)))
    z = rs.broadcast(np.full(2, float(R)), root=0)
    rs.barrier()
    ok = ok and np.array_equal(y, np.full(5, P * (P + 1) / 2)) and np.array_equal(z, np.zeros(2))
    ok = ok and np.array_equal(x, np.full(5, P * (P - 1) / 2)) and thread.submitted == submitted
    assert_everywhere(ok, f"rank {R}: blocking calls with an idle communication thread")


# --- 4. shutdown() with handles not synchronized -------------------------------------------------

def init_again(rs):
    """The rs fixture's state for the next test: initialized, whatever happened."""
    if not rs.is_initialized():
        rs.init()


@pytest.mark.mpi
def test_shutdown_with_handles_on_every_rank_raises_and_can_be_retried(rs):
    x = np.full(10, float(R))
    h = rs.allreduce_async_(x)
    try:
        refused = outcome(rs.shutdown)
        still = rs.is_initialized()
        value = outcome(lambda: rs.synchronize(h))
        retried = outcome(rs.shutdown)
        down = not rs.is_initialized()
    finally:
        drain(rs, [h])
        init_again(rs)
    assert_everywhere(refused[0] == "RuntimeError" and "1 asynchronous handle(s) not synchronized" in refused[1]
                      and "synchronize() every handle before shutdown()" in refused[1], f"rank {R}: {refused}")
    assert_everywhere(still, "shutdown() that raised left ringsync shut down")
    assert_everywhere(value[0] == "ok" and np.array_equal(x, np.full(10, P * (P - 1) / 2)), str(value))
    assert_everywhere(retried[0] == "ok" and down, f"rank {R}: the second shutdown(): {retried}")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_shutdown_with_handles_on_some_ranks_raises_mismatch_everywhere(rs):
    x = np.full(10, float(R))
    h = rs.allreduce_async_(x)
    try:
        if R != 0:
            rs.synchronize(h)           # rank 0 alone forgets its handle
        refused = outcome(rs.shutdown)
        still = rs.is_initialized()
        if R == 0:
            rs.synchronize(h)
        retried = outcome(rs.shutdown)
        down = not rs.is_initialized()
    finally:
        drain(rs, [h])
        init_again(rs)
    assert_everywhere(refused[0] == "MismatchError" and re.search(
        r"name differs: 'shutdown, 1 handle\(s\) unsynchronized' on rank 0 vs 'shutdown'",
        refused[1]) is not None, f"rank {R}: {refused}")
    assert_everywhere(still, "shutdown() that raised left ringsync shut down")
    assert_everywhere(np.array_equal(x, np.full(10, P * (P - 1) / 2)), "the forgotten handle's result")
    assert_everywhere(retried[0] == "ok" and down, f"rank {R}: the second shutdown(): {retried}")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_shutdown_with_a_failed_handle_raises_everywhere(rs):
    h = rs.allreduce_async_(np.ones(3 if R == 0 else 4))          # fails alike on every rank
    try:
        refused = outcome(rs.shutdown)
        still = rs.is_initialized()
        error = outcome(lambda: rs.synchronize(h))
        retried = outcome(rs.shutdown)
        down = not rs.is_initialized()
    finally:
        drain(rs, [h])
        init_again(rs)
    assert_everywhere(refused[0] == "RuntimeError" and "(1 of them failed)" in refused[1],
                      f"rank {R}: {refused}")
    assert_everywhere(still and error[0] == "MismatchError", f"rank {R}: {error}")
    assert_everywhere(retried[0] == "ok" and down, f"rank {R}: the second shutdown(): {retried}")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_shutdown_with_a_failed_handle_on_one_rank_raises_everywhere(rs):
    """Every rank's call failed alike; rank 0 alone leaves its handle unsynchronized: every
    rank's shutdown() raises (none waits for the others for ever)."""
    h = rs.allreduce_async_(np.ones(3 if R == 0 else 4))
    try:
        if R != 0:
            outcome(lambda: rs.synchronize(h))
        refused = outcome(rs.shutdown)
        if R == 0:
            outcome(lambda: rs.synchronize(h))
        retried = outcome(rs.shutdown)
    finally:
        drain(rs, [h])
        init_again(rs)
    assert_everywhere(refused[0] == "MismatchError" and "1 failed" in refused[1], f"rank {R}: {refused}")
    assert_everywhere(retried[0] == "ok", f"rank {R}: the second shutdown(): {retried}")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_a_packed_bucket_in_flight_keeps_its_fusion_buffer(rs):
    """grouped_allreduce_async_ of separate arrays packs them into a fusion buffer; a blocking
    grouped_allreduce_ right after packs its own before it waits for the first: the two must
    not share one buffer (small arrays: packed on every transport)."""
    import time
    a = [np.full(50, R + 1.0), np.full(30, 10.0 * (R + 1))]
    b = [np.full(50, 100.0 * (R + 1)), np.full(30, 1000.0 * (R + 1))]
    if R == 1:
        time.sleep(0.2)                 # the others' first call waits in the thread meanwhile
    h = rs.grouped_allreduce_async_(a)
    rs.grouped_allreduce_(b)
    rs.synchronize(h)
    total = P * (P + 1) / 2
    ok = all(np.array_equal(x, np.full(x.size, v * total)) for x, v in zip(a + b, (1, 10, 100, 1000)))
    assert_everywhere(ok, f"rank {R}: {[float(x[0]) for x in a + b]}, expected multiples of {total}")


@pytest.mark.mpi(min_size=2)
def test_a_surplus_async_call_meets_the_others_shutdown(rs):
    handles = []
    try:
        if R == 0:
            handles.append(rs.allreduce_async_(np.ones(9), name="surplus"))
            got = outcome(lambda: rs.synchronize(handles[0]))
        else:
            got = outcome(rs.shutdown)
        still = rs.is_initialized()
        retried = outcome(rs.shutdown)
        down = not rs.is_initialized()
    finally:
        drain(rs, handles)
        init_again(rs)
    assert_everywhere(got[0] == "MismatchError" and "collective differs" in got[1], f"rank {R}: {got}")
    assert_everywhere(still, "a shutdown() that raised left ringsync shut down")
    assert_everywhere(retried[0] == "ok" and down, f"rank {R}: the shutdown() after: {retried}")
    world_still_works(rs)


# --- 5. join() with asynchronous work outstanding ------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("op", ["sum", "average", "max"])
def test_ranks_join_with_async_calls_outstanding(rs, op):
    # Rank r has P - r batches: it submits them all, then joins, its handles still in flight
    # (join() waits for them: the others' matching calls run them); the others go on submitting.
    dtype = np.float64 if op == "average" else np.int64
    grads = [np.full(2000 if step % 2 else 5, R + 1, dtype=dtype) for step in range(P - R)]
    handles = [rs.allreduce_async_(g, op=op, name=f"grad{step}") for step, g in enumerate(grads)]
    last = rs.join()
    results = [rs.synchronize(h) for h in handles]
    ok = True
    for step, (g, r) in enumerate(zip(grads, results)):
        active = np.arange(1, P - step + 1)          # the ranks (+1) that still have batch `step`
        want = {"sum": active.sum(), "average": active.mean(), "max": active.max()}[op]
        ok = ok and r is g and np.allclose(g, want, rtol=1e-12, atol=0)
    assert_everywhere(ok, f"rank {R}: a reduction with joined ranks gave the wrong result")
    assert_everywhere(last == 0, f"join() returned {last}, not rank 0, which joined last")
    world_still_works(rs)


# --- 6. an error raised inside the thread reaches synchronize() ----------------------------------

@pytest.mark.mpi
def test_nan_on_one_rank_raises_floating_point_error_everywhere(rs):
    with ringsync_settings(RINGSYNC_CHECK_FINITE="1"):
        x0 = np.full(5, float(R))
        bad = np.ones(100_000, dtype=np.float32)
        if R == P - 1:
            bad[777] = np.nan
        x2 = np.full(3000, float(R))
        handles = [rs.allreduce_async_(x0), rs.allreduce_async_(bad, name="fc1.weight"),
                   rs.allreduce_async_(x2)]
        try:
            got = [outcome(lambda h=h: rs.synchronize(h)) for h in handles]
            blocking = rs.allreduce(np.ones(4))
            later = rs.synchronize(rs.allreduce_async(np.ones(4)))
        finally:
            drain(rs, handles)
    ok = got[0][0] == "ok" and np.array_equal(x0, np.full(5, P * (P - 1) / 2))
    ok = ok and got[2][0] == "ok" and np.array_equal(x2, np.full(3000, P * (P - 1) / 2))
    assert_everywhere(ok, f"rank {R}: the calls around the bad one: {got[0][0]}, {got[2][0]}")
    assert_everywhere(got[1][0] == "FloatingPointError" and re.search(
        rf"allreduce 'fc1.weight'.*NaN or Inf in the input on rank {P - 1}", got[1][1]) is not None,
        f"rank {R}: {got[1]}")
    expect = np.ones(100_000, dtype=np.float32)
    if R == P - 1:
        expect[777] = np.nan
    assert_everywhere(np.array_equal(bad, expect, equal_nan=True), "the refused buffer was written")
    assert_everywhere(np.array_equal(blocking, np.full(4, P)) and np.array_equal(later, np.full(4, P)),
                      "the calls after the FloatingPointError")
    world_still_works(rs)

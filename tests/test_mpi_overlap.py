"""DistributedOptimizer(overlap=True), buckets="backward", backward_passes_per_step and no_sync()
across ranks (training/overlap.py): overlap on or off gives the same bits, k passes equal one
pass on a k-times larger batch, and every misuse raises on every rank alike."""
import os

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, ringsync_settings, same_bits_everywhere

import ringsync.training.optim as optim_module
from ringsync.context import world
from ringsync.training.compression import Compression, PowerSGD, parse_compression
from ringsync.training.nn import MLP, Params

COMM = MPI.COMM_WORLD
SIZES = [12, 20, 16, 6, 3]           # layers fc0..fc3 of 1040, 1344, 408 and 84 bytes in float32
FIRST_BUCKET = 200                   # bytes: RINGSYNC_FIRST_BUCKET_BYTES in this module
FUSION = 1024                        # bytes: the other buckets' cap
# Backward's buckets (a layer's weight and bias never split): fc3 alone (fc2 would pass the
# first cap), fc2 alone (fc1 would pass the cap), fc1 and fc0 alone (each over the cap).


@pytest.fixture(scope="module")
def small_buckets(rs):
    """ringsync re-initialized with a small first bucket (init() reads it), for the module."""
    with ringsync_settings(RINGSYNC_FIRST_BUCKET_BYTES=str(FIRST_BUCKET)):
        yield rs


def make(rs, dtype=np.float32, momentum=0.9, shared_grads=False, **kwargs):
    """A fresh MLP (the same on every rank) and its DistributedOptimizer."""
    model = MLP(SIZES, seed=7, dtype=dtype, shared_grads=shared_grads)
    kwargs.setdefault("fusion_bytes", FUSION)
    opt = rs.DistributedOptimizer(rs.SGD(model.params, lr=0.05, momentum=momentum), **kwargs)
    return model, opt


def batches(steps, n, seed=0):
    """Different data on every rank: (x, y) per step."""
    rng = np.random.default_rng([seed, COMM.rank])
    return [(rng.standard_normal((n, SIZES[0])), rng.integers(0, SIZES[-1], n)) for _ in range(steps)]


def train(model, opt, data, passes=1, dtype=np.float32):
    """Per step: `passes` backward passes on equal slices of the batch, then step()."""
    for x, y in data:
        part = x.shape[0] // passes
        for k in range(passes):
            model.loss_and_grad(x[k * part:(k + 1) * part].astype(dtype), y[k * part:(k + 1) * part])
        opt.step()
    return model.params.data.copy()


def local_gradients(model, data):
    """This rank's own gradient of each (x, y) at the model's current parameters, from a copy of
    the model that no optimizer listens to (the same arithmetic, bit for bit)."""
    reference = MLP(SIZES, seed=7, dtype=model.params.data.dtype)
    reference.params.data[...] = model.params.data
    out = []
    for x, y in data:
        reference.loss_and_grad(x, y)
        out.append(reference.params.flat_grad.copy())
    return out


def error_of(fn):
    """(exception type name, message) of what fn() raises, or (None, '')."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - compared on every rank
        return type(exc).__name__, str(exc)
    return None, ""


def recorded_calls(monkeypatch):
    """Count optim's all-reduce entry points: blocking buckets, launched buckets, grouped."""
    calls = []
    for name in ("allreduce_fused_", "bucket_allreduce_async_", "grouped_allreduce_"):
        original = getattr(optim_module, name)

        def wrapped(*args, _name=name, _original=original, **kwargs):
            calls.append((_name, args[0]))
            return _original(*args, **kwargs)
        monkeypatch.setattr(optim_module, name, wrapped)
    return calls


# --- overlap on or off: the same bits ---------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("shared_grads", [False, True])
def test_overlap_on_and_off_give_the_same_bits(small_buckets, monkeypatch, shared_grads):
    rs = small_buckets
    assert_everywhere(world().settings.first_bucket_bytes == FIRST_BUCKET, "the setting did not reach init()")
    data = batches(4, 8)
    on, opt_on = make(rs, overlap=True, shared_grads=shared_grads)
    off, opt_off = make(rs, buckets="backward", shared_grads=shared_grads)
    fused, opt_fused = make(rs, shared_grads=shared_grads)
    plan = opt_on.bucket_plan()
    flat, o = on.params.flat_grad, on.params.offsets
    sizes = [(hi - lo) * flat.itemsize for lo, hi in plan]
    ok = (plan == [(o[6], o[8]), (o[4], o[6]), (o[2], o[4]), (0, o[2])] and plan == opt_off.bucket_plan()
          and sizes[0] <= FIRST_BUCKET < sizes[0] + sizes[1] <= FUSION
          and opt_on.buckets == opt_off.buckets == "backward" and opt_fused.buckets == "fused"
          and len(opt_fused.bucket_plan()) > 1)
    assert_everywhere(ok, f"bucket plan {plan} ({sizes} B), fused {opt_fused.bucket_plan()}")
    start = on.params.data.copy()

    # overlap: every bucket launched during backward, in the plan's order, before step()
    calls = recorded_calls(monkeypatch)
    seen = []                   # per announcement: the launches made before it
    ready = on.params.grads_ready
    monkeypatch.setattr(on.params, "grads_ready", lambda names: (seen.append((tuple(names), len(calls))), ready(names)))
    launched_during_backward, ahead = True, []
    for x, y in data:
        seen.clear()
        calls.clear()
        on.loss_and_grad(x.astype(np.float32), y)
        launches = [(a.ctypes.data - flat.ctypes.data) // flat.itemsize for _, a in calls]
        launched_during_backward &= (
            [name for name, _ in calls] == ["bucket_allreduce_async_"] * len(plan)
            and launches == [lo for lo, _ in plan])
        ahead.append(seen[-1])
        opt_on.step()
        launched_during_backward &= len(calls) == len(plan)          # step() only waits
    # when fc0 announced its gradients (the last), the buckets of fc1..fc3 were on their way
    behind = sum(lo >= o[2] for lo, _ in plan)
    assert_everywhere(launched_during_backward and behind == 3
                      and all(a == (("fc0.weight", "fc0.bias"), behind) for a in ahead),
                      f"launches {calls}, announcements {seen}, {behind} bucket(s) expected before fc0")
    monkeypatch.undo()

    # off: the same buckets, one blocking all-reduce each, after backward
    calls = recorded_calls(monkeypatch)
    train(off, opt_off, data[:1])
    flat_off = off.params.flat_grad
    blocking = [(a.ctypes.data - flat_off.ctypes.data) // flat_off.itemsize for _, a in calls]
    assert_everywhere([name for name, _ in calls] == ["allreduce_fused_"] * len(plan)
                      and blocking == [lo for lo, _ in plan], f"overlap off made {calls}")
    monkeypatch.undo()
    train(off, opt_off, data[1:])
    train(fused, opt_fused, data)

    got_on, got_off = on.params.data, off.params.data
    assert_everywhere(not np.array_equal(got_on, start), "training changed nothing")
    assert_everywhere(np.array_equal(got_on, got_off), "overlap on and off differ")
    assert_everywhere(same_bits_everywhere(got_on), "parameters differ across ranks")
    assert_everywhere(np.allclose(got_on, fused.params.data, rtol=1e-5, atol=1e-6),
                      "backward's buckets train another model than the fused ones")
    for m in (on, off, fused):
        m.params.close()


@pytest.mark.mpi
def test_overlap_with_each_layer_its_own_bucket_and_the_average_checked(rs):
    """fusion_bytes=0: one bucket per layer (weight and bias together; 4 in flight at once);
    one step's update is the mean of the ranks' gradients (computed here from every rank's)."""
    on, opt_on = make(rs, dtype=np.float64, momentum=0.0, overlap=True, fusion_bytes=0)
    off, opt_off = make(rs, dtype=np.float64, momentum=0.0, buckets="backward", fusion_bytes=0)
    o = on.params.offsets
    layers = [(o[i], o[i + 2]) for i in range(len(o) - 3, -1, -2)]
    assert_everywhere(opt_on.bucket_plan() == layers, f"{opt_on.bucket_plan()}, expected {layers}")
    (x, y), = batches(1, 5, seed=3)
    mean = np.mean(COMM.allgather(local_gradients(on, [(x, y)])[0]), axis=0)
    start = on.params.data.copy()
    train(on, opt_on, [(x, y)], dtype=np.float64)
    train(off, opt_off, [(x, y)], dtype=np.float64)
    ok = (np.allclose(on.params.data, start - 0.05 * mean, rtol=1e-12, atol=1e-14)
          and np.array_equal(on.params.data, off.params.data))
    assert_everywhere(ok, "one step with overlap is not lr x the ranks' mean gradient")


@pytest.mark.mpi
def test_overlap_with_fp16_compression_gives_the_bits_of_overlap_off(small_buckets):
    rs = small_buckets
    data = batches(4, 8, seed=5)
    for compression in (Compression.fp16, parse_compression("fp16", error_feedback=True)):
        on, opt_on = make(rs, compression=compression, overlap=True)
        off, opt_off = make(rs, compression=compression, buckets="backward")
        plain, opt_plain = make(rs, overlap=True)
        train(on, opt_on, data)
        train(off, opt_off, data)
        train(plain, opt_plain, data)
        report = opt_on.compression_report()
        identical = same_bits_everywhere(on.params.data)          # (collective: never after a short cut)
        ok = (len(opt_on.bucket_plan()) > 2 and np.array_equal(on.params.data, off.params.data) and identical
              and report["payload_bytes_per_step"] * 2 == report["uncompressed_bytes_per_step"]
              and report["fp16_fallbacks"] == 0
              and np.allclose(on.params.data, plain.params.data, rtol=1e-2, atol=1e-3))
        if compression.error_feedback:
            ok = ok and np.array_equal(opt_on.compression_state()["residual"], opt_off.compression_state()["residual"])
        assert_everywhere(ok, f"{compression.signature()}: overlap on and off differ")
        for m in (on, off, plain):
            m.params.close()


# --- backward_passes_per_step and no_sync() ---------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("k", [2, 3])
def test_k_passes_equal_one_pass_on_a_k_times_larger_batch(small_buckets, k):
    rs = small_buckets
    data = batches(3, 4 * k, seed=k)
    f64 = {"dtype": np.float64}
    big, opt_big = make(rs, **f64)
    results = {}
    for name, kwargs in (("overlap", {"overlap": True}), ("backward", {"buckets": "backward"}), ("fused", {})):
        model, opt = make(rs, backward_passes_per_step=k, **f64, **kwargs)
        results[name] = train(model, opt, data, passes=k, dtype=np.float64)
    want = train(big, opt_big, data, dtype=np.float64)
    ok = (np.array_equal(results["overlap"], results["backward"])
          and all(np.allclose(r, want, rtol=1e-11, atol=1e-13) for r in results.values())
          and not np.allclose(want, MLP(SIZES, seed=7).params.data.astype(np.float64), atol=1e-3))
    errors = {n: float(np.abs(r - want).max()) for n, r in results.items()}
    assert_everywhere(ok, f"{k} passes differ from one pass on {k}x the batch: {errors}")
    # the comparison can fail: k steps on the k slices are another training run
    single, opt_single = make(rs, **f64)
    sliced = [(x[j * 4:(j + 1) * 4], y[j * 4:(j + 1) * 4]) for x, y in data for j in range(k)]
    other = train(single, opt_single, sliced, dtype=np.float64)
    assert_everywhere(not np.allclose(other, want, rtol=1e-6, atol=1e-8), "the check cannot tell runs apart")


@pytest.mark.mpi
@pytest.mark.parametrize("setup", [{}, {"buckets": "backward"}, {"overlap": True}])
def test_no_sync_accumulates_without_communicating_then_reduces_the_mean(small_buckets, monkeypatch, setup):
    rs = small_buckets
    model, opt = make(rs, dtype=np.float64, momentum=0.0, **setup)
    data = batches(3, 6, seed=11)
    local = local_gradients(model, data)
    calls = recorded_calls(monkeypatch)
    start = model.params.data.copy()
    with opt.no_sync():
        model.loss_and_grad(*data[0])
        first_is_local = np.array_equal(model.params.flat_grad, local[0])
        model.loss_and_grad(*data[1])
    quiet_inside = calls == []
    model.loss_and_grad(*data[2])                        # outside: this pass's all-reduce of the mean
    opt.step()
    mean_here = (local[2] + (local[0] + local[1])) / 3   # the reducer's arithmetic, this rank's
    mean = np.mean(COMM.allgather(mean_here), axis=0)
    identical = same_bits_everywhere(model.params.data)
    calls_per_step = 1 if opt.buckets == "fused" else len(opt.bucket_plan())     # (fused: one grouped call)
    ok = (quiet_inside and first_is_local and len(calls) == calls_per_step
          and np.allclose(model.params.flat_grad, mean, rtol=1e-12, atol=1e-14)
          and np.allclose(model.params.data, start - 0.05 * mean, rtol=1e-12, atol=1e-14) and identical)
    assert_everywhere(ok, f"no_sync: calls {[n for n, _ in calls]}, first pass local: {first_is_local}")
    # then an ordinary step again: one pass, reduced at once
    calls.clear()
    (g,) = local_gradients(model, data[:1])
    model.loss_and_grad(*data[0])
    opt.step()
    mean = np.mean(COMM.allgather(g), axis=0)
    assert_everywhere(len(calls) == calls_per_step and np.allclose(model.params.flat_grad, mean, rtol=1e-12, atol=1e-14),
                      "the step after no_sync() did not reduce its single pass")


@pytest.mark.mpi
def test_no_sync_passes_count_among_k_passes(small_buckets, monkeypatch):
    """backward_passes_per_step=2 with no_sync(): the passes inside count among the k (the
    mean over every pass since the last step is reduced, once the k-th is made outside)."""
    rs = small_buckets
    model, opt = make(rs, dtype=np.float64, momentum=0.0, overlap=True, backward_passes_per_step=2)
    data = batches(3, 6, seed=13)
    local = local_gradients(model, data)
    calls = recorded_calls(monkeypatch)
    with opt.no_sync():
        model.loss_and_grad(*data[0])
    model.loss_and_grad(*data[1])
    opt.step()
    two = np.allclose(model.params.flat_grad, np.mean(COMM.allgather((local[1] + local[0]) / 2), axis=0),
                      rtol=1e-12, atol=1e-14)
    launches = len(calls)
    local = local_gradients(model, data)           # (at the parameters the step made)
    with opt.no_sync():
        model.loss_and_grad(*data[0])
        model.loss_and_grad(*data[1])
    quiet = len(calls) == launches
    model.loss_and_grad(*data[2])
    opt.step()
    three = np.allclose(model.params.flat_grad, np.mean(COMM.allgather(sum(local) / 3), axis=0),
                        rtol=1e-12, atol=1e-14)
    model.loss_and_grad(*data[0])
    early = error_of(opt.step)                 # 1 of 2 passes
    n = len(opt.bucket_plan())
    identical = same_bits_everywhere(model.params.data)
    ok = (two and three and quiet and launches == n and len(calls) == 2 * n and early[0] == "RuntimeError"
          and identical)
    assert_everywhere(ok, f"two {two}, three {three}, launches {len(calls)} of {2 * n}, early {early}")


# --- misuse: raised alike on every rank, nothing sent ----------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("setup", [{"buckets": "backward"}, {"overlap": True}, {}])
def test_step_before_k_passes_raises_then_the_next_k_passes_step(small_buckets, setup):
    rs = small_buckets
    model, opt = make(rs, backward_passes_per_step=3, **setup)
    data = batches(1, 6, seed=17)
    x, y = data[0]
    start = model.params.data.copy()
    model.loss_and_grad(x[:2].astype(np.float32), y[:2])
    model.loss_and_grad(x[2:4].astype(np.float32), y[2:4])
    kind, message = error_of(opt.step)
    ok = (kind == "RuntimeError" and "backward_passes_per_step=3" in message and "2 complete" in message
          and np.array_equal(model.params.data, start))
    assert_everywhere(ok, f"{kind}: {message}")
    train(model, opt, data, passes=3)                   # the next three passes make a step
    identical = same_bits_everywhere(model.params.data)
    assert_everywhere(not np.array_equal(model.params.data, start) and identical)
    # a fourth pass after the third, before step(): refused in backward
    for k in range(3):
        model.loss_and_grad(x[2 * k:2 * k + 2].astype(np.float32), y[2 * k:2 * k + 2])
    kind, message = error_of(lambda: model.loss_and_grad(x[:2].astype(np.float32), y[:2]))
    assert_everywhere(kind == "RuntimeError" and "no_sync" in message, f"{kind}: {message}")
    opt.step()                                          # (the in-flight buckets, if any, are waited for)


@pytest.mark.mpi
@pytest.mark.parametrize("setup", [{"buckets": "backward"}, {"overlap": True}, {}])
def test_a_refused_extra_pass_leaves_the_step_alone(small_buckets, setup):
    """The pass after the k-th raises RuntimeError in backward; the step that follows must
    still apply the mean of the k passes, the same on every rank (the refused pass's gradients,
    written before its announcement, must not reach it)."""
    rs = small_buckets
    data = batches(1, 4, seed=19)
    x, y = data[0][0].astype(np.float32), data[0][1]
    extra, opt_extra = make(rs, backward_passes_per_step=2, **setup)
    clean, opt_clean = make(rs, backward_passes_per_step=2, **setup)
    for model in (extra, clean):
        model.loss_and_grad(x[:2], y[:2])
        model.loss_and_grad(x[2:], y[2:])
    kind, _ = error_of(lambda: extra.loss_and_grad(x[::-1][:2], y[::-1][:2]))
    opt_extra.step()
    opt_clean.step()
    identical = same_bits_everywhere(extra.params.data)
    ok = kind == "RuntimeError" and np.array_equal(extra.params.data, clean.params.data) and identical
    assert_everywhere(ok, f"after the refused pass ({kind}) the step differs: identical across ranks {identical}, "
                          f"max difference {float(np.abs(extra.params.data - clean.params.data).max())}")


@pytest.mark.mpi
def test_a_pass_cut_short_by_an_exception_is_forgotten(small_buckets):
    """An exception in backward after some buckets were launched: the next backward waits for
    them and starts over, and the step gives the bits of a run without the failure."""
    rs = small_buckets
    (x, y), = batches(1, 4, seed=23)
    x = x.astype(np.float32)
    cut, opt_cut = make(rs, overlap=True)
    clean, opt_clean = make(rs, overlap=True)
    first = cut.layers[0]
    real_backward = first.backward

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("cut short")
    first.backward = boom                   # the first layer is the last one backward reaches
    kind = None
    try:
        cut.loss_and_grad(x, y)
    except KeyboardInterrupt:
        kind = "KeyboardInterrupt"
    first.backward = real_backward
    launched = len(opt_cut._reducer.handles)
    for model, opt in ((cut, opt_cut), (clean, opt_clean)):
        model.loss_and_grad(x, y)
        opt.step()
    identical = same_bits_everywhere(cut.params.data)
    ok = kind == "KeyboardInterrupt" and launched >= 1 and identical and np.array_equal(cut.params.data, clean.params.data)
    assert_everywhere(ok, f"rank {COMM.rank}: {kind}, {launched} bucket(s) launched before the cut; identical {identical}")


@pytest.mark.mpi
def test_overlap_with_gradients_filled_by_hand_raises_at_step(small_buckets):
    rs = small_buckets
    params = Params([("w", (4, 3)), ("b", (3,))], np.float64)
    opt = rs.DistributedOptimizer(rs.SGD(params, lr=0.5), overlap=True)
    params.flat_grad[...] = COMM.rank
    start = params.data.copy()
    kind, message = error_of(opt.step)
    assert_everywhere(kind == "RuntimeError" and "grads_ready" in message and np.array_equal(params.data, start),
                      f"{kind}: {message}")
    # overlap off with backward's buckets needs no announcement: an ordinary average
    other = Params([("w", (4, 3)), ("b", (3,))], np.float64)
    opt = rs.DistributedOptimizer(rs.SGD(other, lr=0.5), buckets="backward", fusion_bytes=0)
    other.flat_grad[...] = COMM.rank
    opt.step()
    mean = (COMM.size - 1) / 2
    assert_everywhere(len(opt.bucket_plan()) == 2 and np.allclose(other.data, -0.5 * mean), f"{other.data}")


class NotParams:
    """Gradients as a plain list: no grads_ready, no flat buffer."""

    def __init__(self):
        self.arrays = [np.zeros(3), np.zeros(2)]

    def grads(self):
        return self.arrays


class PlainOptimizer:
    def __init__(self):
        self.params = NotParams()

    def step(self):
        pass


@pytest.mark.mpi
@pytest.mark.parametrize("kwargs, kind, words", [
    ({"overlap": "yes"}, "TypeError", "overlap"),
    ({"overlap": 1}, "TypeError", "overlap"),
    ({"overlap": None}, "TypeError", "overlap"),
    ({"backward_passes_per_step": 0}, "ValueError", "backward_passes_per_step"),
    ({"backward_passes_per_step": -2}, "ValueError", "backward_passes_per_step"),
    ({"backward_passes_per_step": 1.5}, "ValueError", "backward_passes_per_step"),
    ({"backward_passes_per_step": True}, "ValueError", "backward_passes_per_step"),
    ({"backward_passes_per_step": "2"}, "ValueError", "backward_passes_per_step"),
    ({"buckets": "x"}, "ValueError", "buckets"),
    ({"buckets": "Backward"}, "ValueError", "buckets"),
    ({"buckets": "fused", "overlap": True}, "ValueError", "buckets"),
    ({"compression": PowerSGD(rank=1), "overlap": True}, "ValueError", "overlap"),
    ({"compression": PowerSGD(rank=1), "buckets": "backward"}, "ValueError", "buckets"),
])
def test_invalid_arguments_name_the_argument(rs, kwargs, kind, words):
    model = MLP(SIZES, seed=0)
    got = error_of(lambda: rs.DistributedOptimizer(rs.SGD(model.params), **kwargs))
    assert_everywhere(got[0] == kind and words in got[1], f"{kwargs}: {got}")


@pytest.mark.mpi
def test_valid_arguments_are_taken(rs):
    model = MLP(SIZES, seed=0)
    for kwargs in ({"backward_passes_per_step": np.int64(2)}, {"buckets": "fused"}, {"buckets": "backward"},
                   {"overlap": True, "buckets": "backward"}, {"overlap": False},
                   {"compression": PowerSGD(rank=1), "backward_passes_per_step": 2}):
        opt = rs.DistributedOptimizer(rs.SGD(MLP(SIZES, seed=0).params), **kwargs)
        assert_everywhere(opt.buckets == kwargs.get("buckets", "backward" if kwargs.get("overlap") else "fused"))
    del model


@pytest.mark.mpi
def test_overlap_and_accumulation_need_a_params_store(rs):
    for kwargs in ({"overlap": True}, {"backward_passes_per_step": 2}, {"buckets": "backward"}):
        kind, message = error_of(lambda kw=kwargs: rs.DistributedOptimizer(PlainOptimizer(), **kw))
        assert_everywhere(kind == "TypeError" and "Params" in message, f"{kwargs}: {kind}: {message}")
    opt = rs.DistributedOptimizer(PlainOptimizer())        # the plain fused all-reduce still works
    kind, message = error_of(opt.no_sync)
    assert_everywhere(kind == "TypeError" and "no_sync" in message, f"{kind}: {message}")
    opt.params.arrays[0][...] = COMM.rank
    opt.step()
    assert_everywhere(np.allclose(opt.params.arrays[0], (COMM.size - 1) / 2))


# --- RINGSYNC_FIRST_BUCKET_BYTES is read at init() and compared across ranks -----------------------

@pytest.mark.mpi(min_size=2)
def test_a_first_bucket_size_that_differs_across_ranks_raises_on_every_rank(rs):
    name = "RINGSYNC_FIRST_BUCKET_BYTES"
    saved = os.environ.get(name)
    os.environ[name] = "4096" if COMM.rank == 0 else "8192"
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
    assert_everywhere(f"{name}: '4096' on rank 0; '8192' on rank" in message, message)
    model, opt = make(rs, overlap=True)                  # and the World works again
    train(model, opt, batches(1, 4))
    identical = same_bits_everywhere(model.params.data)
    assert_everywhere(identical and world().settings.first_bucket_bytes == (1 << 20 if saved is None else int(saved)))

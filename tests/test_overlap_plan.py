"""Overlap's plan and bookkeeping, serial: backward_buckets (pure logic), and the Reducer with
stand-in launch/reduce functions (which bucket starts when, the mean over accumulated passes).
No MPI here: tests/test_mpi_overlap.py runs the real all-reduces."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringsync.training.nn import Params
from ringsync.training.overlap import Reducer, backward_buckets


def flatten_backward(buckets):
    """The parameter indices in the order the buckets hold them, each bucket read backward."""
    return [i for b in buckets for i in reversed(b)]


def check_plan(nbytes, first_cap, cap, buckets):
    """Every property backward_buckets promises (its docstring), checked on one answer."""
    n = len(nbytes)
    # every parameter exactly once, from the last to the first
    assert flatten_backward(buckets) == list(range(n - 1, -1, -1)), buckets
    assert sorted(i for b in buckets for i in b) == list(range(n))
    for k, b in enumerate(buckets):
        assert len(b) >= 1 and isinstance(b, tuple)
        assert list(b) == list(range(b[0], b[-1] + 1)), f"bucket {k} not consecutive in memory order: {b}"
        limit = min(first_cap, cap) if k == 0 else cap
        total = sum(nbytes[i] for i in b)
        assert len(b) == 1 or total <= limit, (k, b, total, limit)
        # greedy: the next parameter (the last one of the following bucket) did not fit
        if k + 1 < len(buckets):
            assert total + nbytes[buckets[k + 1][-1]] > limit, (k, b, buckets[k + 1])


# --- backward_buckets ----------------------------------------------------------------------------

def test_buckets_run_from_the_last_parameter_to_the_first():
    assert backward_buckets([4, 4, 4, 4, 4], 100, 8) == [(3, 4), (1, 2), (0,)]
    assert backward_buckets([4, 4, 4], 100, 100) == [(0, 1, 2)]


def test_the_first_bucket_has_the_smaller_cap():
    # first cap 8: the last two parameters; then up to 12 bytes each
    assert backward_buckets([4, 4, 4, 4, 4], 8, 12) == [(3, 4), (0, 1, 2)]
    assert backward_buckets([4, 4, 4, 4, 4, 4], 4, 8) == [(5,), (3, 4), (1, 2), (0,)]
    # a first cap larger than the cap does not raise the first bucket's: min(first, cap)
    assert backward_buckets([4, 4, 4, 4, 4], 1000, 8) == backward_buckets([4, 4, 4, 4, 4], 8, 8)
    # first cap 0: the last parameter alone, the rest by the cap
    assert backward_buckets([4, 4, 4], 0, 100) == [(2,), (0, 1)]


def test_a_parameter_larger_than_the_cap_forms_a_bucket_alone():
    assert backward_buckets([4, 100, 4, 4], 8, 10) == [(2, 3), (1,), (0,)]
    assert backward_buckets([4, 4, 100], 8, 16) == [(2,), (0, 1)]          # the last one, over the first cap
    assert backward_buckets([100, 4, 4], 8, 16) == [(1, 2), (0,)]
    assert backward_buckets([100], 8, 16) == [(0,)]


def test_cap_zero_gives_one_parameter_per_bucket():
    assert backward_buckets([4, 8, 4], 0, 0) == [(2,), (1,), (0,)]
    assert backward_buckets([4, 8, 4], 1 << 20, 0) == [(2,), (1,), (0,)]


def test_no_parameters_no_buckets():
    assert backward_buckets([], 8, 8) == []
    assert backward_buckets([], 0, 0) == []


def test_indices_are_in_memory_order_inside_each_bucket():
    plan = backward_buckets([1] * 10, 3, 4)
    assert plan == [(7, 8, 9), (3, 4, 5, 6), (0, 1, 2)]
    assert all(list(b) == sorted(b) for b in plan)


def test_an_mlp_s_sizes():
    # MLP [64, 128, 64, 10] in float32 (ringsync-train's digits model), the first bucket 4 KiB,
    # the others 40 KiB: fc1.weight (32 KiB) and fc0.bias fit one, fc0.weight (32 KiB) is next
    sizes = [64 * 128 * 4, 128 * 4, 128 * 64 * 4, 64 * 4, 64 * 10 * 4, 10 * 4]
    plan = backward_buckets(sizes, 4096, 40960)
    assert plan == [(3, 4, 5), (1, 2), (0,)]
    check_plan(sizes, 4096, 40960, plan)
    assert backward_buckets(sizes, 1 << 20, 64 << 20) == [(0, 1, 2, 3, 4, 5)]    # the defaults: one


@settings(max_examples=300, deadline=None)
@given(nbytes=st.lists(st.integers(0, 64), max_size=30), first_cap=st.integers(0, 200),
       cap=st.integers(0, 200))
def test_any_plan_tiles_every_parameter_once_within_its_caps(nbytes, first_cap, cap):
    check_plan(nbytes, first_cap, cap, backward_buckets(nbytes, first_cap, cap))


@settings(max_examples=100, deadline=None)
@given(nbytes=st.lists(st.integers(1, 64), min_size=1, max_size=30))
def test_any_positive_sizes_with_cap_zero_are_one_per_bucket(nbytes):
    assert backward_buckets(nbytes, 0, 0) == [(i,) for i in reversed(range(len(nbytes)))]


# --- the Reducer, with stand-ins for the all-reduces ----------------------------------------------

SPECS = [("a.w", (3, 4)), ("a.b", (4,)), ("b.w", (4, 5)), ("b.b", (5,)), ("c.w", (5, 2)), ("c.b", (2,))]


def make_params(dtype=np.float64):
    return Params(SPECS, dtype)


def make_reducer(params, first_cap, cap, overlap, passes=1):
    """A Reducer whose launches and blocking reduces are recorded, not run."""
    launched, reduced = [], []

    def launch(bucket, span):
        launched.append((bucket, span))
        return object()

    def reduce(bucket, span):
        reduced.append((bucket, span))
    return Reducer(params, first_cap, cap, overlap, passes, launch, reduce), launched, reduced


def offset_of(span, flat):
    return (span.ctypes.data - flat.ctypes.data) // flat.itemsize


def test_reducer_buckets_are_slices_of_the_flat_gradient():
    params = make_params()
    r, _, _ = make_reducer(params, 8 * 6, 8 * 30, overlap=True)
    sizes = [8 * int(np.prod(s)) for _, s in SPECS]
    assert [b.members for b in r.buckets] == backward_buckets(sizes, 8 * 6, 8 * 30)
    assert len(r.buckets) > 2
    assert r.buckets[-1].lo == 0 and r.buckets[0].hi == params.flat_grad.size
    for earlier, later in zip(r.buckets[1:], r.buckets):     # back to back, backward
        assert earlier.hi == later.lo
    for b in r.buckets:
        assert b.lo == params.offsets[b.members[0]] and b.hi == params.offsets[b.members[-1] + 1]
    r.close()
    assert not params.announces_grads


def test_each_bucket_launches_when_its_last_gradient_is_announced():
    params = make_params()
    r, launched, reduced = make_reducer(params, 8 * 6, 8 * 30, overlap=True)
    flat = params.flat_grad
    expected = []
    for i in reversed(range(len(SPECS))):          # backward: the last parameter first
        params.grads_ready([SPECS[i][0]])
        k = r.bucket_of[i]
        if i == r.buckets[k].members[0]:            # the bucket's last gradient to come
            expected.append(k)
        assert [r.buckets.index(b) for b, _ in launched] == expected, (i, launched)
    assert expected == list(range(len(r.buckets))) and not reduced
    for bucket, span in launched:                    # the launch gets the bucket's own slice, no copy
        assert np.shares_memory(span, flat) and offset_of(span, flat) == bucket.lo and span.size == bucket.hi - bucket.lo
    assert r.final and r.passes_done == 1


def test_buckets_launch_in_bucket_order_whatever_order_gradients_come_in():
    params = make_params()
    r, launched, _ = make_reducer(params, 8 * 6, 8 * 30, overlap=True)
    first = r.buckets[0].members
    later = [i for b in r.buckets[1:] for i in b.members]
    params.grads_ready([SPECS[i][0] for i in later])      # every bucket but the first is complete...
    assert launched == []                                   # ... and waits for it
    params.grads_ready([SPECS[i][0] for i in first])
    assert [b for b, _ in launched] == r.buckets


def test_without_overlap_the_hook_does_nothing_and_finish_reduces_once():
    params = make_params()
    r, launched, reduced = make_reducer(params, 8 * 6, 8 * 30, overlap=False)
    params.flat_grad[...] = np.arange(params.flat_grad.size)
    params.grads_ready(list(params.names))                 # ignored: nothing to accumulate
    assert launched == [] and not r.final and r.passes_done == 0
    calls = []
    r.finish(lambda: calls.append(1))
    assert calls == [1] and launched == [] and reduced == []
    r.reduce_buckets()                                       # overlap off, backward's buckets
    assert [b for b, _ in reduced] == r.buckets
    assert np.array_equal(params.flat_grad, np.arange(params.flat_grad.size))


def one_pass(params, rng):
    """Fill the gradients by hand and announce them, last first; return what was written."""
    g = rng.standard_normal(params.flat_grad.size)
    params.flat_grad[...] = g
    for name in reversed(params.names):
        params.grads_ready([name])
    return g


@pytest.mark.parametrize("overlap", [False, True])
def test_k_passes_leave_their_mean_in_the_gradient(overlap):
    params = make_params()
    r, launched, _ = make_reducer(params, 8 * 6, 8 * 30, overlap=overlap, passes=3)
    rng = np.random.default_rng(0)
    g1 = one_pass(params, rng)
    g2 = one_pass(params, rng)
    assert launched == [] and not r.final and r.passes_done == 2
    g3 = one_pass(params, rng)
    # the reducer's own arithmetic: the last pass plus the sum of the others, divided by 3
    assert np.array_equal(params.flat_grad, (g3 + (g1 + g2)) / 3)
    assert np.allclose(params.flat_grad, (g1 + g2 + g3) / 3, rtol=1e-14, atol=1e-15)
    assert len(launched) == (len(r.buckets) if overlap else 0)
    assert r.final
    with pytest.raises(RuntimeError, match="backward_passes_per_step"):     # a 4th pass
        one_pass(params, rng)


def test_step_before_k_passes_raises_and_resets():
    params = make_params()
    r, _, _ = make_reducer(params, 8 * 6, 8 * 30, overlap=False, passes=2)
    rng = np.random.default_rng(1)
    one_pass(params, rng)
    calls = []
    with pytest.raises(RuntimeError, match=r"1 complete backward pass.*backward_passes_per_step=2"):
        r.finish(lambda: calls.append(1))
    assert calls == [] and r.passes_done == 0 and not r.final
    g1, g2 = one_pass(params, rng), one_pass(params, rng)      # the next two passes count afresh
    r.finish(lambda: calls.append(1))
    assert calls == [1] and np.array_equal(params.flat_grad, (g2 + g1) / 2)


@pytest.mark.parametrize("overlap", [False, True])
def test_no_sync_passes_accumulate_and_the_next_pass_takes_their_mean(overlap):
    params = make_params()
    r, launched, _ = make_reducer(params, 8 * 6, 8 * 30, overlap=overlap, passes=1)
    rng = np.random.default_rng(2)
    with r.no_sync():
        g1 = one_pass(params, rng)
        assert np.array_equal(params.flat_grad, g1)          # left as it was: nothing reduced
        g2 = one_pass(params, rng)
    assert launched == [] and not r.final and r.passes_done == 2 and r.no_sync_depth == 0
    calls = []
    with pytest.raises(RuntimeError, match="no_sync"):        # no pass outside: nothing to reduce
        r.finish(lambda: calls.append(1))
    with r.no_sync():
        g1 = one_pass(params, rng)
        with r.no_sync():                                      # nested: still inside
            g2 = one_pass(params, rng)
    g3 = one_pass(params, rng)
    assert np.array_equal(params.flat_grad, (g3 + (g1 + g2)) / 3)
    assert len(launched) == (len(r.buckets) if overlap else 0) and r.final
    if not overlap:                                            # (overlap's finish waits on real handles)
        r.finish(lambda: calls.append(1))
        assert calls == [1] and not r.final and r.passes_done == 0


def test_overlap_with_a_model_that_never_announces_raises_at_finish():
    params = make_params()
    r, launched, _ = make_reducer(params, 8 * 6, 8 * 30, overlap=True)
    params.flat_grad[...] = 1.0                               # filled by hand, never announced
    calls = []
    with pytest.raises(RuntimeError, match="grads_ready"):
        r.finish(lambda: calls.append(1))
    assert calls == [] and launched == []


# --- the setting ---------------------------------------------------------------------------------

def test_the_first_bucket_setting_defaults_to_ddp_s_1_mib_and_refuses_nonsense(monkeypatch):
    from ringsync.config import Settings

    monkeypatch.delenv("RINGSYNC_FIRST_BUCKET_BYTES", raising=False)
    assert Settings.from_env().first_bucket_bytes == 1 << 20
    monkeypatch.setenv("RINGSYNC_FIRST_BUCKET_BYTES", "4096")
    settings = Settings.from_env()
    assert settings.first_bucket_bytes == 4096
    assert "RINGSYNC_FIRST_BUCKET_BYTES=4096" in settings.encode().decode()     # compared at init()
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv("RINGSYNC_FIRST_BUCKET_BYTES", bad)
        with pytest.raises(ValueError, match="RINGSYNC_FIRST_BUCKET_BYTES"):
            Settings.from_env()


def test_params_units_group_a_layer_and_backward_buckets_keep_it_whole():
    from ringsync.training.nn import MLP

    model = MLP([3, 4, 2])
    assert model.params.units() == [(0, 1), (2, 3)]
    assert make_params().units() == [(i,) for i in range(len(SPECS))]
    params = make_params()
    params.group(["b.w", "b.b"])
    assert params.units() == [(0,), (1,), (2, 3), (4,), (5,)]
    for odd in (["a.w", "b.w"], ["b.b", "c.w"]):          # not consecutive; b.b already grouped
        params.group(odd)                                 # ignored: those stay as they were
    params.group(["b.w", "b.b"])                          # the same layer again: no change
    assert params.units() == [(0,), (1,), (2, 3), (4,), (5,)]


def test_units_are_never_split_between_buckets():
    layers = [(0, 1), (2, 3), (4, 5)]
    # a cap of 4 bytes would split each pair: units keep them whole, one bucket each
    assert backward_buckets([4] * 6, 4, 4, layers) == [(4, 5), (2, 3), (0, 1)]
    # the first cap (8) takes one layer; the cap (16) the other two together
    assert backward_buckets([4] * 6, 8, 16, layers) == [(4, 5), (0, 1, 2, 3)]
    # a bias alone in the last unit is not left behind its weight
    assert backward_buckets([8, 4, 8, 4], 10, 10, [(0, 1), (2, 3)]) == [(2, 3), (0, 1)]
    assert backward_buckets([4] * 3, 8, 8, None) == backward_buckets([4] * 3, 8, 8, [(0,), (1,), (2,)])


@settings(max_examples=200, deadline=None)
@given(data=st.data(), first_cap=st.integers(0, 200), cap=st.integers(0, 200))
def test_any_plan_with_units_keeps_each_unit_in_one_bucket(data, first_cap, cap):
    lengths = data.draw(st.lists(st.integers(1, 3), max_size=12))
    units, i = [], 0
    for n in lengths:
        units.append(tuple(range(i, i + n)))
        i += n
    nbytes = data.draw(st.lists(st.integers(0, 64), min_size=i, max_size=i))
    buckets = backward_buckets(nbytes, first_cap, cap, units)
    assert flatten_backward(buckets) == list(range(i - 1, -1, -1))
    where = {j: k for k, b in enumerate(buckets) for j in b}
    unit_of = {j: u for u in units for j in u}
    for u in units:
        assert len({where[j] for j in u}) == 1, (u, buckets)
    for k, b in enumerate(buckets):
        limit = min(first_cap, cap) if k == 0 else cap
        whole = {unit_of[j] for j in b}
        assert sum(len(u) for u in whole) == len(b)                 # only whole units
        assert len(whole) == 1 or sum(nbytes[j] for j in b) <= limit, (k, b, limit)
        if k + 1 < len(buckets):                                    # greedy: the next unit did not fit
            nxt = unit_of[buckets[k + 1][-1]]
            assert sum(nbytes[j] for j in b) + sum(nbytes[j] for j in nxt) > limit

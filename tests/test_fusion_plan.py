"""Fusion planning and memory adjacency: pure logic, no MPI."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ringsync.algorithms.scattered import Scattered
from ringsync.config import Settings
from ringsync.fusion import FlatBuffer, contiguous_span, fusion_threshold, plan_buckets

F32, F64, I32 = np.dtype("float32"), np.dtype("float64"), np.dtype("int32")


def test_buckets_fill_up_to_the_threshold_in_order():
    assert plan_buckets([4, 4, 4, 4, 4], [F32] * 5, 8) == [[0, 1], [2, 3], [4]]
    assert plan_buckets([4, 4, 4], [F32] * 3, 100) == [[0, 1, 2]]


def test_zero_threshold_gives_one_bucket_per_array():
    assert plan_buckets([4, 0, 8], [F32] * 3, 0) == [[0], [1], [2]]


def test_oversized_array_goes_alone_and_dtypes_never_mix():
    assert plan_buckets([4, 100, 4, 4], [F32] * 4, 10) == [[0], [1], [2, 3]]
    assert plan_buckets([4, 8, 4, 8], [F32, F64, F32, F64], 64) == [[0, 2], [1, 3]]
    plan = plan_buckets([4, 8, 4], [F32, I32, F32], 64)
    assert plan == [[0, 2], [1]]


def test_every_index_planned_exactly_once():
    rng = np.random.default_rng(0)
    sizes = list(rng.integers(0, 50, 40))
    dtypes = [[F32, F64, I32][i] for i in rng.integers(0, 3, 40)]
    plan = plan_buckets(sizes, dtypes, 60)
    assert sorted(i for b in plan for i in b) == list(range(40))
    for b in plan:
        assert len({dtypes[i] for i in b}) == 1
        assert len(b) == 1 or sum(sizes[i] for i in b) <= 60


def test_flat_buffer_views_are_adjacent_and_share_memory():
    fb = FlatBuffer([(2, 3), (4,), (), (0,)], np.float32)
    assert fb.flat.size == 6 + 4 + 1
    span = contiguous_span(fb.views)
    assert span is not None and span.size == fb.flat.size
    span[...] = np.arange(span.size)
    assert fb.views[1].tolist() == [6, 7, 8, 9] and float(fb.views[2]) == 10
    assert contiguous_span(fb.views[1:3]).tolist() == [6, 7, 8, 9, 10]


def test_span_of_a_middle_run():
    fb = FlatBuffer([(3,), (2,), (4,)], np.float64)
    fb.flat[...] = np.arange(9)
    span = contiguous_span(fb.views[1:])
    assert span.tolist() == [3, 4, 5, 6, 7, 8]


def test_not_adjacent_means_no_span():
    a, b = np.zeros(3), np.zeros(3)
    assert contiguous_span([a, b]) is None
    fb = FlatBuffer([(3,), (2,), (4,)], np.float64)
    assert contiguous_span([fb.views[0], fb.views[2]]) is None      # a gap
    assert contiguous_span([fb.views[1], fb.views[0]]) is None      # wrong order
    assert contiguous_span([np.zeros((4, 4))[:, 0]]) is None         # not contiguous


def test_threshold_argument_and_environment(monkeypatch):
    # The environment's value is read at init() (config.Settings), the same on every rank.
    monkeypatch.delenv("RINGSYNC_FUSION_THRESHOLD", raising=False)
    assert Settings.from_env().fusion_threshold == 64 * 2**20
    monkeypatch.setenv("RINGSYNC_FUSION_THRESHOLD", "1024")
    assert Settings.from_env().fusion_threshold == 1024 and fusion_threshold(0) == 0
    monkeypatch.setenv("RINGSYNC_FUSION_THRESHOLD", "-1")
    with pytest.raises(ValueError, match="RINGSYNC_FUSION_THRESHOLD"):
        Settings.from_env()
    with pytest.raises(ValueError, match="fusion_bytes"):
        fusion_threshold(-5)
    with pytest.raises(TypeError, match="fusion_bytes"):
        fusion_threshold(1.5)


def test_flat_buffer_buckets_follow_the_plan():
    fb = FlatBuffer([(2,), (2,), (4,), (1,)], np.float32)        # 8, 8, 16, 4 bytes
    assert [b.size for b, _ in fb.buckets(16)] == [4, 4, 1]
    assert [b.size for b, _ in fb.buckets(0)] == [2, 2, 4, 1]
    assert [b.size for b, _ in fb.buckets(1 << 20)] == [9]
    assert all(np.shares_memory(b, fb.flat) for b, _ in fb.buckets(16))
    assert isinstance(fb.views, tuple) and fb.views.owner is fb


@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=8), cut=st.data())
def test_scattered_arrays_read_and_write_as_their_concatenation(sizes, cut):
    arrays = [np.arange(n, dtype=np.float32) + 100 * i for i, n in enumerate(sizes)]
    whole = np.concatenate(arrays)
    buf = Scattered(arrays)
    assert (buf.size, buf.nbytes, buf.shape) == (whole.size, whole.nbytes, whole.shape)
    lo = cut.draw(st.integers(0, whole.size))
    hi = cut.draw(st.integers(lo, whole.size))
    out = np.full(hi - lo, -1, np.float32)
    buf.read(lo, hi, out)
    assert np.array_equal(out, whole[lo:hi])
    buf.write(lo, hi, -out)
    whole[lo:hi] *= -1
    assert np.array_equal(np.concatenate(arrays), whole)      # only [lo, hi) changed


def test_scattered_with_a_large_array_in_memcpys_trap(monkeypatch):
    """An array large enough for memcpy's trap (transport/memcopy.py) is copied with copy_; here
    it lies in the trap against the slot it is read into, then against the one written from."""
    from test_memcopy import at_page_offset

    from ringsync.transport import memcopy
    from ringsync.transport.memcopy import CHECKED_BYTES, address, in_trap

    monkeypatch.setattr(memcopy, "TRAP_ENDS", 1 << 30)     # checked on any processor
    big = at_page_offset(CHECKED_BYTES // 4 + 5, np.float32, 16)
    big[...] = np.arange(big.size)
    arrays = [np.arange(3, dtype=np.float32), big, np.full(7, -2.0, np.float32)]
    buf = Scattered(arrays)
    assert buf.large and not Scattered([arrays[0], arrays[2]]).large
    for slot_offset, reading in ((20, True), (4080, False)):      # big lands at slot + 12 bytes
        whole = np.concatenate(arrays)
        slot = at_page_offset(whole.size, np.float32, slot_offset)
        at = address(slot) + 12
        assert in_trap(at, address(big)) if reading else in_trap(address(big), at)
        buf.read(0, whole.size, slot)
        assert slot.tobytes() == whole.tobytes()
        buf.write(0, whole.size, -slot)
        assert np.array_equal(np.concatenate(arrays), -whole)

"""transport/memcopy.py: copies that step around memcpy's trap give the same bits, trapped or not."""
import numpy as np
import pytest

from ringsync import ops
from ringsync.transport import memcopy
from ringsync.transport.memcopy import CHECKED_BYTES, PAGE, address, copy_, in_trap


def at_page_offset(n: int, dtype, offset: int) -> np.ndarray:
    """An array of n elements whose first byte lies `offset` bytes into a page."""
    raw = np.zeros(n * np.dtype(dtype).itemsize + 2 * PAGE, np.uint8)
    start = (offset - address(raw)) % PAGE
    return raw[start:start + n * np.dtype(dtype).itemsize].view(dtype)


def test_in_trap_is_a_destination_just_past_the_source_modulo_a_page():
    assert [in_trap(PAGE * 7 + d, 0) for d in (0, 1, 16, 63, 64, PAGE - 16)] == [False, True, True, True, False, False]
    assert in_trap(5 * PAGE + 100, 3 * PAGE + 90) and not in_trap(3 * PAGE + 90, 5 * PAGE + 100)


@pytest.mark.parametrize("dtype", [np.dtype(n) for n in ops.DTYPE_NAMES if n != "bfloat16"])   # (fixed: NumPy's)
@pytest.mark.parametrize("gap", [0, 1, 2, 3, 6, 16, 48, 64, PAGE - 16])
def test_copy_gives_the_same_bits_trapped_or_not(dtype, gap, monkeypatch):
    monkeypatch.setattr(memcopy, "TRAP_ENDS", 1 << 30)     # checked on any processor
    n = CHECKED_BYTES // np.dtype(dtype).itemsize + 3
    src, dst = at_page_offset(n, dtype, 256), at_page_offset(n, dtype, 256 + gap)
    bits = np.random.default_rng(gap).integers(0, 256, size=src.nbytes, dtype=np.uint8)
    src.view(np.uint8)[...] = bits          # every bit pattern: NaN payloads, -0.0, subnormals
    if np.dtype(dtype).kind == "f":
        src[:4] = [np.nan, -0.0, np.inf, -np.nan]
    copy_(dst, src)
    assert dst.tobytes() == src.tobytes()
    assert in_trap(address(dst), address(src)) == (0 < gap < 64)


def count_trapped_copies(monkeypatch) -> list:
    """Records each copy copy_ makes around the trap (its bitwise_or) in the returned list;
    TRAP_ENDS raised so that copies are checked on any processor, whatever its L2."""

    class Counting:     # memcopy's `np`, with bitwise_or recorded
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def bitwise_or(*args, **kwargs):
            used.append(True)
            return np.bitwise_or(*args, **kwargs)

    used: list = []
    monkeypatch.setattr(memcopy, "np", Counting())
    monkeypatch.setattr(memcopy, "TRAP_ENDS", 1 << 30)
    return used


def test_the_trapped_copy_takes_the_loop_not_memcpy(monkeypatch):
    used = count_trapped_copies(monkeypatch)
    src = at_page_offset(CHECKED_BYTES // 4, np.float32, 0)
    src[...] = np.arange(src.size)
    for gap, trapped in ((16, True), (128, False)):
        used.clear()
        dst = at_page_offset(src.size, np.float32, gap)
        copy_(dst, src)
        assert np.array_equal(dst, src) and bool(used) == trapped
    small = at_page_offset(100, np.float32, 16)
    used.clear()
    copy_(small, src[:100])                 # below CHECKED_BYTES: never checked
    assert np.array_equal(small, src[:100]) and not used
    monkeypatch.setattr(memcopy, "TRAP_ENDS", src.nbytes)
    dst = at_page_offset(src.size, np.float32, 16)
    copy_(dst, src)                         # from the L2's size on, memcpy has no trap
    assert np.array_equal(dst, src) and not used


def test_address_of_read_only_and_empty_arrays():
    a = np.arange(10.0)
    ro = a[2:]
    ro.flags.writeable = False
    assert address(ro) == address(a) + 16
    assert isinstance(address(np.empty(0)), int)


def test_anything_but_two_contiguous_arrays_of_one_dtype_is_simply_assigned(monkeypatch):
    monkeypatch.setattr(memcopy, "TRAP_ENDS", 1 << 30)
    n = CHECKED_BYTES // 4
    src = at_page_offset(n, np.float32, 0)
    src[...] = np.arange(n) + 0.5
    as_ints = at_page_offset(n, np.int32, 16)               # in the trap, another dtype: a cast
    copy_(as_ints, src)
    assert np.array_equal(as_ints, np.arange(n))
    wide = at_page_offset(2 * n, np.float32, 16)[::2]       # not contiguous
    copy_(wide, src)
    assert np.array_equal(wide, src)

"""fusion.contiguous_span over memory owned by an array of another dtype (serial).

A shared FlatBuffer's views are typed views of raw bytes: an MPI window's memory or an mmap
(transport/shm.py). Views that tile that memory must give one span of their own dtype there,
whatever owns it and however the chain of .base runs.
"""
import mmap

import numpy as np
import pytest

from ringsync.fusion import contiguous_span


def address(a):
    return a.__array_interface__["data"][0]


def raw_bytes(kind, n):
    if kind == "ndarray":
        return np.zeros(n, np.uint8)
    if kind == "mmap":                      # an anonymous shared mapping, as POSIX shm gives
        return np.frombuffer(mmap.mmap(-1, n), np.uint8)
    return np.frombuffer(bytearray(n), np.uint8)


@pytest.mark.parametrize("kind", ["ndarray", "mmap", "bytearray"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64"])
def test_views_of_raw_bytes_give_a_span_of_their_dtype_in_that_memory(kind, dtype):
    raw = raw_bytes(kind, 4096)
    flat = raw[64:64 + 100 * np.dtype(dtype).itemsize].view(dtype)    # the FlatBuffer's `flat`
    views = [flat[0:12].reshape(3, 4), flat[12:12], flat[12:50], flat[50:51].reshape(())]
    span = contiguous_span(views)
    assert span is not None and span.dtype == dtype and span.shape == (51,)
    assert address(span) == address(flat) and np.shares_memory(span, raw)
    span[...] = 7
    assert all((v == 7).all() for v in views) and not flat[51:].any()
    assert contiguous_span(views[2:]).shape == (39,)
    assert contiguous_span([views[0], views[2][1:]]) is None                  # a gap
    assert contiguous_span([views[2], views[0]]) is None                      # out of order


def test_views_at_an_odd_byte_offset_of_the_owner():
    raw = np.zeros(256, np.uint8)
    flat = raw[3:3 + 80].view(np.float64)          # unaligned: still the same bytes
    span = contiguous_span([flat[:4], flat[4:10]])
    assert span.dtype == np.float64 and span.size == 10 and address(span) == address(raw) + 3


def test_a_span_inside_an_owner_of_the_same_dtype_is_a_slice_of_it():
    owner = np.arange(20, dtype=np.float32)
    span = contiguous_span([owner[2:5], owner[5:9].reshape(2, 2)])
    assert span.base is owner and span.tolist() == [2, 3, 4, 5, 6, 7, 8]

"""A fake `cupy` made of NumPy, to run ringsync's CuPy glue code on a CPU.

`install()` puts it in sys.modules["cupy"] (do that in a throw-away process only). Its arrays
are a NumPy subclass with what ringsync's GPU code uses: `.device` (a context manager),
`.data.ptr`, `.get()`; `cuda.runtime.memcpyAsync` is a plain memmove, events and streams do
nothing, "pinned" memory is a bytearray. So the Python logic of buffers.py's device front
doors, fusion on device arrays and `ringsync-train --device gpu` runs end to end.

GLUE COVERAGE ONLY. Nothing here is CUDA: it cannot catch a wrong stream, a missing
synchronize or a CuPy API difference. tests/test_gpu.py is the GPU check.
"""
from __future__ import annotations

import ctypes
import sys
import types

import numpy as np


class _Pointer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class _Device:
    def __init__(self, index: int = 0) -> None:
        self.id = index

    def use(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class ndarray(np.ndarray):
    """A NumPy array posing as a CuPy one."""

    @property
    def device(self) -> _Device:
        return _Device(0)

    @property
    def data(self) -> _Pointer:       # CuPy: a MemoryPointer whose .ptr is the device address
        return _Pointer(self.__array_interface__["data"][0])

    def set(self, host) -> None:
        self.view(np.ndarray)[...] = host

    def get(self, out=None):
        host = np.array(self.view(np.ndarray), copy=True)
        if out is not None:
            out[...] = host
            return out
        return host


def _wrap(a):
    return np.asarray(a).view(ndarray)


class _Stream:
    ptr = 0

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class _Event:
    def __init__(self, block: bool = False, disable_timing: bool = False) -> None:
        self.recorded = False

    def record(self, stream=None) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        assert self.recorded, "waited on an event that was never recorded"


def _memcpy_async(dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
    ctypes.memmove(dst, src, nbytes)


def install() -> types.ModuleType:
    """Register the fake as `cupy` and return it."""
    cp = types.ModuleType("cupy")
    cp.__version__ = "0.0-fake"
    cp.ndarray = ndarray
    for name in ("float16", "float32", "float64", "int32", "int64"):
        setattr(cp, name, getattr(np, name))
    for name in ("add", "minimum", "maximum", "divide", "floor_divide", "log", "exp"):
        setattr(cp, name, getattr(np, name))
    cp.empty = lambda *a, **k: _wrap(np.empty(*a, **k))
    cp.zeros = lambda *a, **k: _wrap(np.zeros(*a, **k))
    cp.full = lambda *a, **k: _wrap(np.full(*a, **k))
    cp.arange = lambda *a, **k: _wrap(np.arange(*a, **k))
    cp.asarray = lambda a, dtype=None: a if isinstance(a, ndarray) and dtype in (None, a.dtype) \
        else _wrap(np.array(a, dtype=dtype, copy=True))   # host -> "device" is a copy
    cp.array = lambda a, dtype=None, copy=True, order="K": _wrap(np.array(a, dtype=dtype, copy=copy, order=order))
    cp.ascontiguousarray = lambda a, dtype=None: _wrap(np.ascontiguousarray(a, dtype=dtype))
    cp.concatenate = lambda arrays, axis=0, out=None: np.concatenate(arrays, axis=axis, out=out)
    cp.asnumpy = lambda a: np.array(np.asarray(a).view(np.ndarray), copy=True)
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, memcpyAsync=_memcpy_async, memcpyHostToDevice=1,
        memcpyDeviceToHost=2, getDeviceProperties=lambda i: {"name": b"fake GPU (NumPy)"})
    cp.cuda = types.SimpleNamespace(
        runtime=runtime, Device=_Device, Event=_Event, Stream=_Stream,
        get_current_stream=lambda: _Stream(), alloc_pinned_memory=lambda n: bytearray(n))
    sys.modules["cupy"] = cp
    return cp

"""Array backends: NumPy on the host, CuPy on a GPU, and the two ways device buffers reach MPI.

The ring in algorithms/ring.py only slices arrays, calls a `reduce` ufunc and hands views to Sendrecv,
so it runs unchanged on CuPy arrays. What differs on a GPU is how bytes get from device
memory onto the network. There are two transports:

* **CUDA-aware MPI.** Some MPI builds (Open MPI or MPICH built with CUDA, MVAPICH2-GDR, ...)
  accept device pointers: mpi4py sees a CuPy array's `__cuda_array_interface__` and passes the
  pointer straight through. The plain ring runs on device views; the only care needed is to
  finish pending GPU work before MPI reads memory (MPI does not know about CUDA streams).

* **Staged through pinned host memory.** Any other MPI only understands host memory. Each
  ring step copies the outgoing chunk device -> pinned host, exchanges host buffers, copies
  the incoming chunk host -> device and reduces it on the GPU. Page-locked ("pinned") host
  buffers, allocated once and reused, let the copies run asynchronously (cudaMemcpyAsync).
  A chunk is sent in segments, so the copy of segment i+1 overlaps the send of segment i and
  the GPU reduces segment i while segment i+1 is still on the wire.

The staged ring (algorithms/staged.py) is written against a small interface, `Stager` (async copies, a device
reduction, events). `CupyDevice` implements it on a real GPU; the tests also run it with a
NumPy stand-in that queues work like a CUDA stream, so the staging bookkeeping is checked on
any CPU. That is logic coverage only: it says nothing about the GPU code paths.

CuPy is imported only when a CuPy array shows up or the user asks for the GPU (`use_gpu`).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from mpi4py import MPI

from .. import config
from ..config import Settings
from ..context import World, is_initialized, local_rank, world

CUDA_AWARE = "cuda-aware"
STAGED = "staged"


class GPUUnavailable(RuntimeError):
    """CuPy or a usable CUDA device is missing; the message says which, in one line."""


# --- which backend holds an array ------------------------------------------------------------

def array_module(x: object) -> Any:
    """`cupy` for a CuPy array, else `numpy`. Never imports CuPy: if it is not imported yet,
    `x` cannot be a CuPy array."""
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(x, cp.ndarray):
        return cp
    return np


def is_device_array(x: object) -> bool:
    """True for a CuPy (GPU) array."""
    return array_module(x) is not np


def on_device_of(x: object) -> Any:
    """A context manager that makes `x`'s GPU the current device (no-op for host arrays):
    new CuPy arrays are then allocated beside `x`, not on whichever device is current."""
    return x.device if is_device_array(x) else contextlib.nullcontext()


def contiguous_copy(x: Any) -> Any:
    """A fresh C-contiguous copy of `x` on the same backend (host or device)."""
    return array_module(x).array(x, order="C", copy=True)


def import_cupy() -> Any:
    """Import CuPy, or raise GPUUnavailable with the one-line reason."""
    try:
        import cupy
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install
        raise GPUUnavailable(f"CuPy is not installed or does not import ({type(exc).__name__}: "
                             f"{exc}); install it with pip install 'ringsync[gpu]'") from None
    return cupy


def device_count() -> int:
    """How many CUDA devices CuPy sees; raises GPUUnavailable when there are none."""
    cp = import_cupy()
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError: no driver, no device, ...
        raise GPUUnavailable(f"CuPy {cp.__version__} is installed but no CUDA device is usable: "
                             f"{str(exc).splitlines()[0]}") from None
    if count < 1:
        raise GPUUnavailable(f"CuPy {cp.__version__} is installed but sees no CUDA device")
    return count


def gpu_unavailable_reason() -> str | None:
    """None when CuPy and at least one CUDA device are usable, else why not (one line)."""
    try:
        device_count()
    except GPUUnavailable as exc:
        return str(exc)
    return None


def choose_device(count: int, local: int, device: int | None = None) -> int:
    """The GPU this rank uses: `device` if given, else RINGSYNC_GPU_DEVICE, else local rank mod count.

    Ranks on one node take devices round-robin, so 2 ranks on a 1-GPU node share device 0.
    """
    if device is None:
        device = config.env_int("RINGSYNC_GPU_DEVICE", -1, minimum=-1)
        if device == -1:
            return local % count
    if isinstance(device, bool) or not isinstance(device, (int, np.integer)):
        raise TypeError(f"device must be an int, got {type(device).__name__}")
    if not 0 <= device < count:
        raise ValueError(f"device must be in [0, {count}) on this node, got {device}")
    return int(device)


def use_gpu(device: int | None = None) -> int:
    """Make a CUDA device current for this rank (see choose_device) and return its index.

    Raises GPUUnavailable (one-line reason) without CuPy or a device. Also settles the transport.
    """
    cp = import_cupy()
    index = choose_device(device_count(), local_rank(), device)
    cp.cuda.Device(index).use()
    transport()
    return index


def gpu_module_or_reason(device: int | None = None) -> tuple[Any, str | None]:
    """(cupy, None) with this rank's device made current, or (None, the one-line reason)."""
    try:
        use_gpu(device)
    except (GPUUnavailable, ValueError, TypeError) as exc:
        return None, str(exc)
    return import_cupy(), None


# --- reusable buffers ------------------------------------------------------------------------

class ScratchCache:
    """Reusable 1-D buffers keyed by (kind, dtype): allocated on first use, regrown only when
    a larger one is needed, so the hot path does not allocate (pinned memory is slow to get)."""

    def __init__(self, allocators: dict[str, Callable[[int, np.dtype], Any]]) -> None:
        self._allocators = allocators
        self._buffers: dict[tuple[str, np.dtype], Any] = {}
        self.allocations = 0

    def get(self, kind: str, count: int, dtype: Any) -> Any:
        key = (kind, np.dtype(dtype))
        buf = self._buffers.get(key)
        if buf is None or buf.size < count:
            buf = self._allocators[kind](max(count, 1), key[1])
            self._buffers[key] = buf
            self.allocations += 1
        return buf[:count]


def _pinned_empty(cp: Any, count: int, dtype: np.dtype) -> np.ndarray:
    """A NumPy array in page-locked host memory: the GPU's DMA engines copy it asynchronously."""
    memory = cp.cuda.alloc_pinned_memory(count * dtype.itemsize)
    return np.frombuffer(memory, dtype, count)


# --- the staging interface -------------------------------------------------------------------

class Stager(Protocol):
    """What the staged transport needs from a device. Work is queued in order (like one CUDA
    stream); the host sees its effects only after wait() on an event recorded after it."""

    def scratch(self, kind: str, count: int, dtype: Any) -> Any:
        """'device' memory, or 'pinned' / 'inbox' host memory, reused across calls."""

    def to_host(self, src: Any, dst: np.ndarray) -> None:
        """Queue a copy of the device view `src` into the host view `dst` (same size)."""

    def to_device(self, src: np.ndarray, dst: Any) -> None:
        """Queue a copy of the host view `src` into the device view `dst`."""

    def reduce(self, ufunc: np.ufunc, acc: Any, other: Any) -> None:
        """Queue acc = ufunc(acc, other) on the device."""

    def record(self) -> Any:
        """An event marking everything queued so far."""

    def wait(self, event: Any) -> None:
        """Block the host until the work before `event` is done."""


class CupyDevice:
    """The Stager on a real GPU: CuPy arrays, pinned host buffers, cudaMemcpyAsync and events
    on the caller's current stream (so our work is ordered after the user's kernels)."""

    def __init__(self, cp: Any, cache: ScratchCache) -> None:
        self.cp = cp
        self.cache = cache
        self.stream = cp.cuda.get_current_stream()

    def scratch(self, kind: str, count: int, dtype: Any) -> Any:
        return self.cache.get(kind, count, dtype)

    def _copy(self, dst_ptr: int, src_ptr: int, nbytes: int, kind: int) -> None:
        if nbytes:
            self.cp.cuda.runtime.memcpyAsync(dst_ptr, src_ptr, nbytes, kind, self.stream.ptr)

    def to_host(self, src: Any, dst: np.ndarray) -> None:
        self._copy(dst.ctypes.data, src.data.ptr, src.nbytes, self.cp.cuda.runtime.memcpyDeviceToHost)

    def to_device(self, src: np.ndarray, dst: Any) -> None:
        self._copy(dst.data.ptr, src.ctypes.data, src.nbytes, self.cp.cuda.runtime.memcpyHostToDevice)

    def reduce(self, ufunc: np.ufunc, acc: Any, other: Any) -> None:
        getattr(self.cp, ufunc.__name__)(acc, other, out=acc)   # cupy.add, cupy.minimum, ...

    def record(self) -> Any:
        event = self.cp.cuda.Event(disable_timing=True)
        event.record(self.stream)
        return event

    def wait(self, event: Any) -> None:
        event.synchronize()


def cupy_device(w: World, cp: Any) -> CupyDevice:
    """The CupyDevice for the current device, with its buffers cached on the World."""
    index = cp.cuda.Device().id
    cache = w.device_caches.get(index)
    if cache is None:
        cache = ScratchCache({
            "device": lambda n, dt: cp.empty(n, dtype=dt),
            "pinned": lambda n, dt: _pinned_empty(cp, n, dt),
            "inbox": lambda n, dt: _pinned_empty(cp, n, dt),
        })
        w.device_caches[index] = cache
    return CupyDevice(cp, cache)


# --- which transport -------------------------------------------------------------------------

def _mpix_query_cuda_support() -> Callable[[], int] | None:
    """MPIX_Query_cuda_support from the MPI library mpi4py loaded (Open MPI, MPICH >= 4)."""
    try:
        function = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return None
    function.restype, function.argtypes = ctypes.c_int, []
    return function


def mpi_cuda_support() -> tuple[bool, str]:
    """Ask the MPI library whether it takes device pointers: (answer, how we found out)."""
    query = getattr(MPI, "Query_cuda_support", None)       # mpi4py may grow this one day
    if query is not None:
        return bool(query()), "MPI.Query_cuda_support()"
    vendor = MPI.get_vendor()[0]
    if vendor == "MPICH" and os.environ.get("MPIR_CVAR_ENABLE_GPU", "").strip().lower() in (
            "0", "false", "no"):
        return False, "MPIR_CVAR_ENABLE_GPU=0 turns MPICH's GPU support off"
    query = _mpix_query_cuda_support()
    if query is not None:
        return bool(query()), "MPIX_Query_cuda_support()"
    ompi_info = shutil.which("ompi_info")
    if vendor == "Open MPI" and ompi_info:
        try:
            text = subprocess.run([ompi_info, "--parsable", "--all"], capture_output=True,
                                  text=True, timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        return "mpi_built_with_cuda_support:value:true" in text, "ompi_info"
    return False, f"{vendor} offers no way to ask"


def decide_transport(setting: str, probe: Callable[[], tuple[bool, str]]) -> tuple[str, str]:
    """RINGSYNC_CUDA_AWARE's value ('auto', '0', '1') and the MPI probe -> (transport, why)."""
    if setting == "1":
        return CUDA_AWARE, "RINGSYNC_CUDA_AWARE=1"
    if setting == "0":
        return STAGED, "RINGSYNC_CUDA_AWARE=0"
    supported, how = probe()
    return (CUDA_AWARE if supported else STAGED), f"auto: {how} says {'yes' if supported else 'no'}"


def transport(w: World | None = None) -> str:
    """'cuda-aware' or 'staged': how this rank moves device buffers. Decided once per World,
    from RINGSYNC_CUDA_AWARE (auto|0|1) and, for auto, the MPI library's own answer.
    Every rank must end up with the same one: the staged transport sends a chunk in segments,
    the CUDA-aware one in one message. One MPI installation answers `auto` alike on every
    rank; with a mix of installations, set RINGSYNC_CUDA_AWARE explicitly everywhere."""
    w = w or world()
    if w.device_transport is None:
        w.device_transport = decide_transport(w.settings.cuda_aware, mpi_cuda_support)
    return w.device_transport[0]


def force_transport(name: str | None, w: World | None = None) -> None:
    """Use transport `name` ('cuda-aware' or 'staged') from now on; None decides afresh.
    For tests and benchmarks that compare the two; users set RINGSYNC_CUDA_AWARE instead."""
    w = w or world()
    if name is None:
        w.device_transport = None
    elif name in (CUDA_AWARE, STAGED):
        w.device_transport = (name, "forced")
    else:
        raise ValueError(f"name must be {CUDA_AWARE!r}, {STAGED!r} or None, got {name!r}")


def staging_segment(itemsize: int, segment_bytes: int) -> int:
    """Elements per staged segment of `segment_bytes` (RINGSYNC_STAGING_SEGMENT, default 1 MiB)."""
    return max(1, segment_bytes // itemsize)


def synced_reduce(ufunc: Any, stream: Any) -> Callable[..., None]:
    """A reduce for the CUDA-aware ring: the kernel, then wait for it, because the next
    Sendrecv hands the result to MPI, which does not follow CUDA streams."""
    def reduce(a: Any, b: Any, out: Any) -> None:
        ufunc(a, b, out=out)
        stream.synchronize()
    return reduce


def describe(w: World | None = None) -> str:
    """One line: CuPy and device, or why not; the transport and why it was chosen.

    For the World `w` (default: the current one); with no World, as init() would decide it
    for this process (MPI's local rank, RINGSYNC_CUDA_AWARE), without starting ringsync."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        return f"GPU: unavailable ({reason})"
    cp = import_cupy()
    if w is None and is_initialized():
        w = world()
    if w is not None:
        rank, local = w.rank, w.local_comm.Get_rank()
        transport(w)
        how, why = w.device_transport
    else:
        rank, local = MPI.COMM_WORLD.Get_rank(), _local_rank_in_world()
        how, why = decide_transport(Settings.from_env().cuda_aware, mpi_cuda_support)
    index = choose_device(device_count(), local)
    name = cp.cuda.runtime.getDeviceProperties(index)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)   # bytes in older CuPy
    return f"GPU: CuPy {cp.__version__}, rank {rank} -> device {index} ({name}); transport {how} ({why})"


def _local_rank_in_world() -> int:
    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank()
    finally:
        local.Free()


def main(argv: list[str] | None = None) -> int:
    """`python -m ringsync.transport.gpu [--require-gpu]`: print describe() on rank 0; with
    --require-gpu, return 2 when no GPU is usable."""
    line = describe()
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(line, flush=True)
    argv = sys.argv[1:] if argv is None else argv
    return 2 if "--require-gpu" in argv and gpu_unavailable_reason() is not None else 0


if __name__ == "__main__":
    sys.exit(main())

"""Copies into and out of shared memory that step around a trap in memcpy.

The shared-memory path (algorithms/shared.py) moves data with plain copies, `slot[...] = x`,
which NumPy hands to the C library's memcpy. glibc copies from about 2 KB up to the size
of the L2 cache with `rep movsb` on processors that announce fast short rep movsb (FSRM),
AMD Zen 3 and 4 among them; and on those AMD processors `rep movsb` slows down many times
when the destination lies a few bytes past the source, counted modulo the 4 KB page
(sourceware.org bug 30994). On this project's machine (AMD EPYC, glibc 2.36) a 256 KB copy
takes 10 to 16 times as long when the destination's address minus the source's is 16
modulo 4096 (benchmarks/handoff.py measures it). A slot lies at a fixed place, the user's
buffer wherever NumPy put it, so about one buffer in a hundred falls in the trap, on every
call, for as long as it lives: the all-reduce of such a 256 KB buffer took three times as long.

copy_() looks at the two addresses first (remembered per array: cheap next to a copy of 128 KB)
and, in the trap, copies with a NumPy loop instead of memcpy: a bitwise OR with 0 on unsigned
views of the same bytes, the same bits in every case (NaN payloads and -0.0 included). Only
copies smaller than the L2 cache are checked (glibc copies larger ones without rep movsb),
and only on AMD processors with fast short rep movsb under glibc: elsewhere there is no trap.
"""
from __future__ import annotations

import ctypes
import os
import platform
import weakref

import numpy as np

PAGE = 4096
TRAP_BYTES = 64             # a destination 1..63 bytes past the source (mod PAGE) is in the trap
CHECKED_BYTES = 128 << 10   # smaller copies are not checked: the look costs 2-3 us, the trap them less
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _trap_ends() -> int:
    """Where the trap ends: this core's L2 cache size, since glibc on AMD stops using rep
    movsb there (dl-cacheinfo.h); 1 MiB where Linux does not say. 0 (no trap, nothing is
    checked) unless this is an AMD processor with fast short rep movsb, under glibc."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = f.read(1 << 16)
    except OSError:
        return 0
    if "AuthenticAMD" not in cpu or " fsrm" not in cpu or platform.libc_ver()[0] != "glibc":
        return 0
    caches = "/sys/devices/system/cpu/cpu0/cache"
    try:
        indexes = sorted(os.listdir(caches))
    except OSError:
        return 1 << 20
    for index in indexes:
        try:
            with open(f"{caches}/{index}/level") as level, open(f"{caches}/{index}/size") as size:
                if level.read().strip() == "2":
                    text = size.read().strip().upper()        # "512K"
                    shift = {"K": 10, "M": 20}.get(text[-1:], 0)
                    return int(text[:-1] if shift else text) << shift
        except (OSError, ValueError):
            continue
    return 1 << 20


TRAP_ENDS = _trap_ends()    # larger copies are not checked: memcpy no longer uses rep movsb


# Addresses looked up before, by array object: a slot's view, or a buffer the caller passes
# every step, costs a dictionary look-up instead of 1-3 us. The weak reference tells a live
# array from a new one that took a dead one's id. (An array resized in place would keep a
# stale address: a slower copy at worst, never a wrong one.)
_known: dict[int, tuple[weakref.ref, int]] = {}


def address(a: np.ndarray) -> int:
    """Where `a`'s first byte lies."""
    known = _known.get(id(a))
    if known is not None and known[0]() is a:
        return known[1]
    try:                                # (ctypes: a third of what __array_interface__ costs)
        at = ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):     # read-only, or empty
        at = a.__array_interface__["data"][0]
    if len(_known) >= 4096:
        _known.clear()
    _known[id(a)] = (weakref.ref(a), at)
    return at


def in_trap(dst: int, src: int) -> bool:
    """Whether memcpy from address `src` to `dst` is in the trap (module docstring)."""
    return 0 < (dst - src) % PAGE < TRAP_BYTES


def copy_(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src, never through memcpy's trap (for two C-contiguous arrays of one dtype
    and shape; anything else is simply assigned)."""
    if CHECKED_BYTES <= dst.nbytes < TRAP_ENDS and dst.dtype == src.dtype and dst.shape == src.shape \
            and dst.flags.c_contiguous and src.flags.c_contiguous and in_trap(address(dst), address(src)):
        bits = np.uint32 if dst.nbytes % 4 == 0 else _BITS[dst.itemsize]     # (NumPy's fastest loop)
        np.bitwise_or(src.reshape(-1).view(bits), 0, out=dst.reshape(-1).view(bits))
    else:
        dst[...] = src

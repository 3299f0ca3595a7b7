"""Command lines (ringsync-train, ringsync-report, the benchmarks): every mistake exits 2 with
one line, `PROG: error: what went wrong`, printed once (by rank 0), and no traceback."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn


def world_rank() -> int:
    """This process's rank in MPI_COMM_WORLD: from MPI once it is started, else from the
    launcher's environment (so a command can fail before MPI starts), else 0."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        return mpi.COMM_WORLD.Get_rank()
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def fail(prog: str, message: str) -> NoReturn:
    """Print `prog: error: message` (its first line) on rank 0 and exit 2 on every rank."""
    if world_rank() == 0:
        first = message.splitlines()[0] if message else "error"
        sys.stderr.write(f"{prog}: error: {first}\n")
        sys.stderr.flush()
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see {self.prog} --help)")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= low (ringsync-train and the benchmarks)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def float_at_least(low: float) -> Callable[[str], float]:
    """An argparse type: a finite number >= low."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low}, got {text}")
        return value
    return parse


RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_rate(text: str) -> int | None:
    """'1gbit' -> 10**9 bits/s (tc's units, powers of ten); 'none' or 'unshaped' -> None."""
    if text.lower() in ("none", "unshaped"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?bit)", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (e.g. 100mbit, 1gbit, 10gbit, none)")
    return int(float(m.group(1)) * RATE_UNITS[m.group(2)])


SIZE_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """'4K' -> 4096, '64M' -> 67108864, '100' -> 100 (binary suffixes, as nccl-tests)."""
    t = str(text).strip().upper().removesuffix("B")
    suffix = t[-1:] if t[-1:] in SIZE_SUFFIX and t[-1:] != "" else ""
    number = t[:-1] if suffix else t
    try:
        value = int(number) * SIZE_SUFFIX[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 4096, 4K, 64M, 1G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return value

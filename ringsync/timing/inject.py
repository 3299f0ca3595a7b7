"""Straggler injection, for experiments and teaching: delays added to every step's compute.

`--straggler RANK:SECONDS` slows one rank by a fixed amount; `--jitter exp:MEAN` or
`--jitter uniform:MAX` adds a random delay on every rank, so the cost of slow or noisy nodes
can be reproduced on one machine.
"""
from __future__ import annotations

import time

import numpy as np

JITTER_KINDS = ("exp", "uniform")


def parse_straggler(text: str) -> tuple[int, float]:
    """'RANK:SECONDS' -> (rank, seconds), e.g. '2:0.05'; ValueError naming the text otherwise."""
    rank, sep, seconds = str(text).partition(":")
    try:
        r, s = int(rank), float(seconds)
    except ValueError:
        r, s = -1, -1.0
    if not sep or r < 0 or not s >= 0 or s == float("inf"):
        raise ValueError(f"straggler must be RANK:SECONDS with RANK >= 0 and SECONDS >= 0, got {text!r}")
    return r, s


def parse_jitter(text: str) -> tuple[str, float]:
    """'exp:MEAN' (exponential) or 'uniform:MAX' (uniform on [0, MAX]) -> (kind, seconds)."""
    kind, sep, scale = str(text).partition(":")
    try:
        s = float(scale)
    except ValueError:
        s = -1.0
    if not sep or kind not in JITTER_KINDS or not 0 <= s < float("inf"):
        raise ValueError(f"jitter must be exp:SECONDS or uniform:SECONDS with SECONDS >= 0, got {text!r}")
    return kind, s


class Delays:
    """Sleeps added to every step's compute: a fixed one per straggler rank, plus random jitter."""

    def __init__(self, rank: int, stragglers: dict[int, float] | None = None,
                 jitter: str | None = None, seed: int = 0) -> None:
        self.fixed = float((stragglers or {}).get(rank, 0.0))
        self.jitter = parse_jitter(jitter) if jitter else None
        self.rng = np.random.default_rng([seed, rank])    # reproducible, different per rank

    def __bool__(self) -> bool:
        return self.fixed > 0 or self.jitter is not None

    def __call__(self) -> float:
        seconds = self.fixed
        if self.jitter:
            kind, scale = self.jitter
            seconds += self.rng.exponential(scale) if kind == "exp" else self.rng.uniform(0, scale)
        if seconds > 0:
            time.sleep(seconds)
        return seconds

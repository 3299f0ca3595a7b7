"""The learning curve every mode reports, and the time, steps and samples to a target accuracy.

During training a mode only copies the parameters at a fixed interval (a memcpy: the run's
timing is untouched); after training, rank 0 evaluates every copy on the training set
(loss) and the held-out set (accuracy). The curve's units are the mode's: steps for bsp,
backup and local (each uses every rank's batch), updates for ssp and async (each uses one
worker's batch). `samples_per_unit` turns either into gradient evaluations, the fair axis.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


class Curve:
    """Parameter snapshots at every `interval` units, with the wall time since start()."""

    def __init__(self, interval: int, samples_per_unit: int) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.interval, self.samples_per_unit = interval, samples_per_unit
        self.snapshots: list[tuple[float, int, int, np.ndarray]] = []
        self.next_mark = interval
        self.t0 = time.perf_counter()

    def start(self, units_done: int = 0) -> None:
        self.t0 = time.perf_counter()
        self.next_mark = (units_done // self.interval + 1) * self.interval

    def due(self, units: int) -> bool:
        return units >= self.next_mark

    def record(self, units: int, params: np.ndarray, wall_s: float | None = None,
               samples: int | None = None) -> None:
        """Keep a copy of `params` as the point at `units` (call when due()). `samples`, if
        given, replaces units x samples_per_unit (a mode whose units cost unequal samples)."""
        wall = time.perf_counter() - self.t0 if wall_s is None else wall_s
        samples = units * self.samples_per_unit if samples is None else samples
        self.snapshots.append((wall, units, samples, np.array(params, copy=True)))
        self.advance(units)

    def advance(self, units: int) -> None:
        """Move the next mark past `units` (a caller that keeps its own copy at this point)."""
        self.next_mark = (units // self.interval + 1) * self.interval

    def maybe(self, units: int, params: np.ndarray) -> None:
        if self.due(units):
            self.record(units, params)

    def points(self, evaluate_train: Callable[[np.ndarray], float],
               evaluate_test: Callable[[np.ndarray], float]) -> list[dict]:
        """Evaluate every snapshot: [{wall_s, units, samples, train_loss, test_accuracy}]."""
        out = []
        for wall, units, samples, params in self.snapshots:
            out.append({"wall_s": round(wall, 6), "units": units, "samples": samples,
                        "train_loss": float(evaluate_train(params)),
                        "test_accuracy": float(evaluate_test(params))})
        return out


def to_accuracy(points: list[dict], target: float | None) -> dict:
    """The first curve point at or above `target` test accuracy: its time, units and samples
    (None for each when no point reaches it, or no target was given)."""
    hit = next((p for p in points if target is not None and p["test_accuracy"] >= target), None)
    return {"target_accuracy": target,
            "time_to_accuracy_s": hit["wall_s"] if hit else None,
            "steps_to_accuracy": hit["units"] if hit else None,
            "samples_to_accuracy": hit["samples"] if hit else None}

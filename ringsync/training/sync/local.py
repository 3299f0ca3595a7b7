"""`--sync local:H`: local SGD (Lin et al., ICLR 2020; PyTorch's PeriodicModelAverager).

Each rank steps on its own gradients, with no communication, and every H steps the ranks
average their parameters with one ring all-reduce. Between averagings the models drift
apart; just before each averaging this records how far: the root-mean-square over ranks of
||w_r - mean(w)||, relative to ||mean(w)|| (param_divergence in the report).

Momentum: each rank keeps its own momentum buffer, built from its own gradients, and it is
NOT averaged (PyTorch's PeriodicModelAverager and Lin et al. do the same: only the model is
averaged). So with momentum the ranks' velocities differ even right after an averaging,
and local:1 equals bsp only without momentum (plain SGD), to rounding: the average of
w - lr*g_r is w - lr*mean(g_r), but computed in another order.

The batches are bsp's: step t uses global batch t, rank r its slice of it. The run always
ends with an averaging, so the final model is the ranks' average, the same on every rank.
Checkpoints are refused: one file cannot hold p different momentum buffers.
"""
from __future__ import annotations

import numpy as np

import ringsync as rs

from . import common


class Local:
    """One rank's side of local:H: apply_update() replaces the trainer's update phase."""

    name = "local"

    def __init__(self, period: int, params, optimizer) -> None:
        if period < 1:
            raise ValueError(f"local:H needs H >= 1, got {period}")
        common.agree_settings([period, params.data.size], "local:H settings (H, parameter count)")
        self.period, self.params, self.optimizer = period, params, optimizer
        self.divergence: list[tuple[int, float]] = []     # (step, relative drift) at each averaging
        self.steps = 0

    def exchange(self, grad: np.ndarray) -> None:
        """Local SGD sends no gradient: each rank keeps its own."""

    def apply_update(self) -> None:
        """This rank's own SGD step; every H-th step, then, the ranks average their models."""
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.period == 0:
            self.average()

    def average(self) -> None:
        """One ring all-reduce of the parameters (Average), and the drift it removed."""
        w = self.params.data
        mine = w.copy()
        rs.allreduce_(w, op=rs.Average)
        drift = mine.astype(np.float64) - w
        sums = rs.allreduce(np.array([float(drift @ drift), float(w.astype(np.float64) @ w)]), op=rs.Sum)
        p = rs.size()
        norm = np.sqrt(sums[1] / p)
        self.divergence.append((self.steps, float(np.sqrt(sums[0] / p) / norm) if norm else 0.0))

    def averaged(self) -> bool:
        return self.steps % self.period == 0

    def close(self) -> dict:
        """Average once more if the run stopped between averagings; report the drift."""
        if not self.averaged():
            self.average()
        values = [d for _, d in self.divergence]
        return {"param_divergence": {**common.summary(values), "period": self.period,
                                     "definition": "RMS over ranks of ||w_r - mean w|| / ||mean w||, "
                                                   "just before each averaging",
                                     "points": [[s, round(d, 8)] for s, d in self.divergence]}}

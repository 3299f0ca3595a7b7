"""The straggler report: from each rank's raw step durations to compute / wait / transfer.

Pure arithmetic on (ranks, steps) arrays, no MPI: timing.py gathers the durations and calls
these; ringsync-report and the tests call them on saved figures. See timing.py for why
wait_r = sync_r - min over ranks (sync) needs no agreement between the ranks' clocks.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def split_steps(step_s: np.ndarray, barrier_s: np.ndarray, collective_s: np.ndarray,
                mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(compute, wait, transfer) per rank and step from (ranks, steps) arrays of raw durations.

    The rank with the shortest time in the synchronization point arrived last: its surplus over
    that shortest time is every other rank's wait. compute + wait + transfer = step_s.
    """
    basis = barrier_s if mode == "barrier" else collective_s
    wait = basis - basis.min(axis=0, keepdims=True) if basis.size else basis.copy()
    sync = barrier_s + collective_s
    return step_s - sync, wait, sync - wait


def straggler_report(step_s: np.ndarray, barrier_s: np.ndarray, collective_s: np.ndarray,
                     mode: str) -> dict[str, Any]:
    """The straggler report from (ranks, steps) arrays of raw per-step durations.

    cost_s is the rank-seconds all ranks spent waiting; cost_fraction divides it by the
    rank-seconds the steps took in all, i.e. the share of the run lost to waiting.
    """
    step_s, barrier_s, collective_s = (np.asarray(a, dtype=np.float64).reshape(np.shape(step_s))
                                       for a in (step_s, barrier_s, collective_s))
    if step_s.ndim != 2 or step_s.shape[0] < 1:
        raise ValueError(f"durations must be (ranks, steps) arrays, got shape {step_s.shape}")
    compute, wait, transfer = split_steps(step_s, barrier_s, collective_s, mode)
    p, steps = step_s.shape
    basis = barrier_s if mode == "barrier" else collective_s
    # Each step's slowest rank is the one that waited least: everybody waited for it.
    synced = (barrier_s + collective_s).max(axis=0) > 0
    slowest = np.bincount(basis.argmin(axis=0)[synced], minlength=p) if steps else np.zeros(p, int)
    # Overall: the rank that was slowest most often; ties go to the one that computed longest.
    slowest_rank = int(max(range(p), key=lambda r: (slowest[r], compute[r].sum())))
    cost = float(wait.sum())
    total = float(step_s.sum())
    return {
        "ranks": [{"rank": r, "compute_s": float(compute[r].sum()), "wait_s": float(wait[r].sum()),
                   "allreduce_s": float(transfer[r].sum()), "steps_slowest": int(slowest[r])}
                  for r in range(p)],
        "straggler": {"slowest_rank": slowest_rank, "cost_s": cost,
                      "cost_fraction": cost / total if total > 0 else 0.0,
                      "mode": mode, "steps": steps,
                      "wall_s": float(step_s.sum(axis=1).mean()) if steps else 0.0,
                      "wait_per_step_s": [[round(float(w), 6) for w in row] for row in wait]},
    }


def overlap_report(comm_s: np.ndarray, hidden_s: np.ndarray) -> dict[str, Any]:
    """The communication thread's time per rank and step (comm_s), split into the part that
    ran during the step's compute (hidden) and after it (exposed): (ranks, steps) arrays."""
    comm_s, hidden_s = np.asarray(comm_s, dtype=np.float64), np.asarray(hidden_s, dtype=np.float64)
    exposed_s = comm_s - hidden_s
    total = float(comm_s.sum())
    per_step = {name: [[round(float(v), 6) for v in row] for row in a]
                for name, a in (("comm_s", comm_s), ("hidden_s", hidden_s), ("exposed_s", exposed_s))}
    return {
        "ranks": [{"rank": r, "comm_s": float(comm_s[r].sum()), "hidden_s": float(hidden_s[r].sum()),
                   "exposed_s": float(exposed_s[r].sum())} for r in range(comm_s.shape[0])],
        "hidden_fraction": float(hidden_s.sum()) / total if total > 0 else 0.0,
        "per_step": per_step,
    }


def merge_report(doc: dict[str, Any], report: dict[str, Any] | None) -> dict[str, Any]:
    """Put the straggler report into a report JSON document: the timing fields into each
    doc["ranks"][i] (created if missing) and the `straggler` block at the top. Returns doc."""
    if report is None:
        return doc
    rows = doc.setdefault("ranks", [])
    rows.extend({"rank": r} for r in range(len(rows), len(report["ranks"])))
    for row, timing_row in zip(rows, report["ranks"]):
        row.update(timing_row)
    doc["straggler"] = report["straggler"]
    if "overlap" in report:
        doc["overlap"] = report["overlap"]
    return doc


def format_report(report: dict[str, Any]) -> str:
    """The straggler report as a plain-text table (what ringsync-train prints at the end)."""
    st, p = report["straggler"], len(report["ranks"])
    steps = st["steps"]
    lines = [f"straggler report: {p} rank(s), {steps} step(s), timing mode {st['mode']}",
             f"{'rank':>5} {'compute_s':>10} {'wait_s':>10} {'allreduce_s':>12} {'steps_slowest':>14}"]
    for row in report["ranks"]:
        lines.append(f"{row['rank']:>5} {row['compute_s']:>10.4f} {row['wait_s']:>10.4f} "
                     f"{row['allreduce_s']:>12.4f} {row['steps_slowest']:>14}")
    slow = report["ranks"][st["slowest_rank"]]["steps_slowest"]
    host = f" on {st['slowest_host']}" if "slowest_host" in st else ""
    lines.append(f"slowest rank: {st['slowest_rank']}{host} (the last to arrive in {slow} of {steps} steps)")
    lines.append(f"straggler cost: {st['cost_s']:.4f} rank-seconds spent waiting = "
                 f"{100 * st['cost_fraction']:.1f}% of {p} rank(s) x {st['wall_s']:.3f} s")
    return "\n".join(lines)


def format_overlap(overlap: dict[str, Any]) -> str:
    """The overlap block as text: per rank the communication thread's time, hidden and exposed."""
    lines = [(f"overlap: {100 * overlap['hidden_fraction']:.1f}% of the communication thread's time "
             "ran during backward (hidden)"),
             f"{'rank':>5} {'comm_s':>10} {'hidden_s':>10} {'exposed_s':>10}"]
    for row in overlap["ranks"]:
        lines.append(f"{row['rank']:>5} {row['comm_s']:>10.4f} {row['hidden_s']:>10.4f} {row['exposed_s']:>10.4f}")
    return "\n".join(lines)

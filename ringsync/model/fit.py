"""Fitting the model to measurements: the benchmarks' JSON in, a Calibration out.

Each measured median (an implementation, a size, a cluster shape, a link rate) becomes one
equation: measured seconds = Σ coefficient x parameter, with the coefficients from
algorithms.py. Least squares over all of them, weighted by 1/measured (so a 4 KB call's
error counts as much as a 64 MB call's, relatively), with every parameter kept >= 0. The
net's α and β are fitted per link rate: one pair per rate found in the files.

What it reads:
  * make cluster-bench's JSON (benchmarks/cluster_bench.py): hosts x ranks per host at a
    link rate; "ringsync" (the default path) and "teaching" (ring.py's flat ring over MPI)
  * benchmarks/allreduce_sweep.py's JSON: one host, "ringsync" and "teaching"
MPI's own Allreduce is not fitted (its algorithm is MPI's choice), only compared with.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..config import Settings
from .algorithms import Terms, ring, ringsync_terms, seconds
from .params import Calibration, Topology

FITTED_IMPLS = ("ringsync", "teaching")
LOCAL = ("gamma", "shm.sync", "shm.copy", "local.alpha", "local.beta")     # the parameters within a host
ALIASES = {"flat ring (p2p)": "teaching"}      # cluster_bench's names for allreduce_sweep's


class Observation(NamedTuple):
    """One measured median and what the model says that call does."""

    source: str             # the file
    mpi: str                # the MPI library (its name's first word)
    topology: Topology
    impl: str
    size: int               # bytes
    seconds: float          # the measured median
    terms: Terms
    burst: int = 0          # the link shaper's burst (bytes): below 4 x burst, the rate does not bind


def impl_terms(impl: str, size: int, top: Topology, settings: Settings) -> Terms:
    """The Terms of a benchmark's implementation: ringsync's default path, or the plain ring."""
    if impl == "ringsync":
        return ringsync_terms(size, top, settings)
    if impl == "teaching":
        return ring(size, top)
    raise ValueError(f"no model of implementation {impl!r}")


def read(path: str | Path) -> list[Observation]:
    """The observations in one benchmark JSON file (ValueError naming the file if it is none)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    out = []
    try:
        if isinstance(data, dict) and data.get("benchmark") == "cluster_bench":
            for config in data["configs"]:
                top = Topology((int(config["ranks_per_host"]),) * int(config["hosts"]), config["rate_bps"])
                mpi, burst = str(config["mpi"]), int(config.get("burst_bytes") or 0)
                for row in config["rows"]:
                    impl = ALIASES.get(row["impl"], row["impl"])
                    if impl in FITTED_IMPLS:
                        size = int(row["size"])
                        out.append(Observation(str(path), mpi, top, impl, size, row["time_us"] * 1e-6,
                                               impl_terms(impl, size, top, Settings()), burst))
        elif isinstance(data, dict) and data.get("meta", {}).get("benchmark") == "allreduce_sweep":
            meta = data["meta"]
            top = Topology((int(meta["ranks"]),))
            mpi = str(meta["machine"]["mpi"]).split()[0].lower().replace("open", "openmpi").rstrip(",")
            env = meta.get("ringsync_env") or {}
            if env.get("RINGSYNC_MODEL"):
                raise ValueError("a run whose algorithms the model chose (RINGSYNC_MODEL): fit runs of the thresholds")
            settings = _settings(env)
            for row in data["results"]:
                if row["impl"] in FITTED_IMPLS and row.get("device", "cpu") == "cpu":
                    size = int(row["size"])
                    out.append(Observation(str(path), mpi, top, row["impl"], size, row["time_us"] * 1e-6,
                                           impl_terms(row["impl"], size, top, settings)))
        else:
            raise ValueError("neither cluster_bench's nor allreduce_sweep's JSON")
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a benchmark result this model reads ({exc!r} missing or wrong)") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return out


def _settings(env: dict[str, str]) -> Settings:
    """The Settings a run with these RINGSYNC_ variables (and no other) had."""
    import os
    saved = {k: v for k, v in os.environ.items() if k.startswith("RINGSYNC_")}
    for k in saved:
        del os.environ[k]
    try:
        os.environ.update({k: str(v) for k, v in env.items()})
        return Settings.from_env()
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)


def fit(observations: list[Observation], min_bytes: int = 0, rate: int | None = None) -> Calibration:
    """Fit per link class, by least squares (relative, non-negative), over the observations
    of at least `min_bytes`:

      1. within a host: γ, shared memory's σ and δ, MPI's local α and β, from the one-host
         observations (defaults where there are none);
      2. between hosts: each link rate's α and β, from the observations on several hosts of
         at least 4 x the shaper's burst, with the parameters of step 1 held fixed (their
         share is subtracted first);
      3. α again, where the files have calls smaller than the burst: those leave at the
         unshaped speed, not at the rate, so their bytes are priced at local β and what is
         left is the messages' latency (a call of 4 x the burst or more barely shows α).

    `rate`: fit only the links of that rate (bits/s; 0: unshaped), the one-host files beside
    them: a calibration for RINGSYNC_MODEL on a cluster of such links. The calibration lists
    the parameters it fitted (the others keep the defaults) and those the non-negative fit
    held at 0; a stage with fewer independent measurements than parameters raises ValueError.
    """
    rows = [o for o in observations if o.size >= min_bytes and o.seconds > 0
            and (rate is None or o.topology.hosts == 1 or (o.topology.rate_bps or 0) == rate)]
    if not rows:
        raise ValueError("nothing to fit: no observation of a fitted implementation and size")
    mpis = sorted({o.mpi for o in rows})
    if len(mpis) > 1:
        raise ValueError(f"measurements of several MPIs ({', '.join(mpis)}): fit one MPI at a time")
    defaults = Calibration()
    one_host = [o for o in rows if o.topology.hosts == 1]
    local = dict(zip(LOCAL, (defaults.gamma, defaults.shm_sync, defaults.shm_copy, defaults.local_alpha,
                             defaults.local_beta)))
    fitted: list[str] = []
    if one_host:
        local.update(_solve(one_host, {}, lambda name: name, "within a host", fitted))
    nets: dict[int, tuple[float, float]] = {}
    burst_of: dict[int, int] = {}
    for link in sorted({o.topology.rate_bps or 0 for o in rows if o.topology.hosts > 1}):
        these = [o for o in rows if o.topology.hosts > 1 and (o.topology.rate_bps or 0) == link]
        paced = [o for o in these if o.size >= 4 * o.burst]
        label = f"between hosts at {link / 1e9:g} Gbit/s" if link else "between unshaped hosts"
        if not paced:
            raise ValueError(f"{label}: no call of at least 4 x the shaper's burst, so no rate to fit")
        net = _solve(paced, local, lambda name: name if name.startswith("net.") else None, label, fitted)
        # Calls within the burst leave at the unshaped speed: they price α, their bytes at local β.
        within = [o._replace(terms=unpaced(o.terms)) for o in these if 0 < o.terms.get("net.beta", 0.0) <= o.burst]
        if within:
            net.update(_solve(within, local, lambda name: name if name == "net.alpha" else None,
                              f"{label}, within the burst", fitted))
        nets[link] = (net.get("net.alpha", 0.0), net.get("net.beta", 0.0))
        burst_of[link] = max(o.burst for o in these)
        fitted += [f"net@{link}.alpha", f"net@{link}.beta"]
    held = [name for name in fitted if name in local and local[name] == 0.0] + \
        [f"net@{r}.{k}" for r, ab in nets.items() for k, v in zip(("alpha", "beta"), ab) if v == 0.0]
    cal = Calibration(gamma=local["gamma"], shm_sync=local["shm.sync"], shm_copy=local["shm.copy"],
                      local_alpha=local["local.alpha"], local_beta=local["local.beta"], nets=nets, bursts=burst_of,
                      source=f"{mpis[0]}: fit of {len(rows)} medians"
                             f"{f' of {min_bytes} bytes and more' if min_bytes > 1 else ''}"
                             f"{f' (links of {rate / 1e9:g} Gbit/s)' if rate else ''} from "
                             f"{', '.join(sorted({Path(o.source).name for o in rows}))}",
                      fitted=sorted(set(fitted)), held_at_zero=sorted(set(held)))
    cal.residuals = [r._asdict() for r in residuals(rows, cal)]
    return cal


def unpaced(terms: Terms) -> Terms:
    """Terms whose bytes between hosts are priced as bytes within one (a call within the burst)."""
    out = Terms(terms)
    out["local.beta"] = out.get("local.beta", 0.0) + out.pop("net.beta", 0.0)
    return out


def _solve(rows: list[Observation], fixed: dict[str, float], column, stage: str,
           fitted: list[str]) -> dict[str, float]:
    """The non-negative relative least-squares values of the parameters `column` names (the
    others' share, at their `fixed` values, subtracted from the measured time first); their
    names join `fitted`. ValueError naming `stage` if the measurements cannot determine them."""
    columns = sorted({column(k) for o in rows for k, v in o.terms.items() if v and column(k)})
    if not columns:
        return {}
    A = np.zeros((len(rows), len(columns)))
    b = np.ones(len(rows))
    for i, o in enumerate(rows):
        for k, v in o.terms.items():
            if not v:
                continue
            if column(k):
                A[i, columns.index(column(k))] += v / o.seconds
            else:
                b[i] -= v * fixed[k] / o.seconds
    if np.linalg.matrix_rank(A / np.maximum(np.linalg.norm(A, axis=0), 1e-300)) < len(columns):
        raise ValueError(f"{stage}: {len(rows)} measurements cannot tell {', '.join(columns)} apart "
                         f"(give more sizes, shapes or implementations)")
    fitted += [c for c in columns if c in LOCAL]
    return dict(zip(columns, _nonnegative_lstsq(A, b)))


class Residual(NamedTuple):
    source: str
    shape: str
    rate_bps: int | None
    impl: str
    size: int
    measured_s: float
    predicted_s: float
    error: float            # predicted / measured - 1


def residuals(observations: list[Observation], cal: Calibration) -> list[Residual]:
    out = []
    for o in observations:
        predicted = seconds(o.terms, cal, o.topology.rate_bps)
        out.append(Residual(Path(o.source).name, shape(o.topology), o.topology.rate_bps, o.impl, o.size,
                            o.seconds, predicted, predicted / o.seconds - 1 if o.seconds else math.nan))
    return out


def shape(top: Topology) -> str:
    counts = set(top.ranks_per_host)
    return f"{top.hosts}x{top.ranks_per_host[0]}" if len(counts) == 1 else "+".join(map(str, top.ranks_per_host))


def _nonnegative_lstsq(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """min |Ax - b| with x >= 0, by dropping the most negative column and solving again
    (Lawson and Hanson's active set, in its simplest form: enough for a handful of columns).
    Columns are scaled to unit norm first, so parameters of very different sizes (seconds per
    message, seconds per byte) are solved on equal terms."""
    norms = np.linalg.norm(A, axis=0)
    norms[norms == 0] = 1.0
    S = A / norms
    active = list(range(A.shape[1]))
    x = np.zeros(A.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(S[:, active], b, rcond=None)
        if (sol >= 0).all():
            x[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return x / norms

"""The model's inputs: a cluster's shape (Topology) and what its links cost (Calibration).

The α–β–γ model prices a collective by what it does:

    α   seconds per message (latency: the software on both ends, the wire's round trip)
    β   seconds per byte on a link (1 / bandwidth)
    γ   seconds per byte reduced (one elementwise add of two operands, per byte of result)

with α and β separate per link class, as NCCL's tuner keeps intra- and inter-node latencies:

    shm     within a host, through ringsync's shared memory: a sync point (σ, "shm.sync")
            and a byte copied (δ, "shm.copy") instead of a message
    local   within a host, MPI's point-to-point messages ("local.alpha", "local.beta")
    net     between hosts, over one host's link ("net.alpha", "net.beta"): per link rate

A Calibration holds one number per parameter (fitted by fit.py from measurements, or the
defaults below); a prediction is a sum of parameter x coefficient (algorithms.py's Terms).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..files import atomic_write_text

# Every parameter a prediction may use, in the order the calibration file lists them.
PARAMETERS = ("gamma", "shm.sync", "shm.copy", "local.alpha", "local.beta", "net.alpha", "net.beta")
# Bytes on the wire per byte of payload over TCP/IPv4 on Ethernet at MTU 1500: each 1448-byte
# segment (1500 - 20 IP - 32 TCP with timestamps) costs 1538 bytes with Ethernet's framing,
# preamble and gap. The default when no fit says better.
WIRE_BYTES_PER_BYTE = 1538 / 1448


@dataclass(frozen=True)
class Topology:
    """Hosts and their ranks, ranks numbered host by host (as -hosts host0:L0,host1:L1 places
    them): host 0 holds ranks 0..L0-1, and so on. `rate_bps`: each host's link, None = unshaped."""

    ranks_per_host: tuple[int, ...]
    rate_bps: int | None = None

    def __post_init__(self) -> None:
        if not self.ranks_per_host or min(self.ranks_per_host) < 1:
            raise ValueError(f"ranks_per_host must be positive counts, got {self.ranks_per_host!r}")
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError(f"rate_bps must be positive or None, got {self.rate_bps!r}")

    @classmethod
    def uniform(cls, p: int, ranks_per_host: int, rate_bps: int | None = None) -> Topology:
        """p ranks, `ranks_per_host` on each host (the last host takes the remainder)."""
        if p < 1 or ranks_per_host < 1:
            raise ValueError(f"p and ranks_per_host must be >= 1, got {p} and {ranks_per_host}")
        full, rest = divmod(p, ranks_per_host)
        return cls(tuple([ranks_per_host] * full + ([rest] if rest else [])), rate_bps)

    @property
    def p(self) -> int:
        return sum(self.ranks_per_host)

    @property
    def hosts(self) -> int:
        return len(self.ranks_per_host)

    def host_of(self) -> list[int]:
        """The host of every rank."""
        return [h for h, count in enumerate(self.ranks_per_host) for _ in range(count)]


@dataclass
class Calibration:
    """One value per parameter (seconds, or seconds per byte). `nets` maps a link rate (bits
    per second; 0 for unshaped links) to that link's (alpha, beta); a rate with no fit of its
    own gets the nearest fitted rate's alpha and beta = the slowest fitted rate's wire
    overhead (beta x rate / 8) x 8 / rate."""

    gamma: float = 0.5e-9
    shm_sync: float = 5e-6
    shm_copy: float = 0.2e-9
    local_alpha: float = 10e-6
    local_beta: float = 0.3e-9
    nets: dict[int, tuple[float, float]] = field(default_factory=lambda: {10**9: (100e-6, 8e-9 * WIRE_BYTES_PER_BYTE)})
    source: str = "defaults (ringsync/model/params.py)"
    residuals: list[dict] = field(default_factory=list)
    # Per link rate, the shaper's burst (bytes; 0: none, as on a real link): a call that puts
    # at most that much through a link leaves at the unshaped speed (tc's token bucket).
    bursts: dict[int, int] = field(default_factory=dict)
    fitted: list[str] = field(default_factory=list)         # the parameters a fit set (others: defaults)
    held_at_zero: list[str] = field(default_factory=list)   # those the non-negative fit held at 0

    def net(self, rate_bps: int | None) -> tuple[float, float]:
        """(alpha, beta) of a link of `rate_bps` (None: unshaped)."""
        key = rate_bps or 0
        if key in self.nets:
            return self.nets[key]
        shaped = {r: ab for r, ab in self.nets.items() if r}
        if not key or not shaped:
            raise ValueError(f"no calibration for {'unshaped links' if not key else f'{key} bit/s'}: "
                             f"fitted rates are {sorted(self.nets)}")
        # The wire overhead (β x rate / 8) of the slowest fitted rate, where the link, not the
        # machine, is most likely the limit; α of the nearest.
        slowest = min(shaped)
        overhead = shaped[slowest][1] * slowest / 8
        nearest = min(shaped, key=lambda r: abs(math.log(r / key)))
        return shaped[nearest][0], overhead * 8 / key

    def values(self, rate_bps: int | None) -> dict[str, float]:
        """Every parameter's value, with the net's for links of `rate_bps`."""
        values = {"gamma": self.gamma, "shm.sync": self.shm_sync, "shm.copy": self.shm_copy,
                  "local.alpha": self.local_alpha, "local.beta": self.local_beta}
        try:
            values["net.alpha"], values["net.beta"] = self.net(rate_bps)
        except ValueError:
            values["net.alpha"] = values["net.beta"] = math.nan    # (fine while no message crosses hosts)
        return values

    # -- the calibration file: small JSON, compared across ranks by its content's hash ------

    def to_json(self) -> dict:
        return {"model": "ringsync alpha-beta-gamma", "source": self.source,
                "gamma": self.gamma, "shm": {"sync": self.shm_sync, "copy": self.shm_copy},
                "local": {"alpha": self.local_alpha, "beta": self.local_beta},
                "net": [{"rate_bps": r, "alpha": a, "beta": b, "burst_bytes": self.bursts.get(r, 0)}
                        for r, (a, b) in sorted(self.nets.items())],
                "fitted": self.fitted, "held_at_zero": self.held_at_zero, "residuals": self.residuals}

    @classmethod
    def from_json(cls, data: object) -> Calibration:
        try:
            return cls(gamma=_seconds(data["gamma"]), shm_sync=_seconds(data["shm"]["sync"]),
                       shm_copy=_seconds(data["shm"]["copy"]), local_alpha=_seconds(data["local"]["alpha"]),
                       local_beta=_seconds(data["local"]["beta"]),
                       nets={int(n["rate_bps"]): (_seconds(n["alpha"]), _seconds(n["beta"])) for n in data["net"]},
                       bursts={int(n["rate_bps"]): int(n.get("burst_bytes", 0)) for n in data["net"]},
                       source=str(data.get("source", "")), residuals=list(data.get("residuals", [])),
                       fitted=list(data.get("fitted", [])), held_at_zero=list(data.get("held_at_zero", [])))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a ringsync calibration ({exc!r})") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration file (ValueError naming the file if it is not one)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        try:
            return cls.from_json(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def _seconds(value: object) -> float:
    x = float(value)  # type: ignore[arg-type]
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"a cost must be a finite number >= 0, got {value!r}")
    return x

"""The model picks each all-reduce's algorithm (RINGSYNC_MODEL=calibration.json), as NCCL's
tuner does: the predicted time of every algorithm ringsync implements that this World can
run, the fastest wins. Without a calibration, choice.py's thresholds pick.

Every rank picks alike: the ranks have compared the file's content hash at init() (a
setting like any other), they price the same Topology, and a call's size is checked by the
opening every call starts with, so ranks whose sizes differ raise MismatchError, whatever
each would have picked. Rabenseifner and the tree are not candidates: ringsync has neither.
"""
from __future__ import annotations

from ..config import Settings
from .algorithms import ringsync_terms, seconds
from .params import Calibration, Topology


class Tuner:
    """choose(nbytes, checked) -> 'ride', 'shared', 'doubling', 'pipelined' or 'ring'."""

    def __init__(self, calibration: Calibration, topology: Topology, settings: Settings, *,
                 shared: bool, payload_limit: int) -> None:
        if topology.hosts > 1 and topology.rate_bps is None:
            shaped = sorted(calibration.nets)
            if len(shaped) != 1:
                raise ValueError(f"RINGSYNC_MODEL: the calibration fits {len(shaped)} link rates "
                                 f"({shaped}); to choose, it must describe this cluster's one link")
            topology = Topology(topology.ranks_per_host, shaped[0] or None)
        self.calibration, self.topology, self.settings = calibration, topology, settings
        self.shared, self.payload_limit = shared, payload_limit
        self._picked: dict[tuple[int, bool], str] = {}

    def candidates(self, nbytes: int, checked: bool) -> list[str]:
        # Not recursive doubling on one node of more than 2 ranks: its tree of pairs would
        # break the rank-order sums that backup:0 relies on (collectives.summation_order),
        # and the thresholds never take it there either.
        single = self.shared and self.topology.hosts == 1
        names = ["ring", "pipelined"] if single and self.topology.p > 2 else ["doubling", "ring", "pipelined"]
        if self.shared:
            names.append("shared")
        if checked and nbytes <= self.payload_limit:
            names.append("ride")
        return names

    def predict(self, nbytes: int, algorithm: str, checked: bool = True) -> float:
        terms = ringsync_terms(nbytes, self.topology, self.settings, checked, algorithm=algorithm)
        return seconds(terms, self.calibration, self.topology.rate_bps)

    def choose(self, nbytes: int, checked: bool) -> str:
        key = (nbytes, checked)
        picked = self._picked.get(key)
        if picked is None:
            if len(self._picked) > 4096:
                self._picked.clear()
            # (ties go to the first listed: the same on every rank)
            picked = self._picked[key] = min(self.candidates(nbytes, checked),
                                             key=lambda name: self.predict(nbytes, name, checked))
        return picked

    def riding_limit(self) -> int:
        """The largest size up to which every checked call rides on the opening (-1: none), for
        allreduce_'s direct path. Up to the opening's payload limit every algorithm is one
        piece and one segment, so its time is linear in the size (but for the opening's
        8-byte padding): where riding wins is one interval from the smallest size up, found by
        bisection, then checked over the last 64 sizes below the edge."""
        if self.payload_limit < 1 or self.choose(1, True) != "ride":
            return -1
        lo, hi = 1, self.payload_limit + 1          # choose(lo) rides; hi does not (or is beyond)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.choose(mid, True) == "ride" else (lo, mid)
        for n in range(max(1, lo - 64), lo + 1):
            if self.choose(n, True) != "ride":
                return n - 1
        return lo


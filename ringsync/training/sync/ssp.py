"""`--sync ssp:S`: stale-synchronous parallel (Ho et al., NIPS 2013), on the parameter server.

Workers run at their own pace, but the fastest may be at most S updates ahead of the
slowest: server 0 holds a worker's next parameters while it is further ahead than that
(ps.py). S = 0 is lock-step, one worker's gradient per update; a large S is async.
A worker's "wait" in the timing report is the time it was held by that bound.
"""
from __future__ import annotations

from .curve import Curve
from .ps import ParameterServer


def make(trainer, bound: int, servers: int, staleness_lr: bool, curve: Curve) -> ParameterServer:
    """This rank's part in an ssp:S run (server or worker, by rank)."""
    return ParameterServer(f"ssp:{bound}", trainer, servers, bound, staleness_lr, curve)

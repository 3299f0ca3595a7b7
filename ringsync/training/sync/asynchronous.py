"""`--sync async`: an asynchronous parameter server (Dean et al. 2012, Downpour SGD).

Rank 0 holds the parameters (or ranks 0..K-1, sharded, with --servers K); each worker pulls
parameters, computes a gradient and pushes it, never waiting for another worker (ps.py).
Updates therefore use stale parameters: the report gives the staleness of every update
(server version at application minus the version the gradient was computed on), and
--staleness-lr divides the learning rate by it. With one worker nothing is ever stale and
the run is sequential SGD, bit for bit. A worker's "wait" is its push-to-reply round trip.
"""
from __future__ import annotations

from .curve import Curve
from .ps import ParameterServer


def make(trainer, bound: None, servers: int, staleness_lr: bool, curve: Curve) -> ParameterServer:
    """This rank's part in an async run (server or worker, by rank); `bound` is unused (None)."""
    return ParameterServer("async", trainer, servers, None, staleness_lr, curve)

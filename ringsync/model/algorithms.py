"""Predicted time of every all-reduce algorithm, as a sum of parameter x coefficient.

Each function returns the Terms of one call on one rank, the one on the critical path:
{"net.alpha": 2, "net.beta": 1.5e6, "gamma": 5e5, ...} means 2 messages between hosts,
1.5 MB through the busiest host link in one direction, 0.5 MB reduced. seconds() prices
Terms with a Calibration. Terms are linear in the parameters, so fit.py can fit them by
least squares.

The rules every function follows (a step-synchronous model, as Thakur, Rabenseifner & Gropp):

  * a round of messages costs one α and its bytes once; the round's link is the slowest one
    any of its messages takes: between hosts (net) if any message crosses hosts, else within
    one (local: MPI's messages; shm: ringsync's shared memory);
  * messages that cross hosts in the same round share their hosts' links: the round pays β
    for the bytes of the busiest host link, in the busier direction (links are full duplex);
  * every rank works in parallel on a core of its own (on 2 cores with 4 ranks that is
    false: the one-host predictions there are reported, not judged);
  * the reduce costs γ per byte of result and operation; copies within a host cost δ per
    byte; the opening's comparisons and Python's overhead per call have no term (the
    measured α absorbs the per-message share of them).

Which algorithm ringsync takes is choice.py's rule; `ringsync_terms` follows it.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable

from ..choice import MAX_PAYLOAD_BYTES, host_choice
from ..config import Settings
from .params import PARAMETERS, Calibration, Topology

TRAILER_BYTES = 32      # the opening's trailer (agreement.py)
DEFAULTS = Settings()   # what a run with no RINGSYNC_ variable has


class Terms(dict):
    """Parameter name -> coefficient. Terms add (+) and scale (*)."""

    def __add__(self, other: dict) -> Terms:
        out = Terms(self)
        for k, v in other.items():
            out[k] = out.get(k, 0.0) + v
        return out

    def __mul__(self, factor: float) -> Terms:
        return Terms({k: v * factor for k, v in self.items()})

    __rmul__ = __mul__


def seconds(terms: dict, calibration: Calibration, rate_bps: int | None = None) -> float:
    """The time the Terms predict with `calibration`'s values for links of `rate_bps`. A call
    that puts no more than the shaper's burst through a host link (emulated links only: the
    calibration's `bursts`) sends those bytes at the unshaped speed, priced as local β."""
    values = calibration.values(rate_bps)
    burst = calibration.bursts.get(rate_bps or 0, 0)
    if burst and 0 < terms.get("net.beta", 0.0) <= burst:
        values = dict(values, **{"net.beta": values["local.beta"]})
    return sum(coef * values[name] for name, coef in terms.items() if coef)


def _round(top: Topology, host: list[int], messages: Iterable[tuple[int, int]], nbytes: float) -> Terms:
    """One round in which each (source, destination) message carries `nbytes`."""
    out: Counter = Counter()
    into: Counter = Counter()
    for src, dst in messages:
        if host[src] != host[dst]:
            out[host[src]] += 1
            into[host[dst]] += 1
    if out:
        busiest = max(max(out.values()), max(into.values()))
        return Terms({"net.alpha": 1.0, "net.beta": busiest * nbytes})
    return Terms({"local.alpha": 1.0, "local.beta": float(nbytes)})


def _ring_step(top: Topology, host: list[int], nbytes: float) -> Terms:
    p = top.p
    return _round(top, host, ((r, (r + 1) % p) for r in range(p)), nbytes)


# --- the flat algorithms, over every rank ------------------------------------------------

def ring(n: float, top: Topology) -> Terms:
    """ring.py: 2(p-1) rounds of n/p bytes; (p-1) reduces of n/p."""
    p, host = top.p, top.host_of()
    if p == 1 or n == 0:
        return Terms()
    return _ring_step(top, host, n / p) * (2 * (p - 1)) + Terms({"gamma": (p - 1) / p * n})


def pipelined(n: float, top: Topology, segment_bytes: int = DEFAULTS.segment_bytes) -> Terms:
    """pipelined.py: the ring, each reduce-scatter step's chunk sent in segments (one α each)."""
    p, host = top.p, top.host_of()
    if p == 1 or n == 0:
        return Terms()
    chunk = n / p
    segments = max(1, math.ceil(chunk / segment_bytes))
    step = _ring_step(top, host, chunk)
    extra_alpha = Terms({k: (segments - 1) * v for k, v in step.items() if k.endswith(".alpha")})
    return step * (2 * (p - 1)) + extra_alpha * (p - 1) + Terms({"gamma": (p - 1) / p * n})


def _fold_pairs(p: int) -> tuple[int, int]:
    pof2 = 1 << (p.bit_length() - 1)
    return pof2, p - pof2


def _vranks(p: int) -> tuple[int, list[int]]:
    """MPICH's fold for p not a power of two: the real rank of each of the pof2 virtual ranks."""
    pof2, rem = _fold_pairs(p)
    return pof2, [2 * v + 1 if v < rem else v + rem for v in range(pof2)]


def _fold(top: Topology, host: list[int], n: float) -> tuple[Terms, Terms]:
    """(fold, unfold): the first 2*rem ranks pair up, evens hand their buffer to the odd one."""
    p = top.p
    _, rem = _fold_pairs(p)
    if not rem:
        return Terms(), Terms()
    pairs = [(2 * i, 2 * i + 1) for i in range(rem)]
    fold = _round(top, host, pairs, n) + Terms({"gamma": n})
    unfold = _round(top, host, [(b, a) for a, b in pairs], n)
    return fold, unfold


def _butterfly(n: float, top: Topology) -> tuple[Terms, list[Callable[[float], Terms]]]:
    """MPICH's scheme for p ranks: (the fold and unfold's Terms, and per round k of the
    log2(pof2) rounds between partners r XOR 2^k, the Terms of one exchange of b bytes)."""
    host = top.host_of()
    pof2, real = _vranks(top.p)
    fold, unfold = _fold(top, host, n)
    rounds = []
    for k in range(pof2.bit_length() - 1):
        pairs = [(real[v], real[v ^ (1 << k)]) for v in range(pof2)]
        rounds.append(lambda b, pairs=pairs: _round(top, host, pairs, b))
    return fold + unfold, rounds


def doubling(n: float, top: Topology) -> Terms:
    """doubling.py: log2(pof2) swaps of the whole buffer, each reduced (+ fold and unfold)."""
    if top.p == 1 or n == 0:
        return Terms()
    terms, rounds = _butterfly(n, top)
    for exchange in rounds:
        terms = terms + exchange(n) + Terms({"gamma": n})
    return terms


def rabenseifner(n: float, top: Topology) -> Terms:
    """MPI's large-message Allreduce (MPICH's reduce_scatter_allgather; prediction only):
    reduce-scatter by recursive halving (distance 1, 2, ..., halves of n/2, n/4, ...), then
    all-gather by recursive doubling in reverse (+ fold and unfold)."""
    if top.p == 1 or n == 0:
        return Terms()
    terms, rounds = _butterfly(n, top)
    for k, exchange in enumerate(rounds):
        half = n / (2 << k)
        terms = terms + exchange(half) * 2 + Terms({"gamma": half})
    return terms


def tree(n: float, top: Topology) -> Terms:
    """Binomial-tree reduce to rank 0, then binomial-tree broadcast (prediction only)."""
    p, host = top.p, top.host_of()
    if p == 1 or n == 0:
        return Terms()
    terms = Terms()
    mask = 1
    while mask < p:
        pairs = [(r, r - mask) for r in range(p) if r % (2 * mask) == mask]
        terms = terms + _round(top, host, pairs, n) * 2 + Terms({"gamma": n})
        mask <<= 1
    return terms


def opening(n: float, top: Topology, shm: bool = False) -> Terms:
    """agreement.py's opening, carrying an n-byte payload (0: trailers only): Bruck's
    all-gather of blocks of pad8(n) + 32 bytes, ceil(log2 p) rounds; on one host in shared
    memory, one sync (the payload is copied into the rank's slot)."""
    p, host = top.p, top.host_of()
    if p == 1:
        return Terms()
    if shm:
        return Terms({"shm.sync": 1.0, "shm.copy": float(n)})
    block = (math.ceil(n / 8) * 8) + TRAILER_BYTES
    terms, distance = Terms(), 1
    while distance < p:
        count = min(distance, p - distance)
        terms = terms + _round(top, host, ((r, (r - distance) % p) for r in range(p)), count * block)
        distance <<= 1
    return terms


def gathered(n: float, top: Topology, shm: bool = False) -> Terms:
    """gathered.py: the payload rides on the opening; then p-1 reduces of the whole buffer."""
    if top.p == 1 or n == 0:
        return Terms()
    return opening(n, top, shm) + Terms({"gamma": (top.p - 1) * n})


def shared(n: float, top: Topology, slot_bytes: int = DEFAULTS.shm_slot_bytes) -> Terms:
    """shared.py within one host, and the hierarchical all-reduce across hosts.

    Per piece of at most one slot (m bytes), on a rank of the host with the fewest ranks
    (L ranks; G = the most ranks on any host; it owns k = ceil(G/L) of the G chunks):
    copy in what others reduce, sync, reduce its chunks (L operands each), ring each chunk
    across the h hosts (all G chunks' rings share each host link: 2(h-1)/h x m bytes per
    direction), sync, copy every chunk out."""
    p, h = top.p, top.hosts
    if p == 1 or n == 0:
        return Terms()
    G, L = max(top.ranks_per_host), min(top.ranks_per_host)
    k = math.ceil(G / L)
    pieces = math.ceil(n / slot_bytes)
    terms = Terms()
    for i in range(pieces):
        m = min(slot_bytes, n - i * slot_bytes)
        mine = k * m / G
        piece = Terms({"shm.sync": 2.0, "shm.copy": (m - mine) + m})
        piece = piece + (Terms({"gamma": (L - 1) * mine}) if L > 1 else Terms({"shm.copy": mine}))
        if h > 1:
            piece = piece + Terms({"net.alpha": k * 2.0 * (h - 1), "net.beta": 2 * (h - 1) / h * m,
                                   "gamma": (h - 1) / h * mine})
        terms = terms + piece
    return terms


# --- what ringsync does, and every algorithm by name ---------------------------------------

def ringsync_choice(n: float, top: Topology, settings: Settings = DEFAULTS, checked: bool = True) -> str:
    """The algorithm ringsync's thresholds pick on `top` (choice.py, with the World's values
    a run on `top` would have: shared memory where a host holds several ranks)."""
    node = settings.transport == "shm" or (settings.transport == "auto" and max(top.ranks_per_host) > 1)
    single = node and top.hosts == 1
    small = settings.small_limit(top.p, single, settings.shm_slot_bytes if node else 0)
    payload = min(small, settings.shm_slot_bytes) if single else min(small, MAX_PAYLOAD_BYTES)
    return host_choice(int(n), top.p, settings, checked=checked, payload_limit=payload, node=node,
                       single_node=single, small=small)


def ringsync_terms(n: float, top: Topology, settings: Settings = DEFAULTS, checked: bool = True,
                   algorithm: str | None = None) -> Terms:
    """A guarded ringsync all-reduce: the opening, then `algorithm` (default: the thresholds')."""
    if top.p == 1 or n == 0:
        return Terms()
    algorithm = algorithm or ringsync_choice(n, top, settings, checked)
    node = settings.transport == "shm" or (settings.transport == "auto" and max(top.ranks_per_host) > 1)
    single_shm = top.hosts == 1 and node    # (then every opening is one sync on the segment)
    if algorithm == "ride":
        return gathered(n, top, shm=single_shm)
    head = opening(0, top, shm=single_shm) if checked else Terms()
    if algorithm == "shared":
        return head + shared(n, top, settings.shm_slot_bytes)
    if algorithm == "pipelined":
        return head + pipelined(n, top, settings.segment_bytes)
    return head + ALGORITHMS[algorithm](n, top)


ALGORITHMS: dict[str, Callable[[float, Topology], Terms]] = {
    "ring": ring, "pipelined": pipelined, "doubling": doubling, "rabenseifner": rabenseifner,
    "tree": tree, "gathered": gathered, "shared": shared,
}
# The ones ringsync implements (the model may choose among them); the rest are for prediction.
IMPLEMENTED = ("ring", "pipelined", "doubling", "gathered", "shared")


def check_terms(terms: dict) -> None:
    unknown = set(terms) - set(PARAMETERS)
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}")

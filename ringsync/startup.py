"""init() and shutdown(): build the World, agree on the settings, start the checks.

init() is collective: every rank reads its RINGSYNC_* settings, and the ranks compare them
before anything else is sent, so a rank configured differently raises on every rank instead
of sending messages the others do not expect. Then the agreement check (agreement.py) and
the stall inspector (stall.py) start, and an uncaught exception aborts the whole job.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from . import config, context, handles, stall
from .agreement import Checker
from .algorithms.ring import ring_allgather_
from .transport.shm import NodeSegment, node_communicator

SETTINGS_BYTES = 2048     # room for every rank's settings text, the same on every rank


def init(comm: MPI.Comm | None = None) -> None:
    """Start ringsync on `comm` (default MPI.COMM_WORLD); an uncaught exception then aborts the job.

    Calling it again with the same communicator is a no-op; with another, it switches.
    Ranks whose shared RINGSYNC_* settings differ all raise ValueError, naming them.
    """
    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py MPI.Comm, got {type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError("comm must not be MPI.COMM_NULL")
    if context.is_initialized():
        if MPI.Comm.Compare(context.world().comm, comm) == MPI.CONGRUENT:
            return
        shutdown()
    w = context.World(comm)
    try:
        w.settings = agreed_settings(w.comm)
    except ValueError:
        w.free()
        raise
    try:
        connect_nodes(w)            # (shared memory can fail: no room in /dev/shm, say)
    except OSError:
        w.free()
        raise
    w.small_bytes = w.settings.small_limit(w.size, w.single_node, w.node.slot_bytes if w.node else 0)
    w.checker = Checker(w.comm, w.settings, segment=w.node if w.single_node else None,
                        small_bytes=w.small_bytes)
    if w.settings.model:
        try:
            w.tuner, problem = tuner_of(w), b""
        except ValueError as exc:
            problem = str(exc).encode()
        # A file that is no use on one rank (changed, gone) must fail init() on every rank.
        problems = [(q, t.decode()) for q, t in enumerate(gather_texts(w.comm, problem)) if t]
        if problems:
            w.free()
            raise ValueError("; ".join(f"rank {q}: {why}" for q, why in problems))
        if w.size > 1 and w.settings.allreduce == "auto" and w.checker.enabled:
            w.riding_bytes = w.tuner.riding_limit()     # (what the model rides, straight on)
    elif w.size > 1 and w.settings.allreduce == "auto":
        w.riding_bytes = w.checker.payload_limit
    w.thread_level = MPI.Query_thread()     # (the asynchronous API needs MULTIPLE: handles.py)
    w.inspector = stall.start(w)
    context.set_world(w)
    context.install_abort_hook()


def shutdown() -> None:
    """Release ringsync's communicators; init() may be called again afterwards.

    Collective. It first waits for the asynchronous calls in flight; if any rank has handles
    it has not synchronized, every rank raises (RuntimeError, or MismatchError naming the
    ranks), and ringsync stays initialized (handles.py)."""
    if context.is_initialized():
        w = context.world()
        handles.close(w)
        w.free()
        context.set_world(None)


def connect_nodes(w: context.World) -> None:
    """Shared memory within each node, per RINGSYNC_TRANSPORT (collective).

    auto and shm: every node gets a segment (transport/shm.py); auto only where some node
    holds more than one rank. Across several nodes, each rank also gets, for every chunk it
    owns, a communicator of that chunk's owners on every node (algorithms/shared.py).
    """
    settings = w.settings
    if w.size == 1 or (settings.transport == "p2p" and not settings.model):
        return
    node_comm = node_communicator(w.comm, settings.node_size)
    # Every rank's node (named by its lowest rank) and that node's size, shared by all.
    leader = MPI.Group.Translate_ranks(node_comm.Get_group(), [0], w.comm.Get_group())[0]
    rows = np.zeros((w.size, 2), dtype=np.int64)
    rows[w.rank] = leader, node_comm.Get_size()
    ring_allgather_(list(rows), w.comm, owned=w.rank)
    leaders = sorted(set(rows[:, 0].tolist()))
    chunks = int(rows[:, 1].max())
    w.node_sizes = tuple(int(rows[rows[:, 0] == q][0, 1]) for q in leaders)     # (for the tuner)
    if settings.transport == "p2p" or (settings.transport == "auto" and chunks == 1):
        node_comm.Free()            # p2p, or nobody shares a node: nothing to gain
        return
    w.node = NodeSegment(node_comm, settings.shm_slot_bytes)
    w.single_node = len(leaders) == 1
    w.chunks = chunks
    if not w.single_node:
        me, local = leaders.index(leader), node_comm.Get_rank()
        for c in range(chunks):
            owner = c % node_comm.Get_size() == local
            ring = w.comm.Split(c if owner else MPI.UNDEFINED, me)
            if owner:
                w.rings.append((c, ring))


def tuner_of(w: context.World):
    """The cost model that picks each all-reduce's algorithm (model/tuner.py), from the
    calibration file RINGSYNC_MODEL names (its content's hash is among the compared settings)."""
    from .model.params import Calibration, Topology
    from .model.tuner import Tuner
    path = config.env_str("RINGSYNC_MODEL", "")
    if config.content_hash(path) != w.settings.model:
        raise ValueError(f"RINGSYNC_MODEL: {path!r} changed while ringsync started")
    try:
        calibration = Calibration.load(path)
    except ValueError as exc:
        raise ValueError(f"RINGSYNC_MODEL: {exc}") from None
    return Tuner(calibration, Topology(w.node_sizes or (w.size,)), w.settings,
                 shared=w.node is not None, payload_limit=w.checker.payload_limit)


def gather_texts(comm: MPI.Comm, text: bytes) -> list[bytes]:
    """Every rank's `text` (at most SETTINGS_BYTES), by ring.py's all-gather of fixed-size rows."""
    p, r = comm.Get_size(), comm.Get_rank()
    rows = np.zeros((p, SETTINGS_BYTES), dtype=np.uint8)
    rows[r, :len(text)] = np.frombuffer(text[:SETTINGS_BYTES], dtype=np.uint8)
    ring_allgather_(list(rows), comm, owned=r)
    return [bytes(row).rstrip(b"\0") for row in rows]


def agreed_settings(comm: MPI.Comm) -> config.Settings:
    """config.Settings from this rank's environment, after checking that every rank has the
    same: otherwise every rank raises ValueError naming the variables and each rank's value.

    (Compared with ring.py's all-gather of fixed-size rows: MPI's own collectives are not
    used inside ringsync.)
    """
    try:
        settings = config.Settings.from_env()
        text = settings.encode()
    except ValueError as exc:
        settings, text = None, b"!" + str(exc).encode()
    texts = gather_texts(comm, text)
    errors = [(q, t[1:].decode()) for q, t in enumerate(texts) if t.startswith(b"!")]
    if errors:
        raise ValueError("; ".join(f"rank {q}: {why}" for q, why in errors))
    differing = config.differing_settings(texts)
    if differing:
        raise ValueError(f"ranks disagree on ringsync settings (each must be the same on every rank): {differing}")
    return settings

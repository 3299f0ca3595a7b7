"""A Chrome trace-event timeline: one track per rank, every rank's waits on one screen.

Open the file in https://ui.perfetto.dev or chrome://tracing. Each rank is a track ("thread")
holding one "step" span per training step, and inside it spans for compute, wait, barrier,
allreduce and any phase marked with timing.span (fusion's pack and unpack). A straggler shows
up at a glance: its track is all compute while every other track has a long wait.

Each rank records spans on its own clock. At the end rank 0 estimates every rank's clock
offset with Cristian's algorithm (ping-pong, keep the round trip that came back fastest: the
peer read its clock within that round trip, so the error is at most half of it, microseconds
on one node), receives the spans by point-to-point messages, shifts them onto its own clock
and writes the merged file atomically. The waits themselves never depend on this alignment.
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from mpi4py import MPI

from ..collectives import allgather
from ..context import world
from ..files import atomic_write_text

Span = tuple[str, float, float, int]     # (name, start, end, step), seconds on the local clock
THREAD_PREFIX = "comm: "    # a span of the communication thread (handles.py): a track of its own
_TAG = 4242                              # a tag of its own on ringsync's private communicator


def clock_offsets(comm: MPI.Comm, rounds: int = 10) -> np.ndarray | None:
    """On rank 0, every rank's clock minus rank 0's clock, in seconds; None on the others."""
    now = time.perf_counter
    p, r = comm.Get_size(), comm.Get_rank()
    buf = np.zeros(1)
    if r != 0:
        for _ in range(rounds):
            comm.Recv(buf, source=0, tag=_TAG)
            buf[0] = now()                      # "my clock reads this"
            comm.Send(buf, dest=0, tag=_TAG)
        return None
    offsets = np.zeros(p)
    for peer in range(1, p):
        best = np.inf
        for _ in range(rounds):
            t0 = now()
            comm.Send(buf, dest=peer, tag=_TAG)
            comm.Recv(buf, source=peer, tag=_TAG)
            t1 = now()
            if t1 - t0 < best:                  # the tightest round trip bounds the error best
                best = t1 - t0
                offsets[peer] = buf[0] - (t0 + t1) / 2
    return offsets


def step_spans(spans: list[Span], wait_per_step: list[float]) -> list[Span]:
    """Add compute and wait spans to one rank's recorded ones (pure logic, easy to test).

    The step's first synchronization span (the barrier, or in passive mode the first
    all-reduce) is split at this rank's estimated wait: "wait", then the rest. The gaps in
    a step that are not synchronization become "compute" spans.
    """
    out: list[Span] = []
    steps: dict[int, list[Span]] = {}
    for s in spans:
        steps.setdefault(s[3], []).append(s)
    for step, group in sorted(steps.items()):
        whole = [s for s in group if s[0] == "step"]
        sync = sorted((s for s in group if s[0] in ("barrier", "allreduce")), key=lambda s: s[1])
        out.extend(s for s in group if s[0] not in ("barrier", "allreduce"))
        if sync:
            name, t0, t1, _ = sync[0]
            w = min(max(wait_per_step[step] if step < len(wait_per_step) else 0.0, 0.0), t1 - t0)
            sync[0] = (name, t0 + w, t1, step)
            if w > 0:
                sync.insert(0, ("wait", t0, t0 + w, step))
            out.extend(sync)
        if whole:
            cursor = whole[0][1]
            for _, t0, t1, _ in sync + [("end", whole[0][2], whole[0][2], step)]:
                if t0 > cursor:
                    out.append(("compute", cursor, t0, step))
                cursor = max(cursor, t1)
    return out


def trace_events(per_rank: list[list[Span]], offsets: np.ndarray) -> list[dict[str, Any]]:
    """Chrome trace events: spans shifted onto rank 0's clock, in microseconds from the start."""
    shifted = [[(n, t0 - offsets[r], t1 - offsets[r], k) for n, t0, t1, k in spans]
               for r, spans in enumerate(per_rank)]
    origin = min((s[1] for spans in shifted for s in spans), default=0.0)
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
                                     "args": {"name": "ringsync"}}]
    p = len(shifted)
    for r, spans in enumerate(shifted):
        # Track r: the rank's own thread; track p + r, when it has any, its communication thread.
        threaded = any(name.startswith(THREAD_PREFIX) for name, *_ in spans)
        for tid, label in ((r, f"rank {r}"), (p + r, f"rank {r} communication thread"))[:1 + threaded]:
            events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": label}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": tid,
                           "args": {"sort_index": 2 * r + (tid != r)}})
        for name, t0, t1, step in sorted(spans, key=lambda s: (s[1], -s[2])):
            tid = r
            if name.startswith(THREAD_PREFIX):
                name, tid = name[len(THREAD_PREFIX):], p + r
            events.append({"name": name, "cat": "step" if name == "step" else "phase", "ph": "X",
                           "pid": 0, "tid": tid, "ts": round((t0 - origin) * 1e6, 3),
                           "dur": round((t1 - t0) * 1e6, 3), "args": {"step": step}})
    return events


def write_json_atomically(path: str, obj: Any) -> None:
    """Write obj as JSON to `path`, atomically."""
    atomic_write_text(path, json.dumps(obj))


def write_merged(path: str, spans: list[Span], straggler: dict[str, Any]) -> None:
    """Collective: merge every rank's spans on rank 0 and write the trace to `path` there."""
    w = world()
    waits = straggler["wait_per_step_s"][w.rank]
    payload = np.frombuffer(json.dumps(step_spans(spans, waits)).encode(), dtype=np.uint8)
    offsets = clock_offsets(w.comm)
    lengths = allgather(np.array([payload.size], dtype=np.int64))
    if w.rank != 0:
        w.comm.Send(payload, dest=0, tag=_TAG)
        return
    per_rank: list[list[Span]] = [json.loads(payload.tobytes())]
    for peer in range(1, w.size):
        buf = np.empty(int(lengths[peer]), dtype=np.uint8)
        w.comm.Recv(buf, source=peer, tag=_TAG)
        per_rank.append([tuple(s) for s in json.loads(buf.tobytes())])
    summary = {k: v for k, v in straggler.items() if k != "wait_per_step_s"}
    write_json_atomically(path, {"traceEvents": trace_events(per_rank, offsets),
                                 "displayTimeUnit": "ms",
                                 "otherData": {"ringsync": {"ranks": w.size, **summary}}})

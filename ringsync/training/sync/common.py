"""What the sync modes share: their own communicator, framed messages, patient receives.

Every mode other than bsp talks over a duplicate of MPI.COMM_WORLD made at set-up, so its
messages can never match ringsync's collectives or the user's. Messages are byte buffers:
a header of int64 fields, then the payload (gradients or parameters) as raw bytes. A
receiver never guesses a size: it probes the message first (matched probe, Improbe), then
receives exactly what arrived into a buffer of that size.

Receives poll (Improbe, then a short sleep) instead of blocking in MPI. Two reasons: a
blocked MPI call busy-waits and steals a core from the ranks doing real work, and a poll
can give up. Nothing waits forever: after `IDLE_TIMEOUT_S` without the message it needs,
a rank raises, and the package's abort hook ends the whole job.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
from mpi4py import MPI

import ringsync as rs

HEADER_FIELDS = 4                      # int64 fields at the front of every message
HEADER_BYTES = 8 * HEADER_FIELDS
IDLE_TIMEOUT_S = 120.0                 # no awaited message for this long: raise (the job aborts)
POLL_SLEEP_S = 50e-6                   # between probes: leaves the core to ranks that compute
QUIET_PROBES = 32                      # empty probes in a row after which nothing sent is left waiting
DTYPE_CODES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2}


def pack(header: tuple[int, ...], payload: np.ndarray | None = None,
         out: np.ndarray | None = None) -> np.ndarray:
    """A message: `header` (up to HEADER_FIELDS ints, zero-padded) then `payload`'s bytes."""
    nbytes = 0 if payload is None else payload.nbytes
    if out is None or out.size != HEADER_BYTES + nbytes:
        out = np.empty(HEADER_BYTES + nbytes, dtype=np.uint8)
    head = out[:HEADER_BYTES].view(np.int64)
    head[:] = 0
    head[:len(header)] = header
    if nbytes:
        out[HEADER_BYTES:] = payload.view(np.uint8)
    return out


def header(msg: np.ndarray) -> np.ndarray:
    """The int64 header fields of a message."""
    return msg[:HEADER_BYTES].view(np.int64)


def payload(msg: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The payload of a message as an array of `dtype` (a view, no copy)."""
    return msg[HEADER_BYTES:].view(dtype)


def dtype_code(dtype: np.dtype) -> int:
    return DTYPE_CODES.get(np.dtype(dtype), 0)


def try_receive(comm: MPI.Comm, source: int = MPI.ANY_SOURCE,
                tag: int = MPI.ANY_TAG) -> tuple[np.ndarray, int, int] | None:
    """(message, source, tag) if one has arrived, else None; never blocks.

    The matched probe hands over exactly the message it measured, so the buffer is always
    as long as what arrived, even when another thread or another receive is looking too.
    """
    status = MPI.Status()
    message = comm.Improbe(source, tag, status)
    if message is None:
        return None
    buf = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
    message.Recv([buf, MPI.BYTE])
    return buf, status.Get_source(), status.Get_tag()


def waiting(comm: MPI.Comm, source: int = MPI.ANY_SOURCE,
            tag: int = MPI.ANY_TAG) -> Iterator[tuple[np.ndarray, int, int]]:
    """The messages already sent here, as try_receive gives them, in the order MPI matches
    them; ends after QUIET_PROBES probes in a row find nothing (a measured margin, not a
    proof: a message MPI still hides after that many is left for later).

    One empty probe proves nothing: MPI moves messages only inside MPI calls (not while this
    rank computed), and a probe moves them a step at a time. After a long computation the
    first probe often finds nothing, and later ones find a message between empty ones, while
    every message was sent long before (measured, 2-8 ranks, both MPI wheels: up to 3 empty
    probes in a row before a waiting message). An empty probe costs ~0.2 us.
    """
    quiet = 0
    while quiet < QUIET_PROBES:
        got = try_receive(comm, source, tag)
        if got is None:
            quiet += 1
        else:
            quiet = 0
            yield got


def receive(comm: MPI.Comm, source: int = MPI.ANY_SOURCE, tag: int = MPI.ANY_TAG,
            what: str = "a message") -> tuple[np.ndarray, int, int]:
    """Wait for a message (polling); raise TimeoutError after IDLE_TIMEOUT_S without one."""
    got = try_receive(comm, source, tag)
    if got is not None:
        return got
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        time.sleep(POLL_SLEEP_S)
        got = try_receive(comm, source, tag)
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"ringsync.sync: rank {comm.Get_rank()} waited {IDLE_TIMEOUT_S:.0f} s "
                               f"for {what}; giving up (the job aborts)")


def wait_sends(requests: list[MPI.Request]) -> None:
    """Complete our own sends, polling (so a send the peer is slow to take cannot spin a core)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while requests and not MPI.Request.Testall(requests):
        if time.monotonic() > deadline:
            raise TimeoutError(f"ringsync.sync: a send was not taken within {IDLE_TIMEOUT_S:.0f} s")
        time.sleep(POLL_SLEEP_S)
    requests.clear()


def open_comm() -> MPI.Comm:
    """The mode's own communicator: a duplicate of MPI.COMM_WORLD, made at set-up (collective)."""
    return MPI.COMM_WORLD.Dup()


def leftovers(comm: MPI.Comm) -> int:
    """How many messages are waiting on `comm` unreceived (receives them, to count them)."""
    count = 0
    while try_receive(comm) is not None:
        count += 1
    return count


def close_comm(comm: MPI.Comm) -> None:
    """End of a mode: once every rank is through (ringsync's barrier), nothing may be left
    unreceived; a leftover is a protocol bug and raises on the rank that holds it."""
    rs.barrier()
    left = leftovers(comm)
    comm.Free()
    if left:
        raise RuntimeError(f"ringsync.sync: {left} message(s) left unreceived on rank {rs.rank()}")


def agree_settings(settings: list[int], what: str) -> None:
    """Every rank must run the same mode with the same settings; otherwise all raise."""
    rows = rs.allgather(np.array([settings], dtype=np.int64))
    if (rows != rows[0]).any():
        raise rs.MismatchError(f"ranks disagree on {what}: {rows.tolist()}")


def histogram(values: np.ndarray) -> dict:
    """{mean, max, histogram: {value: count}} of non-negative integers (staleness)."""
    values = np.asarray(values, dtype=np.int64)
    if not values.size:
        return {"mean": 0.0, "max": 0, "count": 0, "histogram": {}}
    counts = np.bincount(values)
    return {"mean": float(values.mean()), "max": int(values.max()), "count": int(values.size),
            "histogram": {str(v): int(c) for v, c in enumerate(counts) if c}}


def relative_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (0 when b is all zeros)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norm = float(np.linalg.norm(b64))
    return float(np.linalg.norm(a64 - b64)) / norm if norm else 0.0


def summary(values: list[float]) -> dict:
    """{mean, max, count} of a list of floats."""
    if not values:
        return {"mean": 0.0, "max": 0.0, "count": 0}
    return {"mean": float(np.mean(values)), "max": float(np.max(values)), "count": len(values)}


def timing_report(mode: str, wait_is: str, rows: list[dict]) -> dict:
    """A mode's own timing report, in the straggler report's shape (ranks + a summary block).

    rows: one per rank with rank, role, units (steps or updates it computed), compute_s,
    wait_s (as `wait_is` defines it) and exchange_s (all its time in communication).
    The slowest rank is the one that computed fewest units (ties: the longest compute).
    """
    working = [r for r in rows if r["role"] != "server"]
    cost = sum(r["wait_s"] for r in working)
    busy = sum(r["compute_s"] + r["exchange_s"] for r in working)
    slowest = min(working, key=lambda r: (r["units"], -r["compute_s"]))["rank"]
    return {"ranks": rows,
            "straggler": {"mode": mode, "wait_is": wait_is, "slowest_rank": slowest, "cost_s": cost,
                          "cost_fraction": cost / busy if busy > 0 else 0.0,
                          "steps": int(sum(r["units"] for r in working))}}


def format_timing(report: dict) -> str:
    """A mode's timing report as the table ringsync-train prints at the end."""
    st = report["straggler"]
    lines = [f"timing report ({st['mode']}): wait = {st['wait_is']}",
             f"{'rank':>5} {'role':>7} {'computed':>9} {'compute_s':>10} {'wait_s':>10} {'exchange_s':>11}"]
    for row in report["ranks"]:
        lines.append(f"{row['rank']:>5} {row['role']:>7} {row['units']:>9} {row['compute_s']:>10.4f} "
                     f"{row['wait_s']:>10.4f} {row['exchange_s']:>11.4f}")
    host = f" on {st['slowest_host']}" if "slowest_host" in st else ""
    lines.append(f"slowest: rank {st['slowest_rank']}{host} (computed the fewest); waiting: {st['cost_s']:.4f} "
                 f"rank-seconds = {100 * st['cost_fraction']:.1f}% of the computing ranks' time")
    return "\n".join(lines)

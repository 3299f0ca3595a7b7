"""Cross-rank agreement: every rank must make the same collective call, or every rank raises.

The danger. A collective only works if every rank calls it with the same shape, dtype and
op, and in the same order. If rank 1 reduces a (4,) array while rank 0 reduces a (5,) one,
the ranks either hang (a message that never comes), crash (a message longer than the buffer
posted for it: Open MPI then writes past the buffer), or, worst, quietly mix up numbers.
Horovod stops this with a negotiation round before every reduction.

ringsync's check is an *opening*: every guarded collective begins with the same pattern of
ceil(log2 p) message rounds, whatever the call, so ranks in different calls still meet.

  * Each rank makes a *block*: its payload, then a 32-byte trailer: a 128-bit BLAKE2b digest
    of the call's whole signature (which collective, op, dtype, shape, root, tensor count and
    shapes, name), the call number (call order), and flags.
  * The blocks are all-gathered in Bruck's pattern: in round k rank r sends the blocks it
    holds to r - 2^k and receives as many from r + 2^k. After ceil(log2 p) rounds every rank
    holds every rank's block, so every rank compares every trailer with its own: all ranks
    reach the same verdict, with no further message.
  * No receive is ever shorter than what can arrive. The largest block any guarded call
    sends is fixed when ringsync starts (RINGSYNC_SMALL_BYTES of payload plus the trailer,
    the same on every rank: init() compares the settings), and a round's receive always has
    room for that many of the largest blocks. What arrived is then checked by its byte count,
    then by its trailers. A rank that saw a message of the wrong size marks its own trailer,
    which travels on with every block it forwards.
  * The MPI tag carries nothing (every opening message has the same one), so calls that
    would share a tag cannot fool the check; two different calls pass for one only if
    their 128-bit BLAKE2b digests collide, which nobody can arrange.
  * Small all-reduces ride on the opening: the payload is the buffer itself, and after the
    opening each rank holds all p buffers and reduces them in rank order (gathered.py): one
    latency per round and no extra message at all. Larger calls send trailer-only blocks,
    then run their algorithm on exactly known sizes, on another tag.
  * Nothing is written into the caller's buffer before the verdict, so a failed call leaves
    inputs intact. Only when something went wrong, the slow path runs: the ranks swap full
    signature records (one more trip round the ring) and all raise the same MismatchError,
    naming what differs and on which ranks.

The same slow path carries the other cross-rank news: a rank with NaN/Inf in its input
(RINGSYNC_CHECK_FINITE=1), a rank whose own arguments were refused (so the others raise
too instead of waiting), and ranks that have called join() (see uneven.py).
"""
from __future__ import annotations

import hashlib
import struct
from enum import IntEnum, IntFlag
from threading import get_ident
from typing import NamedTuple

import numpy as np
from mpi4py import MPI

from . import ops
from .algorithms.ring import ring_allgather_
from .choice import MAX_PAYLOAD_BYTES
from .config import Settings
from .transport.p2p import is_patient, sendrecv
from .transport.shm import NodeSegment


class Kind(IntEnum):
    """The collectives (small integers: they go into records that ranks exchange)."""

    ALLREDUCE = 1
    BROADCAST = 2
    ALLGATHER = 3
    BARRIER = 4
    JOIN = 5
    REFUSED = 6


ALLREDUCE, BROADCAST, ALLGATHER, BARRIER, JOIN, REFUSED = Kind
KIND_NAMES = {ALLREDUCE: "allreduce", BROADCAST: "broadcast", ALLGATHER: "allgather",
              BARRIER: "barrier", JOIN: "join", REFUSED: "(refused its arguments)"}
OP_CODES = {name: i for i, name in enumerate(sorted(ops.OPS), start=1)}
# dtype codes: ops.DTYPE_NAMES, a fixed table (a rank without ml_dtypes still names bfloat16)


class Flag(IntFlag):
    """Why a rank's call is bad before any comparison: it travels in the trailer and the record."""

    NONFINITE = 1   # NaN or Inf in the input (RINGSYNC_CHECK_FINITE)
    REFUSAL = 2     # this rank refused its own arguments
    RELAYED = 4     # this rank received a message of the wrong size during the opening


NONFINITE, REFUSAL = Flag.NONFINITE, Flag.REFUSAL


class Call(NamedTuple):
    """A collective call's signature: every field must be the same on every rank."""

    kind: Kind
    op: str = ""
    dtype: np.dtype | None = None
    shape: tuple[int, ...] = ()
    root: int = -1
    group: int = 1          # tensors fused into the buffer
    layout: int = 0         # a code for those tensors' shapes
    place: int = 0          # where the buffer lies: 0 private host memory, DEVICE (a GPU), or
                            # for one read in place, (shared window + 1) << 40 | byte offset
    name: str | None = None


DEVICE = -1     # Call.place of a device (CuPy) buffer


class MismatchError(ValueError):
    """Ranks made different collective calls; raised on every rank with what differs."""


# A signature as a fixed-width record, the row the slow path gathers from every rank.
MAX_DIMS, NAME_BYTES = 8, 64
RECORD = np.dtype([("kind", "<i8"), ("op", "<i8"), ("dtype", "<i8"), ("root", "<i8"),
                   ("group", "<i8"), ("layout", "<i8"), ("place", "<i8"), ("call", "<i8"), ("flags", "<i8"),
                   ("count", "<i8"), ("ndim", "<i8"), ("dims", "<i8", (MAX_DIMS,)),
                   ("name", f"S{NAME_BYTES}")])

# The trailer of an opening block: the signature's 128-bit digest (two 64-bit halves), the
# call number (call order) and the flags.
TRAILER = struct.Struct("<qqqq")
TRAILER_BYTES = TRAILER.size
OPENING_TAG = 1       # every opening message; the algorithms' own travel on tag 0
_BYTE = MPI.BYTE


def make_record(call: Call, number: int = 0, flags: int = 0) -> np.ndarray:
    """The record (a 0-d array of RECORD) of `call`, made as its `number`-th call."""
    row = np.zeros((), dtype=RECORD)
    shape = tuple(int(d) for d in call.shape)
    row["kind"], row["op"] = int(call.kind), OP_CODES.get(call.op, 0)
    row["dtype"] = ops.dtype_code(call.dtype)
    row["root"], row["group"], row["layout"] = call.root, call.group, call.layout
    row["place"] = call.place
    row["call"], row["flags"] = number, flags
    row["count"], row["ndim"] = int(np.prod(shape, dtype=np.int64)), len(shape)
    row["dims"][:min(len(shape), MAX_DIMS)] = shape[:MAX_DIMS]
    row["name"] = (call.name or "").encode()[:NAME_BYTES]
    return row


def digest(call: Call) -> tuple[int, int]:
    """128 bits of BLAKE2b over `call`'s whole record (call number and flags aside), and over
    its full shape and name, which the record cuts at 8 dimensions and 64 bytes. Two different
    calls with one digest would be a BLAKE2b collision: not an accident anyone will meet, nor
    one anyone can build (unlike a hash the size of an MPI tag)."""
    h = hashlib.blake2b(make_record(call).tobytes(), digest_size=16)
    h.update(repr((tuple(call.shape), call.name)).encode())
    lo, hi = struct.unpack("<qq", h.digest())
    return lo, hi


def _ceil_log2(p: int) -> int:
    return (p - 1).bit_length()


class Checker:
    """This rank's side of the agreement: call counter, the armed call, the opening, the verdict.

    One per World. A collective calls arm() to get a guard (this object, or None when the
    check is off), runs agree() (or rides on it), then settle() if `bad` was set.
    """

    def __init__(self, comm: MPI.Comm, settings: Settings, segment: NodeSegment | None = None,
                 small_bytes: int | None = None) -> None:
        self.comm = comm
        # With every rank on one node and the shared-memory transport, the opening is a sync
        # point on the node's segment instead of messages (_agree_shared).
        self.segment = segment
        p, r = comm.Get_size(), comm.Get_rank()
        self.size, self.rank = p, r
        # On with either check (a NaN found on one rank must reach them all); off on one rank.
        self.enabled = (settings.check_agreement or settings.check_finite) and p > 1
        self.finite = settings.check_finite
        self.comm_thread = None  # the asynchronous API's thread and queue, once started (handles.py)
        self.calls = 0          # collective calls made on this rank: the call-order check
        self.call = 0           # the call counter when the current call was armed
        self._key: tuple = ()
        self.bad = False        # True once this rank knows the current call went wrong
        self.flags = 0
        self._digest = (0, 0)
        self._digests: dict[tuple, tuple[int, int]] = {}
        self.joined: set[int] = set()    # ranks seen (by every rank alike) to have joined
        self.last_joined = -1
        # The opening: Bruck rounds (distance 2^k, blocks m_k), and room for p of the
        # largest blocks any rank may send, so no receive is ever too short.
        # The largest payload an opening carries: RINGSYNC_SMALL_BYTES, capped so that the p
        # blocks stay a modest buffer (a larger small all-reduce opens, then runs doubling).
        # (On one node in shared memory the payloads stay in the slots: no cap but the slot's.)
        small = settings.small_bytes if small_bytes is None else small_bytes
        self.payload_limit = min(small, MAX_PAYLOAD_BYTES) if segment is None else min(small, segment.slot_bytes)
        self.capacity = _pad8(self.payload_limit) + TRAILER_BYTES
        self.rounds = [(1 << k, min(1 << k, p - (1 << k))) for k in range(_ceil_log2(p))]
        self.blocks = np.zeros(p * self.capacity if p > 1 else 0, dtype=np.uint8)
        self._plans: dict[int, list[tuple]] = {}
        self._slots: dict[tuple[np.dtype, int], list[np.ndarray]] = {}
        self._last_count, self._last_dtype, self._last_parity, self._last_views = -1, None, -1, []
        self.status = MPI.Status()

    # -- the fast path -------------------------------------------------------------------

    @property
    def current(self) -> Call | None:
        """The call armed last (None before the first)."""
        return Call(*self._key) if self._key else None

    @property
    def name(self) -> str | None:
        return self._key[-1] if self._key else None

    def arm(self, kind: Kind, op: str = "", dtype: np.dtype | None = None, shape: tuple = (), *,
            root: int = -1, group: int = 1, layout: int = 0, place: int = 0,
            name: str | None = None) -> Checker | None:
        """Count this call and note its signature (the fields of a Call); returns the guard
        for the algorithm, or None if the check is off.

        Asynchronous calls in flight (handles.py) run first: a call from any other thread
        than the communication thread waits for them here, so it comes after them (and
        raises if one of them left this rank out of step)."""
        queue = self.comm_thread
        if queue is not None and (queue.pending or queue.broken) and queue.ident != get_ident():
            queue.wait_idle()
        self.calls += 1
        if not self.enabled:
            return None
        key = (kind, op, dtype, shape, root, group, layout, place, name)   # a plain tuple: cheap to hash
        fingerprint = self._digests.get(key)
        if fingerprint is None:     # a training loop makes the same calls over and over: once each
            if len(self._digests) > 4096:
                self._digests.clear()
            fingerprint = self._digests[key] = digest(Call(*key))
        self._digest, self._key, self.call = fingerprint, key, self.calls
        self.bad, self.flags = False, 0
        return self

    def slots(self, dtype: np.dtype, count: int) -> list[np.ndarray]:
        """Typed views of the payloads of the p blocks (this rank's first; slot i holds rank
        r+i's) for an opening that carries `count` elements of `dtype` (at most payload_limit bytes)."""
        seg = self.segment
        if seg is not None:         # the next episode's slots in the node's segment
            parity = (seg.episode + 1) & 1
            if count == self._last_count and dtype is self._last_dtype and parity == self._last_parity:
                return self._last_views     # (hot path) as last time
            key = (dtype, count, parity)
        else:
            if count == self._last_count and dtype is self._last_dtype:     # (hot path) as last time
                return self._last_views
            key, parity = (dtype, count), 0
        views = self._slots.get(key)
        if views is None:
            if len(self._slots) > 256:
                self._slots.clear()
            if seg is not None:
                by_rank = seg.views(parity, dtype, count)
                views = [by_rank[(self.rank + i) % self.size] for i in range(self.size)]
            else:
                step = _pad8(count * dtype.itemsize) + TRAILER_BYTES
                views = [self.blocks[i * step:i * step + count * dtype.itemsize].view(dtype)
                         for i in range(self.size)]
            self._slots[key] = views
        self._last_count, self._last_dtype, self._last_parity, self._last_views = count, dtype, parity, views
        return views

    def agree(self, nbytes: int = 0) -> None:
        """The opening: all-gather every rank's block (an `nbytes` payload already written
        into slot 0, then the trailer), compare, and set `bad` alike on every rank."""
        if self.segment is not None:
            self._agree_shared()
            return
        step = ((nbytes + 7) & ~7) + TRAILER_BYTES
        plan = self._plans.get(step) or self._plan(step)
        blocks, comm, status = self.blocks, self.comm, self.status
        trailer = step - TRAILER_BYTES
        lo, hi = self._digest
        TRAILER.pack_into(blocks, trailer, lo, hi, self.call, self.flags)
        relayed = False
        exchange = sendrecv if is_patient() else None     # (the communication thread: handles.py)
        for send, dest, recv, source, expected in plan:
            if exchange is None:        # (hot path) the blocking call itself
                comm.Sendrecv([send, _BYTE], dest, OPENING_TAG, [recv, _BYTE], source, OPENING_TAG, status)
            else:
                exchange(comm, send, dest, recv, source, OPENING_TAG, OPENING_TAG, status)
            if status.Get_count(_BYTE) != expected and not relayed:
                relayed = True      # a neighbour in another call: say so to whoever we forward to
                TRAILER.pack_into(blocks, trailer, lo, hi, self.call, self.flags | Flag.RELAYED)
        if relayed or self.flags:
            self.bad = True
            return
        # Every rank's trailer must equal ours (flags included: all zero).
        mine, unpack = (lo, hi, self.call, 0), TRAILER.unpack_from
        if self.size == 2:      # (hot path) one other block, no generator
            self.bad = unpack(blocks, step + trailer) != mine
        else:
            self.bad = any(unpack(blocks, i * step + trailer) != mine for i in range(1, self.size))

    def _agree_shared(self) -> None:
        """The opening on one node: an episode of the segment whose payload is already in this
        rank's slot; the trailers sit in the control lines. One sync point, then every rank
        compares every trailer with its own (the same verdict everywhere, as above)."""
        seg = self.segment
        parity = seg.begin()
        mine = (*self._digest, self.call, self.flags)
        trailers = seg.trailers[parity]
        TRAILER.pack_into(trailers[self.rank], 0, *mine)
        seg.sync()
        if self.flags:
            self.bad = True
        elif self.size == 2:        # (hot path) one other trailer, no generator
            self.bad = TRAILER.unpack_from(trailers[1 - self.rank]) != mine
        else:
            unpack = TRAILER.unpack_from
            self.bad = any(unpack(trailers[q]) != mine for q in range(self.size) if q != self.rank)

    def _plan(self, step: int) -> list[tuple]:
        """Per round: (send view, dest, receive view, source, expected bytes), for blocks of `step`."""
        p, r, blocks = self.size, self.rank, memoryview(self.blocks)
        plan = []
        for distance, count in self.rounds:
            # Receive with room for `count` of the largest blocks: whatever a rank in another
            # call sends, it fits (and then fails the byte-count check).
            start = distance * step
            plan.append((blocks[:count * step], (r - distance) % p,
                         blocks[start:start + count * self.capacity], (r + distance) % p,
                         count * step))
        self._plans[step] = plan
        return plan

    def refuse(self, exc: BaseException) -> None:
        """This rank refused its own arguments (it raises `exc` next): fail the others' call too.

        Whatever they called, it begins with the opening; meet it with a poisoned block and
        join the slow path, so that they raise instead of waiting for us.
        """
        if not self.enabled:
            return
        self.arm(REFUSED, name=type(exc).__name__)
        self.poison(REFUSAL)
        self.agree()
        try:
            self.settle()
        except (MismatchError, FloatingPointError):
            pass                    # this rank raises its own, more precise error

    def poison(self, flag: int) -> None:
        """Mark this call bad from the start, with a reason the slow path will report."""
        self.bad = True
        self.flags |= flag

    # -- the slow path -------------------------------------------------------------------

    def settle(self) -> tuple[np.ndarray, list[int]]:
        """After a bad call: share every rank's record, then raise the same error on all ranks.

        Returns (the agreed record, the ranks that have joined) when the only difference is
        that some ranks have called join(): the caller then redoes the call with them.
        """
        table = self.exchange_records()
        verdict, joined = judge(table, self.rank)
        if isinstance(verdict, Exception):
            raise verdict
        return verdict, joined

    def exchange_records(self) -> np.ndarray:
        """Every rank's signature record, in rank order (one trip round the ring)."""
        table = np.zeros(self.size, dtype=RECORD)
        table[self.rank] = self.record()
        ring_allgather_(list(table.view(np.uint8).reshape(self.size, RECORD.itemsize)),
                        self.comm, owned=self.rank)
        # Realign the call counters (a rank that skipped a call would otherwise fail forever).
        self.calls = int(table["call"].max())
        newly = [int(q) for q in np.flatnonzero(table["kind"] == JOIN) if q not in self.joined]
        if newly:
            self.joined.update(newly)
            self.last_joined = max(newly)
        return table

    def record(self) -> np.ndarray:
        """This call's signature as a record."""
        return make_record(self.current or Call(REFUSED), self.call, self.flags)


def _pad8(nbytes: int) -> int:
    return (nbytes + 7) & ~7


# -- reading the records: what differs, and on which ranks --------------------------------

def judge(table: np.ndarray, me: int) -> tuple[object, list[int]]:
    """(the error to raise, or the agreed record when only joined ranks differ; joined ranks)."""
    flags = table["flags"]
    joined = [int(q) for q in np.flatnonzero(table["kind"] == JOIN)]
    active = [q for q in range(len(table)) if q not in joined]
    refused = [int(q) for q in np.flatnonzero(flags & REFUSAL)]
    callers = [q for q in active if q not in refused] or active or [0]
    head = _describe_call(table[callers[0]])
    if refused:
        why = ", ".join(f"{_name(table[q])} on rank {q}" for q in refused)
        return MismatchError(f"{head}: the call was refused because of invalid arguments "
                             f"({why}; see the error there)"), joined
    nonfinite = [int(q) for q in np.flatnonzero(flags & NONFINITE)]
    if nonfinite:
        return FloatingPointError(f"{head}: NaN or Inf in the input on {_ranks(nonfinite)}"), joined
    if not active:
        return table[0], joined
    differences = _differences(table, active)
    if len({int(table[q]["kind"]) for q in active}) > 1:
        head = f"collective call #{table[active[0]]['call']}"
    if differences:
        return MismatchError(f"{head}: " + "; ".join(differences)), joined
    first = table[active[0]]
    if first["kind"] == BROADCAST and first["root"] in joined:
        return MismatchError(f"{head}: the root, rank {first['root']}, has joined"), joined
    return first, joined


def _differences(table: np.ndarray, ranks: list[int]) -> list[str]:
    fields = [("collective", lambda row: KIND_NAMES.get(int(row["kind"]), "?"))]
    if len({int(table[q]["kind"]) for q in ranks}) == 1:
        fields += [
            ("call number (call order)", lambda row: f"#{row['call']}"),
            ("op", lambda row: _op_name(row["op"])),
            ("dtype", lambda row: ops.dtype_name(int(row["dtype"]))),
            ("trailing shape" if table[ranks[0]]["kind"] == ALLGATHER else "shape", _shape_text),
            ("root", lambda row: str(row["root"])),
            ("tensor count", lambda row: str(row["group"])),
            ("tensor shapes in the group", lambda row: f"layout {int(row['layout']) & 0xffffffff:08x}"),
            ("buffer", _place_text),
            ("name", lambda row: repr(_name(row))),
        ]
    out = []
    for label, show in fields:
        values: dict[str, list[int]] = {}
        for q in ranks:
            values.setdefault(show(table[q]), []).append(q)
        if len(values) > 1:
            out.append(f"{label} differs: " + " vs ".join(f"{v} on {_ranks(qs)}"
                                                          for v, qs in values.items()))
    return out


def _place_text(row: np.ndarray) -> str:
    place = int(row["place"])
    if place == DEVICE:
        return "device memory"
    return f"shared window #{place >> 40}, byte {place & ((1 << 40) - 1)}" if place else "private memory"


def _describe_call(row: np.ndarray) -> str:
    name = _name(row)
    return f"{KIND_NAMES.get(int(row['kind']), '?')}{f' {name!r}' if name else ''} (call #{row['call']})"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(q) for q in ranks)


def _op_name(code: int) -> str:
    return next((name for name, c in OP_CODES.items() if c == code), "-")


def _shape_text(row: np.ndarray) -> str:
    ndim = int(row["ndim"])
    dims = [str(d) for d in row["dims"][:min(ndim, MAX_DIMS)]]
    if ndim > MAX_DIMS:
        dims.append("...")
    if row["kind"] == ALLGATHER:       # its first dimension may differ: not part of the check
        dims.insert(0, "*")
        ndim += 1
    return "(" + ", ".join(dims) + ("," if ndim == 1 else "") + ")"


def _name(row: np.ndarray) -> str:
    return bytes(row["name"]).rstrip(b"\0").decode(errors="replace")


def record_shape(row: np.ndarray) -> tuple[int, ...]:
    """The shape a record describes (joined ranks use it to take part in the call)."""
    return tuple(int(d) for d in row["dims"][:int(row["ndim"])])


class RecordedCall(NamedTuple):
    """What a joined rank needs to take part in a call it reads from a record."""

    kind: int
    op: str
    dtype: np.dtype | None
    root: int
    count: int


def record_call(row: np.ndarray) -> RecordedCall:
    """(kind, op name, dtype, root, element count) of a record (bfloat16: ImportError
    without ml_dtypes, as this rank cannot then take part in the call)."""
    return RecordedCall(int(row["kind"]), _op_name(int(row["op"])), ops.dtype_of(int(row["dtype"])),
                        int(row["root"]), int(row["count"]))

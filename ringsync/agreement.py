"""Cross-rank agreement: every rank must make the same collective call, or every rank raises.

The danger. A collective only works if every rank calls it with the same shape, dtype and
op, and in the same order. If rank 1 reduces a (4,) array while rank 0 reduces a (5,) one,
the ring either hangs (a message that never comes), dies on one rank only (MPI truncation),
or, worst, quietly mixes up numbers. Horovod stops this with a negotiation round before
every reduction: an extra message, paid on every call.

The trick used here: a fingerprint that travels WITH the data, at no extra message.
  * Each call hashes its signature (which collective, op, dtype, shape, root, number of
    tensors, name), adds a call counter that catches calls made in a different order, and
    folds that into the MPI *tag* of its messages. The payload is untouched.
  * Every guarded collective starts with the same p-1 "ring steps": send right, receive
    from the left. For the ring all-reduce these are just its reduce-scatter steps, so the
    check rides on messages that are sent anyway; broadcast and barrier send p-1 empty ones.
  * On each step a rank compares the tag that arrived with its own. Neighbours that agree,
    all the way round the ring, means everybody agrees. A rank that sees a different tag
    (or a message too long for its buffer: MPI's truncation error, caught) marks the call
    bad and sends tag+1 from then on, so the news travels right, one hop per step. Two
    different fingerprints make at least two boundaries in the ring, and p-1 steps carry
    each boundary's news to everyone but the rank just before it, which hears it from the
    other boundary: after p-1 steps, every rank knows.
  * Nothing is written into the caller's buffer during those p-1 steps (ring.py keeps its
    partial sums in scratch while guarded), so a failed call leaves inputs intact.
  * Only then, and only when something went wrong, the slow path runs: the ranks swap full
    signature records (one more trip round the ring) and all raise the same MismatchError,
    naming what differs and on which ranks. Every rank has sent and received exactly the
    same messages, so the world is ready for the next call.

The same slow path carries the other cross-rank news: a rank with NaN/Inf in its input
(RINGSYNC_CHECK_FINITE=1), a rank whose own arguments were refused (so the others raise
too instead of waiting), and ranks that have called join() (see join.py).

For algorithm writers: a guarded all-reduce algorithm must begin with p-1 exchanges
`guard.sendrecv(comm, send, right, recv, left)`, must not write into the caller's buffer
before they are done, and must stop (return) if `guard.bad` is then set. An algorithm that
cannot, calls `guard.agree(comm)` first (p-1 empty ring messages: one latency per step).
"""
from __future__ import annotations

import zlib

import numpy as np
from mpi4py import MPI

from . import ops
from .ring import ring_allgather_

# The collectives, as small integers (Python's hash of a str differs between processes).
ALLREDUCE, BROADCAST, ALLGATHER, BARRIER, JOIN, REFUSED = 1, 2, 3, 4, 5, 6
KIND_NAMES = {ALLREDUCE: "allreduce", BROADCAST: "broadcast", ALLGATHER: "allgather",
              BARRIER: "barrier", JOIN: "join", REFUSED: "(refused its arguments)"}
OP_CODES = {name: i for i, name in enumerate(sorted(ops.OPS), start=1)}
DTYPE_CODES = {dtype: i for i, dtype in enumerate(ops.SUPPORTED_DTYPES, start=1)}

_EMPTY = np.empty(0, dtype=np.uint8)
_BYTE, _ANY_TAG, _TRUNCATE = MPI.BYTE, MPI.ANY_TAG, MPI.ERR_TRUNCATE

# A signature record: fixed-width int64 rows that the slow path gathers from every rank.
_KIND, _OP, _DTYPE, _ROOT, _GROUP, _LAYOUT, _CALL, _FLAGS, _COUNT, _NDIM = range(10)
_MAX_DIMS, _NAME_BYTES = 8, 64
_DIMS = _NDIM + 1                           # shape: up to 8 dimensions
_NAME = _DIMS + _MAX_DIMS                   # the name: 64 bytes of UTF-8
_WIDTH = _NAME + _NAME_BYTES // 8
NONFINITE, REFUSAL = 1, 2                   # flags


class MismatchError(ValueError):
    """Ranks made different collective calls; raised on every rank with what differs."""


class Checker:
    """This rank's side of the agreement: call counter, current fingerprint, verdict.

    One per World. A collective calls arm() to get a guard (this object, or None when the
    check is off), passes it to the algorithm, then settle() if `bad` was set.
    """

    def __init__(self, comm: MPI.Comm, enabled: bool, finite: bool) -> None:
        self.comm = comm
        # On with either check (a NaN found on one rank must reach them all); off on one rank.
        self.enabled = (enabled or finite) and comm.Get_size() > 1   # benchmarks may flip it
        self.finite = finite                             # RINGSYNC_CHECK_FINITE
        self.calls = 0      # collective calls made on this rank: the call-order fingerprint
        self.tag = 0
        self.bad = 0        # 1 once this rank knows the current call went wrong somewhere
        self.flags = 0
        self.signature: tuple = ()     # (kind, op, dtype, shape, root, group, layout, name code)
        self.call = 0                   # the call counter when the current call was armed
        self.name: str | None = None
        self._args: tuple = (None,) * 8    # arm()'s arguments last time, and the hash of
        self._hash = 0                      # their signature (modulo the tag space)
        self.status = MPI.Status()
        self.joined: set[int] = set()    # ranks seen (by every rank alike) to have joined
        self.last_joined = -1
        upper = comm.Get_attr(MPI.TAG_UB) or 32767   # MPI promises at least 32767
        self._space = (upper - 2) // 2

    # -- the fast path -------------------------------------------------------------------

    def arm(self, kind: int, op: str = "", dtype: np.dtype | None = None, shape: tuple = (),
            root: int = -1, group: int = 1, layout: int = 0,
            name: str | None = None) -> Checker | None:
        """Count and fingerprint this call; returns the guard for the algorithm, or None if off."""
        calls = self.calls = self.calls + 1
        if not self.enabled:
            return None
        # Hashing the signature is the costly part, and a training loop makes the same calls
        # over and over: hash each new signature once, then add the call counter to the hash
        # (calls made in a different order still give different tags). `dtype is` first:
        # NumPy says dtype('float64') == None.
        args = (kind, op, dtype, shape, root, group, layout, name)
        if dtype is not self._args[2] or args != self._args:
            self._args = args
            self.signature = (kind, OP_CODES.get(op, 0), DTYPE_CODES.get(dtype, 0), shape,
                              root, group, layout, _name_code(name) if name else 0)
            self._hash = hash(self.signature) % self._space   # small ints are cheaper
            self.name = name
        self.call = calls
        self.tag = 2 + 2 * ((self._hash + calls) % self._space)
        self.bad = self.flags = 0
        return self

    def sendrecv(self, comm: MPI.Comm, sendbuf: np.ndarray, dest: int,
                 recvbuf: np.ndarray, source: int) -> None:
        """One guarded ring step: Sendrecv with this call's tag; note a neighbour that differs."""
        status = self.status
        try:
            # As raw bytes: a neighbour in a different call may send another dtype, and some
            # MPIs (MPICH) assert, rather than err, on a message of part of an element.
            comm.Sendrecv([sendbuf, _BYTE], dest, self.tag + self.bad,
                          [recvbuf, _BYTE], source, _ANY_TAG, status)
        except MPI.Exception as exc:
            # A message longer than our buffer: the neighbour is in a different call. MPI
            # drops the excess and the communicator stays usable.
            if exc.Get_error_class() != _TRUNCATE:
                raise
            self.bad = 1
            return
        if status.Get_tag() != self.tag:
            self.bad = 1

    def agree(self, comm: MPI.Comm) -> None:
        """The p-1 guarded ring steps, on empty messages: for calls that carry no ring data."""
        p, r = comm.Get_size(), comm.Get_rank()
        right, left = (r + 1) % p, (r - 1) % p
        for _ in range(p - 1):
            self.sendrecv(comm, _EMPTY, right, _EMPTY, left)

    def refuse(self, exc: BaseException) -> None:
        """This rank refused its own arguments (it raises `exc` next): fail the others' call too.

        Whatever they called, it begins with p-1 guarded ring steps; meet them with poisoned
        empty ones, and join the slow path, so that they raise instead of waiting for us.
        """
        if not self.enabled:
            return
        self.arm(REFUSED, name=type(exc).__name__)
        self.poison(REFUSAL)
        self.agree(self.comm)
        try:
            self.settle()
        except (MismatchError, FloatingPointError):
            pass                    # this rank raises its own, more precise error

    def poison(self, flag: int) -> None:
        """Mark this call bad from the start, with a reason the slow path will report."""
        self.bad = 1
        self.flags |= flag

    # -- the slow path -------------------------------------------------------------------

    def settle(self) -> tuple[np.ndarray, list[int]]:
        """After a bad call: share every rank's record, then raise the same error on all ranks.

        Returns (the agreed record, the ranks that have joined) when the only difference is
        that some ranks have called join(): the caller then redoes the call with them.
        """
        table = self.exchange_records()
        verdict, joined = judge(table, self.comm.Get_rank())
        if isinstance(verdict, Exception):
            raise verdict
        return verdict, joined

    def exchange_records(self) -> np.ndarray:
        """Every rank's signature record, in rank order (one trip round the ring)."""
        p, r = self.comm.Get_size(), self.comm.Get_rank()
        table = np.zeros((p, _WIDTH), dtype=np.int64)
        table[r] = self.record()
        ring_allgather_(list(table), self.comm, owned=r)
        # Realign the call counters (a rank that skipped a call would otherwise fail forever).
        self.calls = int(table[:, _CALL].max())
        newly = [int(q) for q in np.flatnonzero(table[:, _KIND] == JOIN) if q not in self.joined]
        if newly:
            self.joined.update(newly)
            self.last_joined = max(newly)
        return table

    def record(self) -> np.ndarray:
        """This call's signature as a fixed-width int64 row."""
        kind, op, dtype, shape, root, group, layout, _ = self.signature
        row = np.zeros(_WIDTH, dtype=np.int64)
        row[:_COUNT] = kind, op, dtype, root, group, layout, self.call, self.flags
        row[_COUNT] = np.prod(shape, dtype=np.int64)
        row[_NDIM] = len(shape)
        dims = shape[:_MAX_DIMS]
        row[_DIMS:_DIMS + len(dims)] = dims
        text = (self.name or "").encode()[:_NAME_BYTES].ljust(_NAME_BYTES, b"\0")
        row[_NAME:] = np.frombuffer(text, dtype=np.int64)
        return row


def _name_code(name: str, _cache: dict[str, int] = {}) -> int:  # noqa: B006 - a memo
    """A hash of the tensor's name that is the same in every process (unlike hash(str))."""
    code = _cache.get(name)
    if code is None:
        code = _cache[name] = zlib.crc32(name.encode()) + 1
    return code


# -- reading the records: what differs, and on which ranks --------------------------------

def judge(table: np.ndarray, me: int) -> tuple[object, list[int]]:
    """(the error to raise, or the agreed record when only joined ranks differ; joined ranks)."""
    flags = table[:, _FLAGS]
    joined = [int(q) for q in np.flatnonzero(table[:, _KIND] == JOIN)]
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
    if len({int(table[q, _KIND]) for q in active}) > 1:
        head = f"collective call #{table[active[0], _CALL]}"
    if differences:
        return MismatchError(f"{head}: " + "; ".join(differences)), joined
    if table[active[0], _KIND] == BROADCAST and table[active[0], _ROOT] in joined:
        return MismatchError(f"{head}: the root, rank {table[active[0], _ROOT]}, has joined"), joined
    return table[active[0]], joined


def _differences(table: np.ndarray, ranks: list[int]) -> list[str]:
    fields = [("collective", lambda row: KIND_NAMES.get(int(row[_KIND]), "?"))]
    if len({int(table[q, _KIND]) for q in ranks}) == 1:
        fields += [
            ("call number (call order)", lambda row: f"#{row[_CALL]}"),
            ("op", lambda row: _op_name(row[_OP])),
            ("dtype", lambda row: _dtype_name(row[_DTYPE])),
            ("trailing shape" if table[ranks[0], _KIND] == ALLGATHER else "shape", _shape_text),
            ("root", lambda row: str(row[_ROOT])),
            ("tensor count", lambda row: str(row[_GROUP])),
            ("tensor shapes in the group", lambda row: f"layout {row[_LAYOUT] & 0xffffffff:08x}"),
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


def _describe_call(row: np.ndarray) -> str:
    name = _name(row)
    return f"{KIND_NAMES.get(int(row[_KIND]), '?')}{f' {name!r}' if name else ''} (call #{row[_CALL]})"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(q) for q in ranks)


def _op_name(code: int) -> str:
    return next((name for name, c in OP_CODES.items() if c == code), "-")


def _dtype_name(code: int) -> str:
    return ops.SUPPORTED_DTYPES[code - 1].name if code > 0 else "-"


def _shape_text(row: np.ndarray) -> str:
    ndim = int(row[_NDIM])
    dims = [str(d) for d in row[_DIMS:_DIMS + min(ndim, _MAX_DIMS)]]
    if ndim > _MAX_DIMS:
        dims.append("...")
    if row[_KIND] == ALLGATHER:       # its first dimension may differ: not part of the check
        dims.insert(0, "*")
        ndim += 1
    return "(" + ", ".join(dims) + ("," if ndim == 1 else "") + ")"


def _name(row: np.ndarray) -> str:
    return row[_NAME:].tobytes().rstrip(b"\0").decode(errors="replace")


def record_shape(row: np.ndarray) -> tuple[int, ...]:
    """The shape a record describes (joined ranks use it to take part in the call)."""
    return tuple(int(d) for d in row[_DIMS:_DIMS + int(row[_NDIM])])


def record_call(row: np.ndarray) -> tuple[int, str, np.dtype | None, int, int]:
    """(kind, op name, dtype, root, element count) of a record."""
    code = int(row[_DTYPE])
    return (int(row[_KIND]), _op_name(int(row[_OP])),
            ops.SUPPORTED_DTYPES[code - 1] if code > 0 else None, int(row[_ROOT]), int(row[_COUNT]))

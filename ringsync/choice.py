"""Which algorithm an all-reduce takes: pure rules on the buffer's size and the World's shape.

No MPI here: collectives.py asks these rules for each call (with the World's values), and the
cost model (model/) asks them what ringsync would do on a cluster it has never seen.
"""
from __future__ import annotations

from .config import Settings

# The largest payload the opening over messages carries (agreement.py sizes its buffers by it)
MAX_PAYLOAD_BYTES = 256 * 1024


def choose(nbytes: int, p: int, settings: Settings, shared: bool = False, small: int | None = None) -> str:
    """The algorithm for an all-reduce of `nbytes` bytes on p ranks: 'doubling', 'shared',
    'pipelined' or 'ring'.

    Small buffers: few messages (with the agreement check on, the gathered reduce riding on
    its opening; else recursive doubling); `small` bytes at most (default RINGSYNC_SMALL_BYTES;
    the World's, which is larger on one node in shared memory: config.small_limit). With
    shared memory within the node (`shared`), the rest goes through it (algorithms/shared.py).
    Otherwise the ring (least traffic), pipelined only when a chunk spans several segments:
    below that, segments add messages and save nothing, as a one-segment chunk fits in the
    cache anyway.
    """
    if settings.allreduce != "auto":
        return settings.allreduce
    if nbytes <= (settings.small_bytes if small is None else small):
        return "doubling"
    if shared:
        return "shared"
    return "pipelined" if nbytes > p * settings.segment_bytes else "ring"


def host_choice(nbytes: int, p: int, settings: Settings, *, checked: bool, payload_limit: int,
                node: bool, single_node: bool, small: int) -> str:
    """How a host all-reduce of `nbytes` (> 0, on p > 1 ranks) runs: "ride" (on the agreement
    check's opening, `checked` calls only: gathered.py), "shared" (the node's shared memory:
    shared.py, hierarchical across nodes), "doubling", "pipelined" or "ring".

    `node`: the World has shared-memory segments; `single_node`: every rank on one of them;
    `small`: the World's small limit (config.small_limit); `payload_limit`: the opening's."""
    # (choose() would say "doubling" for a riding size: payload_limit <= the small limit)
    if checked and nbytes <= payload_limit and settings.allreduce == "auto":
        return "ride"
    algorithm = choose(nbytes, p, settings, node, small)
    return "shared" if algorithm == "doubling" and single_node else algorithm

"""collectives.summation_order names the order in which the front door's all-reduce adds
the ranks' values (backup.py averages in it, so that backup:0 is bsp bit for bit): checked
here against allreduce itself, for every size class and the settings that change the path."""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import Verdicts, ringsync_settings

import ringsync as ringsync_pkg
from ringsync.collectives import summation_order

COMM = MPI.COMM_WORLD

ORDER_SETTINGS = [{}, {"RINGSYNC_TRANSPORT": "p2p"},
                  {"RINGSYNC_TRANSPORT": "p2p", "RINGSYNC_SEGMENT_BYTES": "4096"},
                  {"RINGSYNC_ALLREDUCE": "ring"}, {"RINGSYNC_SHM_SLOT_BYTES": "65536"},
                  {"RINGSYNC_CHECK_AGREEMENT": "0"}, {"RINGSYNC_TRANSPORT": "p2p", "RINGSYNC_CHECK_AGREEMENT": "0"},
                  {"RINGSYNC_NODE_SIZE": "2"}]


@pytest.mark.mpi
@pytest.mark.parametrize("settings", ORDER_SETTINGS, ids=lambda s: ",".join(f"{k[9:]}={v}" for k, v in s.items()) or "default")
def test_summation_order_is_the_front_doors_order(rs, settings):
    # Every size class: riding on the opening, the node's gathered reduce, shared memory in
    # pieces, the ring and the pipelined ring. The chain summation_order names, computed here
    # from every rank's input, must give allreduce's average bit for bit.
    rng, v = np.random.default_rng(COMM.rank), Verdicts()
    with ringsync_settings(**settings):
        for n in (1, 1000, 17_000, 70_000, 300_000):
            for dtype in (np.float32, np.float64):
                x = (rng.standard_normal(n) * 10.0 ** rng.integers(-3, 4, n)).astype(dtype)
                got = ringsync_pkg.allreduce(x, op=ringsync_pkg.Average)
                order = summation_order(n, dtype)
                if order is None:       # no single chain (recursive doubling on 3+ ranks)
                    v.expect(COMM.size > 2, "no order on <= 2 ranks")
                    continue
                everyone = np.empty((COMM.size, n), dtype)
                COMM.Allgather(x, everyone)
                inputs = [part / np.asarray(COMM.size, dtype) for part in everyone]
                want = np.empty_like(x)
                v.expect(sorted(lo for lo, _, _ in order) == [lo for lo, _, _ in order]
                         and sum(hi - lo for lo, hi, _ in order) == n, str(order)[:200])
                for lo, hi, ranks in order:
                    want[lo:hi] = inputs[ranks[0]][lo:hi]
                    for q in ranks[1:]:
                        want[lo:hi] += inputs[q][lo:hi]
                v.expect(np.array_equal(got, want),
                         f"n={n} {np.dtype(dtype).name}: {int((got != want).sum())} elements differ")
        v.check()

"""RINGSYNC_MODEL: the cost model picks each all-reduce's algorithm (model/tuner.py).

The pick must be the fastest predicted among what this World can run, the result must be
right whatever it picks, ranks must agree on the file's content, and ranks whose sizes
differ must all raise, never hang."""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import ringsync_settings, shared_folder

from ringsync.agreement import MismatchError
from ringsync.context import world
from ringsync.model.params import Calibration

COMM = MPI.COMM_WORLD
SIZES = [1, 100, 5000, 70000, 600000]      # float32 elements
FILES = itertools.count()


@pytest.fixture(scope="module")
def folder():
    """A folder every rank sees, removed afterwards."""
    with shared_folder("ringsync-model-") as path:
        yield path


def shared_file(folder: str, text_for_rank) -> str:
    """This rank's file holding text_for_rank(rank); every rank's path is the same."""
    path = os.path.join(folder, f"cal{COMM.rank}-{next(FILES)}.json")
    with open(path, "w") as f:
        f.write(text_for_rank(COMM.rank))
    COMM.Barrier()
    return path


def calibration(**fields) -> str:
    return json.dumps(Calibration(**fields).to_json())


def check_sums(rs) -> list[str]:
    """Every size's sum, against MPI's; the algorithms the World picked."""
    from ringsync.collectives import host_algorithm
    picked = []
    for n in SIZES:
        x = np.arange(n, dtype=np.float32) % 7 + COMM.rank      # small integers: exact in any order
        expected = np.empty_like(x)
        COMM.Allreduce(x, expected)
        assert np.array_equal(rs.allreduce(x, op="sum"), expected)
        picked.append(host_algorithm(x.nbytes, checked=True) if COMM.size > 1 else "-")
    return picked


@pytest.mark.mpi
@pytest.mark.parametrize("slow", ["nothing", "shared memory", "messages"])
def test_the_models_pick_follows_the_costs_and_sums_right(rs, folder, slow):
    costs = {"nothing": {}, "shared memory": {"shm_sync": 1.0, "shm_copy": 1e-3},
             "messages": {"local_alpha": 1.0, "local_beta": 1e-3}}[slow]
    path = shared_file(folder, lambda r: calibration(**costs))
    with ringsync_settings(RINGSYNC_MODEL=path):
        picked = check_sums(rs)
        assert world().tuner is not None
        if COMM.size > 1:
            # allreduce_'s direct path rides exactly the sizes the model rides
            from ringsync.collectives import host_algorithm
            edge, limit = world().riding_bytes, world().checker.payload_limit
            for n in {1, edge // 2, edge, edge + 1, limit} - {0, -1}:
                if n <= limit:
                    assert (host_algorithm(n, checked=True) == "ride") == (n <= edge), (n, edge)
            shm = world().node is not None
            if slow == "shared memory" and shm:
                assert not {"shared", "ride"} & set(picked), picked
            if slow == "messages" and shm:
                assert set(picked) <= {"shared", "ride"}, picked
        assert COMM.allgather(picked) == [picked] * COMM.size


@pytest.mark.mpi(min_size=2)
def test_ranks_whose_files_differ_all_raise(rs, folder):
    path = shared_file(folder, lambda r: calibration(gamma=1e-9 * (1 + (r == COMM.size - 1))))
    with pytest.raises(ValueError, match="RINGSYNC_MODEL"), ringsync_settings(RINGSYNC_MODEL=path):
        pass


@pytest.mark.mpi
def test_a_file_that_is_no_calibration_raises_on_every_rank(rs, folder):
    path = shared_file(folder, lambda r: "[1, 2, 3]")
    with pytest.raises(ValueError, match="RINGSYNC_MODEL.*not a ringsync calibration"), \
            ringsync_settings(RINGSYNC_MODEL=path):
        pass


@pytest.mark.mpi(min_size=2)
def test_sizes_that_differ_raise_on_every_rank_whatever_each_would_pick(rs, folder):
    path = shared_file(folder, lambda r: calibration())
    with ringsync_settings(RINGSYNC_MODEL=path):
        # rank 0 small enough to ride on the opening, the others large enough not to
        x = np.ones(10 if COMM.rank == 0 else 300000, dtype=np.float32)
        with pytest.raises(MismatchError):
            rs.allreduce(x)
        assert np.array_equal(rs.allreduce(np.ones(5, dtype=np.float32)), np.full(5, COMM.size, np.float32))

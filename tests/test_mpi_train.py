"""The training loop in-process, on whatever rank count the suite runs with."""
import os
import tempfile

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere

from ringsync.training.data import load_digits_dataset
from ringsync.training.train import (
    Trainer,
    gather_rank_records,
    params_identical,
    parse_args,
    run,
)

COMM = MPI.COMM_WORLD


@pytest.mark.mpi
def test_checkpoints_at_epoch_ends_every_n_steps_and_the_end(rs):
    # save() is replaced below, so this path is never written (and needs no per-rank tmp dir)
    path = os.path.join(tempfile.gettempdir(), "ringsync-test-never-written.npz")
    args = parse_args(["--quiet", "--batch-size", "8", "--max-steps", "30", "--save", path,
                       "--save-every", "7"])
    trainer = Trainer(args, load_digits_dataset())
    saved = []
    trainer.save = lambda p: saved.append(trainer.step)
    run(trainer, quiet=True)
    spe = trainer.steps_per_epoch
    expected = sorted({s for s in range(1, 31) if s % 7 == 0 or s % spe == 0} | {30})
    assert_everywhere(saved == expected, f"saved at {saved}, expected {expected}")
    assert_everywhere(trainer.step == 30 and trainer.steps_run == 30)


@pytest.mark.mpi
def test_every_rank_steps_alike_and_ends_identical(rs):
    args = parse_args(["--quiet", "--batch-size", "5", "--max-steps", "12", "--hidden", "16"])
    trainer = Trainer(args, load_digits_dataset())
    run(trainer, quiet=True)
    identical, digest = params_identical(trainer.params.data)
    assert_everywhere(identical and len(digest) == 64, "parameters differ across ranks")
    records = gather_rank_records(trainer.rank_record())
    ok = [r["rank"] for r in records] == list(range(COMM.size)) and all(
        r["steps"] == 12 and r["allreduce_s"] >= 0 for r in records)
    assert_everywhere(ok, f"rank records {records}")
    # an odd per-rank batch on an odd rank count still covers global batch t exactly
    assert_everywhere(trainer.global_batch == 5 * COMM.size and np.isfinite(trainer.params.data).all())

"""The trainer with gradient compression, in-process, on whatever rank count the suite runs with:
every rank's compression state goes into the checkpoint and comes back to the same rank, so a
resumed run continues on the very same bits (issue 21)."""
import os

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, shared_folder

from ringsync.fusion import grouped_allreduce_
from ringsync.training.checkpoint import CheckpointError, load_checkpoint_with_compression, save_checkpoint
from ringsync.training.data import load_digits_dataset
from ringsync.training.optim import broadcast_parameters
from ringsync.training.train import Trainer, params_identical, parse_args, run

COMM = MPI.COMM_WORLD


@pytest.fixture
def shared_dir():
    """A folder every rank sees, removed afterwards."""
    with shared_folder("ringsync-compression-") as path:
        yield path


def same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        np.asarray(a[k]).dtype == np.asarray(b[k]).dtype and np.asarray(a[k]).shape == np.asarray(b[k]).shape
        and np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes() for k in a)


def trainer_for(flags: list[str]) -> Trainer:
    args = parse_args(["--quiet", "--batch-size", "6", "--hidden", "24,12", "--seed", "4", *flags])
    return Trainer(args, load_digits_dataset())


@pytest.mark.mpi
@pytest.mark.parametrize("compression", [["--compression", "fp16", "--error-feedback"],
                                         ["--compression", "powersgd:2"],
                                         ["--compression", "powersgd:1", "--no-error-feedback"]])
def test_compression_state_survives_a_checkpoint_on_every_rank(rs, shared_dir, compression):
    path = os.path.join(shared_dir, "c.npz")
    # PowerSGD compresses from its 10th step (start_iter): stop past it, with residuals and Qs
    straight = trainer_for(["--max-steps", "12", "--save", path, *compression])
    run(straight, quiet=True)                      # saves at step 12, the end (collective)
    COMM.Barrier()                                 # rank 0 has written the file
    saved = straight.optimizer.compression_state()
    assert_everywhere(len(saved) > 0, "compression_state() is empty")
    if "--no-error-feedback" not in compression:
        assert_everywhere("residual" in saved and np.any(saved["residual"] != 0), "no residual to carry over")
    _, _, states, meta = load_checkpoint_with_compression(path)
    ok = (meta["compression_state_ranks"] == COMM.size and len(states) == COMM.size
          and same_state(states[COMM.rank], saved) and meta["step"] == 12)
    assert_everywhere(ok, f"rank {COMM.rank}'s state in the file differs from its own")

    resumed = trainer_for(["--max-steps", "17", "--resume", path, *compression])
    resumed.restore(path)
    broadcast_parameters(resumed.params, root=0)
    assert_everywhere(same_state(resumed.optimizer.compression_state(), saved), "restored state differs")
    straight.total_steps = 17
    straight.args.save = None
    run(straight, quiet=True)
    run(resumed, quiet=True)
    same = np.array_equal(straight.params.data, resumed.params.data)
    assert_everywhere(same, "the resumed run's parameters differ from the uninterrupted run's")
    assert_everywhere(same_state(resumed.optimizer.compression_state(), straight.optimizer.compression_state()),
                      "the resumed run's compression state differs from the uninterrupted run's")
    identical, _ = params_identical(resumed.params.data)
    assert_everywhere(identical, "parameters differ across ranks")
    for t in (straight, resumed):
        t.params.close()


@pytest.mark.mpi
def test_resume_refuses_a_different_compression_on_every_rank(rs, shared_dir):
    path = os.path.join(shared_dir, "c.npz")
    first = trainer_for(["--max-steps", "3", "--save", path, "--compression", "powersgd:2"])
    run(first, quiet=True)
    COMM.Barrier()
    first.params.close()
    for flags, words in ((["--compression", "powersgd:3"], "--compression powersgd:3"),
                         (["--compression", "powersgd:2", "--no-error-feedback"], "--no-error-feedback"),
                         ([], "this run has --compression none")):
        other = trainer_for(["--max-steps", "5", *flags])
        try:
            other.restore(path)
            message = ""
        except CheckpointError as exc:
            message = str(exc)
        assert_everywhere(words in message and "powersgd:2" in message and "\n" not in message, message)
        other.params.close()


@pytest.mark.mpi
def test_an_uncompressed_checkpoint_holds_no_compression_state(rs, shared_dir):
    path = os.path.join(shared_dir, "c.npz")
    trainer = trainer_for(["--max-steps", "2", "--save", path])
    run(trainer, quiet=True)
    COMM.Barrier()
    _, _, states, meta = load_checkpoint_with_compression(path)
    assert_everywhere(states == [] and meta["compression"] == "none" and "compression_state_ranks" not in meta)
    trainer.params.close()


@pytest.mark.mpi
def test_none_is_the_plain_fused_allreduce_bit_for_bit(rs):
    """--compression none trains the same bits as the trainer did before compression existed:
    one grouped all-reduce of the gradients (in shared memory where it is on), then SGD."""
    none = trainer_for(["--max-steps", "9", "--compression", "none"])
    plain = trainer_for(["--max-steps", "9"])
    plain.allreduce_gradients = lambda: grouped_allreduce_(plain.params.grads(), op=rs.Average)
    plain.apply_update = plain.optimizer.optimizer.step
    run(none, quiet=True)
    run(plain, quiet=True)
    assert_everywhere(np.array_equal(none.params.data, plain.params.data), "none differs from the plain all-reduce")
    assert_everywhere(none.params._grads.shared == plain.params._grads.shared)
    fp16 = trainer_for(["--max-steps", "1", "--compression", "fp16"])
    assert_everywhere(not fp16.params._grads.shared, "a compressed run's gradients need no shared memory")
    for t in (none, plain, fp16):
        t.params.close()


@pytest.mark.mpi
def test_a_checkpoint_from_before_compression_still_resumes(rs, shared_dir):
    path = os.path.join(shared_dir, "old.npz")
    trainer = trainer_for(["--max-steps", "2", "--save", path])
    run(trainer, quiet=True)
    COMM.Barrier()
    if COMM.rank == 0:                             # the meta record as it was before issue 21
        params, optim, _, meta = load_checkpoint_with_compression(path)
        for key in ("compression", "error_feedback", "compression_signature"):
            del meta[key]
        save_checkpoint(path, params, optim, meta)
    COMM.Barrier()
    resumed = trainer_for(["--max-steps", "4"])
    resumed.restore(path)
    assert_everywhere(resumed.step == 2)
    compressed = trainer_for(["--max-steps", "4", "--compression", "fp16"])
    try:
        compressed.restore(path)
        message = ""
    except CheckpointError as exc:
        message = str(exc)
    assert_everywhere("trained with --compression none" in message, message)
    for t in (trainer, resumed, compressed):
        t.params.close()

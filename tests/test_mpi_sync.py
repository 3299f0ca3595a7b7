"""The sync modes in-process, on whatever rank count the suite runs with: each exactness
claim goes through the mode's own code path; the mode's communicator must end empty."""
import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, ringsync_settings, same_bits_everywhere

import ringsync as ringsync_pkg
from ringsync.training import sync
from ringsync.training.data import epoch_permutation, load_digits_dataset, shard_indices
from ringsync.training.nn import MLP
from ringsync.training.optim import SGD
from ringsync.training.sync import common
from ringsync.training.sync.backup import Backup
from ringsync.training.train import Trainer, parse_args, run

COMM = MPI.COMM_WORLD
DATA = load_digits_dataset()


def train(flags, steps=12):
    """A Trainer run under --sync as the flags say; returns (trainer, report fields, mode)."""
    args = parse_args(["--quiet", "--max-steps", str(steps), "--batch-size", "8", *flags])
    sync.check_args(args, COMM.size, pytest.fail)
    trainer = Trainer(args, DATA)
    mode = sync.SyncRun(args, trainer)
    seconds = mode.run(run, quiet=True)
    fields, _ = mode.finish(seconds)
    return trainer, fields, mode


@pytest.mark.mpi
def test_backup_0_equals_bsp_bitwise(rs):
    # The default model's gradient (69 KB) is above RINGSYNC_SMALL_BYTES: with messages only,
    # bsp runs ring.py's ring, whose order of additions backup:0 follows.
    with ringsync_settings(RINGSYNC_TRANSPORT="p2p"):
        bsp, _, _ = train([], steps=5)
        backup, fields, _ = train(["--sync", "backup:0"], steps=5)
    assert_everywhere(np.array_equal(bsp.params.data, backup.params.data), "backup:0 differs from bsp")
    assert_everywhere(same_bits_everywhere(backup.params.data))
    assert_everywhere(fields["dropped_gradients"]["total"] == 0 and fields["sync"] == "backup:0")


@pytest.mark.mpi(min_size=2)
def test_backup_drops_b_gradients_per_step_and_stays_identical(rs):
    trainer, fields, _ = train(["--sync", "backup:1", "--hidden", "16"])
    dropped = fields["dropped_gradients"]
    # every step goes ahead with exactly p-1 gradients; the late ones are dropped or never computed
    assert_everywhere(sum(dropped["used_per_rank"]) == 12 * (COMM.size - 1), str(dropped))
    assert_everywhere(len(dropped["per_rank"]) == COMM.size and dropped["skipped_steps_per_rank"][0] == 0)
    assert_everywhere(same_bits_everywhere(trainer.params.data), "parameters differ across ranks")


@pytest.mark.mpi
def test_local_1_without_momentum_equals_bsp_to_rounding(rs):
    flags = ["--momentum", "0", "--hidden", "16"]
    bsp, _, _ = train(flags)
    local, fields, _ = train([*flags, "--sync", "local:1"])
    close = np.allclose(bsp.params.data, local.params.data, rtol=1e-5, atol=1e-6)
    assert_everywhere(close, f"max diff {np.abs(bsp.params.data - local.params.data).max()}")
    div = fields["param_divergence"]
    assert_everywhere(div["count"] == 12 and div["period"] == 1)
    assert_everywhere(same_bits_everywhere(local.params.data))


@pytest.mark.mpi(min_size=2)
def test_local_h_records_drift_and_ends_averaged(rs):
    trainer, fields, _ = train(["--sync", "local:5", "--hidden", "16"], steps=12)
    div = fields["param_divergence"]
    # averagings after steps 5 and 10, and the closing one after step 12
    assert_everywhere([s for s, _ in div["points"]] == [5, 10, 12] and div["max"] > 0, str(div))
    assert_everywhere(same_bits_everywhere(trainer.params.data))


def sequential_sgd(steps, batch, hidden, seed=0):
    """Plain one-process SGD with momentum over the shared sample order: the reference."""
    model = MLP([DATA.features, hidden, DATA.classes], seed=seed, dtype="float32")
    opt = SGD(model.params, lr=0.1, momentum=0.9)
    per_epoch = len(DATA.x_train) // batch
    for k in range(steps):
        epoch, t = divmod(k, per_epoch)
        idx = shard_indices(epoch_permutation(seed, epoch, len(DATA.x_train)), t, batch, 0, 1)
        model.loss_and_grad(np.asarray(DATA.x_train[idx], dtype="float32"), np.asarray(DATA.y_train[idx]))
        opt.step()
    return model.params.data


@pytest.mark.mpi(min_size=2)
def test_async_with_one_worker_is_sequential_sgd_exactly(rs):
    # p-1 servers (sharded when p > 2) and one worker
    steps = 30           # more than one epoch of 1437 // 64 = 22 updates
    trainer, fields, _ = train(["--sync", "async", "--servers", str(COMM.size - 1), "--hidden", "16",
                                "--batch-size", "64"], steps=steps)
    expected = sequential_sgd(steps, 64, 16)
    assert_everywhere(np.array_equal(trainer.params.data, expected), "async(1 worker) != sequential SGD")
    st = fields["staleness"]
    assert_everywhere(st["max"] == 0 and st["count"] == steps * (COMM.size - 1), str(st))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("mode", ["async", "ssp:0"])
def test_parameter_server_shuts_down_with_nothing_left_unreceived(rs, mode):
    args = parse_args(["--quiet", "--max-steps", "20", "--batch-size", "8", "--hidden", "16", "--sync", mode])
    sync.check_args(args, COMM.size, pytest.fail)
    trainer = Trainer(args, DATA)
    run_ = sync.SyncRun(args, trainer)
    run_.run(run)
    ringsync_pkg.barrier()
    left = common.leftovers(run_.mode.comm)
    assert_everywhere(left == 0, f"{left} message(s) left on rank {COMM.rank}")
    fields, timing_report = run_.finish(1.0)
    assert_everywhere(trainer.step == 20 and fields["staleness"]["count"] == 20)
    workers = [r for r in timing_report["ranks"] if r["role"] == "worker"]
    assert_everywhere(sum(r["units"] for r in workers) == 20)
    if mode == "ssp:0" and COMM.size > 2:     # lock-step: the workers' counts differ by at most one
        counts = [r["units"] for r in workers]
        assert_everywhere(max(counts) - min(counts) <= 1, str(counts))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("backups", [0, 1])
def test_a_backup_gradient_of_the_wrong_size_raises_on_every_rank(rs, backups):
    params = np.zeros(100, dtype=np.float32)
    b = Backup(backups, params)
    bad = COMM.rank == COMM.size - 1
    grad = np.ones(101 if bad else 100, dtype=np.float32)
    raised = None
    try:
        b.exchange(grad, lambda: None)
        b.close()
    except ringsync_pkg.MismatchError as exc:
        raised = str(exc)
    assert_everywhere(raised is not None, "no MismatchError on this rank")
    assert_everywhere("101" in raised, raised)


@pytest.mark.mpi(min_size=2)
def test_backup_set_up_with_different_models_raises_on_every_rank(rs):
    with pytest.raises(ringsync_pkg.MismatchError, match="disagree"):
        Backup(0, np.zeros(10 + (COMM.rank == 1), dtype=np.float32))

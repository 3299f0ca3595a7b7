"""The sync modes in-process, on whatever rank count the suite runs with: each exactness
claim goes through the mode's own code path; the mode's communicator must end empty."""
import time

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
@pytest.mark.parametrize("transport", ["p2p", "auto"])
def test_backup_0_equals_bsp_bitwise(rs, transport):
    # The default model's gradient (69 KB): with messages only (p2p) bsp runs ring.py's ring;
    # under the default transport on one node, the shared-memory gathered reduce, in rank
    # order. backup:0 adds in whichever order bsp's all-reduce uses (summation_order).
    with ringsync_settings(RINGSYNC_TRANSPORT=transport):
        bsp, _, _ = train([], steps=5)
        backup, fields, _ = train(["--sync", "backup:0"], steps=5)
    assert_everywhere(np.array_equal(bsp.params.data, backup.params.data), "backup:0 differs from bsp")
    assert_everywhere(same_bits_everywhere(backup.params.data))
    assert_everywhere(fields["dropped_gradients"]["total"] == 0 and fields["sync"] == "backup:0")


def gradient(rank, step, n=17_000):
    """A gradient whose value names its rank and step: 2**rank * (step + 1), exact in float32."""
    return np.full(n, 2.0 ** rank * (step + 1), dtype=np.float32)


def run_backup(backups, delay, steps, n=17_000):
    """Backup:B on constant gradients of n elements (the trainer's 69 KB: MPI sends them by
    rendezvous, reading the buffer until the receiver takes them), each rank sleeping
    delay(rank, step) s before its gradient of `step`; returns ({step: the result this rank
    applied}, the report fields)."""
    mode = Backup(backups, np.zeros(n, dtype=np.float32))
    results, step = {}, 0
    while step < steps:
        time.sleep(delay(COMM.rank, step))
        grad = gradient(COMM.rank, step, n)
        applied: list[float] = []
        skipped = mode.exchange(grad, lambda g=grad, a=applied: a.append(float(g[0])))
        for k, value in enumerate(applied):          # the results a late rank took and skipped past
            results[step + k] = value
        results[step + skipped] = float(grad[0]) if np.all(grad == grad[0]) else float("nan")
        step += 1 + skipped
    return results, mode.close()


@pytest.mark.mpi(min_size=3)
def test_a_late_rank_never_overwrites_a_gradient_still_in_flight(rs):
    # Issue 23's repro: the last rank is 1 s late at step 0, so steps 0 and 1 go ahead without
    # it and it skips step 1; its step-0 gradient is still unreceived (rank 0 is slow before
    # step 2) when it sends step 2's. Step 2 then has every rank but rank 0, in time.
    last = COMM.size - 1

    def delay(rank, step):
        return 1.0 if (rank, step) == (last, 0) else 1.5 if (rank, step) == (0, 2) else 0.0
    results, fields = run_backup(1, delay, steps=4)
    want = float(np.mean([gradient(r, 2)[0] for r in range(1, COMM.size)]))
    assert_everywhere(results.get(2) == want, f"step 2 gave {results.get(2)}, want {want}: {results}")
    dropped = fields["dropped_gradients"]
    assert_everywhere(dropped["skipped_steps_per_rank"][last] >= 1 and dropped["per_rank"][0] >= 1, str(dropped))


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("backups", [1, 2])
def test_a_late_rank_0_is_dropped_like_any_rank(rs, backups):
    # Rank 0 is 0.5 s late at step 1, every other rank on time: p-B others are there before
    # it, so rank 0's gradient is one of the B dropped (and the other B-1 are on-time ranks).
    results, fields = run_backup(backups, lambda rank, step: 0.5 if (rank, step) == (0, 1) else 0.0, steps=3)
    exact = results.get(1, 0.0) * (COMM.size - backups) / 2     # the sum of the 2**rank used
    total = round(exact) if np.isfinite(exact) else -1         # (the average is rounded to float32)
    used = [r for r in range(COMM.size) if total >> r & 1]
    assert_everywhere(abs(exact - total) < 1e-3 and len(used) == COMM.size - backups and 0 not in used,
                      f"step 1 used ranks {used} (result {results.get(1)})")
    assert_everywhere(fields["dropped_gradients"]["per_rank"][0] >= 1, str(fields["dropped_gradients"]))


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


def sequential_sgd(steps, batch, hidden, momentum, seed=0):
    """Plain one-process SGD with momentum over the shared sample order: the reference."""
    model = MLP([DATA.features, hidden, DATA.classes], seed=seed, dtype="float32")
    opt = SGD(model.params, lr=0.1, momentum=momentum)
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
    expected = sequential_sgd(steps, 64, 16, trainer.args.momentum)     # (async's default: 0.5)
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

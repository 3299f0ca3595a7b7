"""ringsync-train --sync MODE end to end, as subprocess jobs: a failing worker ends the job,
bad settings exit 2 in one line, and the report carries each mode's fields."""
import json
import time

import pytest
from mpitools import program_lines, run_mpi

from ringsync.training.train import parse_args

SMALL = ["--quiet", "--hidden", "8", "--batch-size", "8"]


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("mode", ["ssp:1", "async"])
def test_a_worker_that_raises_ends_the_job_on_every_rank(ranks, mode):
    t0 = time.monotonic()
    result = run_mpi(ranks, ["tests/sync_fail_job.py", *SMALL, "--sync", mode, "--max-steps", "100000",
                             "--epochs", "1000"], timeout=60)
    seconds = time.monotonic() - t0
    assert result.returncode != 0
    assert f"uncaught exception on rank {ranks - 1}" in result.stderr, result.stderr[-2000:]
    assert "injected failure in a worker" in result.stderr
    assert seconds < 30, seconds


@pytest.mark.parametrize("flags, says", [
    (["--sync", "sideways"], "--sync: must be one of"),
    (["--sync", "backup:2"], "B must be smaller than the 2 rank(s)"),
    (["--sync", "async", "--servers", "2"], "needs a worker"),
    (["--sync", "async", "--straggler", "0:0.01"], "rank 0 is a parameter server"),
    (["--sync", "local:2", "--save", "ck.npz"], "--save is not supported with --sync local:2"),
    (["--sync", "ssp:1", "--timeline", "t.json"], "--timeline is not supported"),
])
def test_bad_sync_settings_exit_2_with_one_line(flags, says):
    result = run_mpi(2, ["-m", "ringsync.training.train", *SMALL, "--max-steps", "1", *flags], timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = program_lines(result.stderr)      # the program's own, whatever the launcher adds
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_report_fields_of_ssp_with_two_servers_and_a_straggler(tmp_path):
    report = tmp_path / "ssp.json"
    result = run_mpi(4, ["-m", "ringsync.training.train", *SMALL, "--sync", "ssp:1", "--servers", "2",
                         "--staleness-lr", "--straggler", "3:0.002", "--epochs", "1", "--momentum", "0",
                         "--target-accuracy", "0.3", "--curve-every", "20", "--report", str(report)],
                     timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(report.read_text())
    per_epoch = doc["train_samples"] // 8
    assert doc["sync"] == "ssp:1" and doc["steps"] == per_epoch and doc["servers"] == 2
    assert doc["params_identical_across_ranks"]
    st = doc["staleness"]
    assert st["count"] == 2 * per_epoch and st["lr_scaled"] and st["max"] >= 0
    assert sum(st["histogram"].values()) == st["count"]
    workers = [r for r in doc["ranks"] if r["role"] == "worker"]
    assert [r["rank"] for r in workers] == [2, 3] and sum(r["units"] for r in workers) == per_epoch
    # ssp:1 keeps the fast worker within one step of the straggler: their batches differ by
    # at most one (which of them draws the odd one is a race: 90/89 quiet, 89/90 under load)
    assert abs(workers[0]["units"] - workers[1]["units"]) <= 1, workers
    assert [p["units"] for p in doc["curve"]][:2] == [20, 40] and doc["curve"][-1]["units"] == per_epoch
    assert doc["steps_to_accuracy"] is not None, doc["curve"]
    assert doc["samples_to_accuracy"] == 8 * doc["steps_to_accuracy"]
    assert doc["time_to_accuracy_s"] is not None and doc["straggler"]["mode"] == "ssp:1"


@pytest.mark.parametrize("flags, momentum", [
    ([], 0.9), (["--sync", "backup:1"], 0.9), (["--sync", "local:2"], 0.9),
    (["--sync", "async"], 0.5), (["--sync", "ssp:1"], 0.5),
    (["--sync", "async", "--momentum", "0.9"], 0.9), (["--momentum", "0.3"], 0.3),
])
def test_the_default_momentum_depends_on_the_mode_and_an_explicit_one_wins(flags, momentum):
    assert parse_args(flags).momentum == momentum


@pytest.mark.parametrize("flags, momentum", [
    ([], 0.9), (["--sync", "async"], 0.5), (["--sync", "ssp:1"], 0.5), (["--sync", "async", "--momentum", "0.9"], 0.9),
])
def test_the_report_and_the_summary_show_the_momentum_used(tmp_path, flags, momentum):
    report = tmp_path / "r.json"
    result = run_mpi(2, ["-m", "ringsync.training.train", "--hidden", "8", "--batch-size", "8", "--max-steps", "4",
                         *flags, "--report", str(report)], timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(report.read_text())["momentum"] == momentum
    assert f"momentum {momentum}" in result.stdout, result.stdout

"""The sync modes' pure parts: mode parsing, message framing, the curve and its target maths,
histograms, and the lab's table from a report."""
import subprocess
import sys

import numpy as np
import pytest
from mpitools import ROOT

from ringsync.training.sync import parse_sync
from ringsync.training.sync.common import header, histogram, pack, payload
from ringsync.training.sync.curve import Curve, to_accuracy

sys.path.insert(0, str(ROOT / "benchmarks"))
import sync_vs_async as lab


@pytest.mark.parametrize("text, kind, value", [("bsp", "bsp", None), ("async", "async", None),
                                               ("backup:0", "backup", 0), ("backup:3", "backup", 3),
                                               ("local:1", "local", 1), ("ssp:0", "ssp", 0), (" ssp:2 ", "ssp", 2)])
def test_parse_sync(text, kind, value):
    spec = parse_sync(text)
    assert (spec.kind, spec.value) == (kind, value)
    assert spec.parameter_server == (kind in ("ssp", "async"))


@pytest.mark.parametrize("text", ["", "bsp:1", "async:2", "backup", "backup:-1", "local:0", "ssp:x", "sgd"])
def test_parse_sync_rejects(text):
    with pytest.raises(ValueError, match="must be one of"):
        parse_sync(text)


def test_messages_carry_a_header_and_the_exact_payload():
    grad = np.arange(5, dtype=np.float32) / 3
    msg = pack((7, 5, 1), grad)
    assert msg.dtype == np.uint8 and msg.size == 32 + grad.nbytes
    assert header(msg).tolist() == [7, 5, 1, 0]
    assert np.array_equal(payload(msg, np.float32), grad)
    assert pack((1,)).size == 32 and pack((2, 3), grad, out=msg) is msg


def test_curve_snapshots_at_the_interval_and_the_target():
    curve = Curve(interval=10, samples_per_unit=4)
    w = np.zeros(3)
    for step in range(1, 36):
        w[:] = step
        curve.maybe(step, w)
    assert [u for _, u, _, _ in curve.snapshots] == [10, 20, 30]
    assert curve.snapshots[0][3].tolist() == [10, 10, 10]       # a copy, not a view
    points = curve.points(lambda p: float(1 / p[0]), lambda p: float(p[0] / 40))
    assert [p["samples"] for p in points] == [40, 80, 120]
    hit = to_accuracy(points, 0.5)
    assert hit == {"target_accuracy": 0.5, "time_to_accuracy_s": points[1]["wall_s"],
                   "steps_to_accuracy": 20, "samples_to_accuracy": 80}
    assert to_accuracy(points, 0.9)["steps_to_accuracy"] is None
    assert to_accuracy(points, None)["time_to_accuracy_s"] is None


def test_staleness_histogram():
    h = histogram(np.array([0, 1, 1, 3]))
    assert h == {"mean": 1.25, "max": 3, "count": 4, "histogram": {"0": 1, "1": 2, "3": 1}}
    assert histogram(np.array([], dtype=int))["count"] == 0


def test_lab_harmonic_numbers_and_table():
    assert lab.harmonic(0) == 0 and lab.harmonic(1) == 1 and lab.harmonic(4) == pytest.approx(25 / 12)
    doc = {"sync": "async", "steps_this_run": 100, "steps": 100, "epochs": 2.0, "train_seconds": 4.0,
           "global_batch": 32, "time_to_accuracy_s": 1.5, "steps_to_accuracy": 40, "samples_to_accuracy": 1280,
           "train_samples": 1600, "test_accuracy": 0.96, "final_loss": 0.1, "samples_per_second": 800.0,
           "staleness": {"mean": 2.0, "max": 5}, "curve": [],
           "ranks": [{"rank": 0, "role": "server", "units": 0, "wait_s": 0.0},
                     {"rank": 1, "role": "worker", "units": 60, "wait_s": 0.3},
                     {"rank": 2, "role": "worker", "units": 40, "wait_s": 0.2}]}
    row = lab.summarize(doc, "straggler")
    assert row["unit"] == "update" and row["epochs_to_target"] == 0.8 and row["wait_ms_per_unit"] == 5.0
    assert row["s_per_epoch"] == 2.0 and row["dropped_fraction"] is None
    lines = lab.table([row])
    assert len(lines) == 2 and "async" in lines[1] and "2.00/5" in lines[1]


def test_lab_refuses_a_bad_mode_in_one_line():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sync_vs_async.py"), "--modes", "bsp,sideways"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "must be one of" in done.stderr, done.stderr

"""benchmarks/overlap.py: its CLI errors (exit 2, one line), its arithmetic, and a tiny 2-rank run."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from mpitools import ROOT, run_mpi

SCRIPT = ROOT / "benchmarks" / "overlap.py"


def load_overlap_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_overlap", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args", [
    ["--models", "resnet"],
    ["--models", "digits,digits"],
    ["--hidden", "64,x"],
    ["--batch", "0"],
    ["--batch", "lots"],
    ["--fusion-mb", "big"],
    ["--fusion-mb", "-1"],
    ["--steps", "0"],
    ["--rates", "1gbit"],
    ["--cluster", "2by1"],
    ["--cluster", "2x1", "--rates", "fast"],
])
def test_overlap_bad_cli_input_exits_2_with_one_line(args):
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("overlap.py: ") and done.stdout == ""


def test_overlap_arithmetic():
    ob = load_overlap_bench()
    assert ob.efficiency(1.0, 0.8, 0.4, 0.5) == pytest.approx(0.5)       # 0.2 saved of at most 0.4
    assert ob.efficiency(1.0, 1.1, 0.4, 0.2) == pytest.approx(-0.5)      # slower with overlap
    assert ob.efficiency(1.0, 0.9, 0.0, 0.2) is None
    # a bucket per layer: the largest layer's weight and bias, float32
    assert ob.fusion_bytes_for("layer", [64, 128, 64, 10]) == (64 * 128 + 128) * 4     # fc0
    assert ob.fusion_bytes_for("env", [64, 10]) is None and ob.fusion_bytes_for(1 << 20, [64, 10]) == 1 << 20
    assert ob.param_count([64, 128, 64, 10]) == 17226
    steps = {ph: np.array([1.0, 2.0, 3.0, 4.0, 5.0]) for ph in ob.PHASES}
    slow = {"off": {**steps, "step": np.array([10.0] * 5), "backward": np.array([4.0] * 5)},
            "on": {**steps, "step": np.array([8.0] * 5), "sync": np.array([1.0] * 5)},
            "alone": {**steps, "sync": np.array([3.0] * 5)}}
    f = ob.summarize(slow, np.array([3.5, 3.5]), 0.6)
    assert f["step_off_s"] == 10 and f["step_on_s"] == 8 and f["allreduce_alone_s"] == 3
    assert f["bound"] == "allreduce_alone" and f["efficiency"] == pytest.approx(2 / 3)
    assert f["exposed_on_s"] == 1 and f["hidden_vs_alone"] == pytest.approx(2 / 3)
    assert f["comm_on_s"] == 3.5 and f["hidden_fraction"] == 0.6 and f["forward_off_iqr_s"] == [2.0, 4.0]


def test_overlap_runs_both_models(tmp_path):
    """Two ranks, tiny widths, auto batch: the table, the three files, the buckets and the figures."""
    prefix = tmp_path / "ovl"
    done = run_mpi(2, [str(SCRIPT), "--hidden", "64,64", "--features", "32", "--steps", "4", "--warmup", "1",
                       "--block", "3", "--out", str(prefix)], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((tmp_path / "ovl.json").read_text())
    assert (tmp_path / "ovl.png").stat().st_size > 0
    text = (tmp_path / "ovl.txt").read_text()
    assert "smoke run" in text and "efficiency" in text
    rows = {r["model"]: r for r in doc["results"]}
    assert set(rows) == {"sized", "digits"} and doc["meta"]["ranks"] == 2
    digits, sized = rows["digits"], rows["sized"]
    assert digits["params"] == 17226 and digits["batch_per_rank"] == 32 and digits["calibration"] is None
    assert digits["buckets"] == 3 and sum(digits["bucket_bytes"]) == digits["grad_bytes"] == 17226 * 4
    assert sized["sizes"] == [32, 64, 64, 10] and sized["calibration"]["tried"]
    assert sized["batch_per_rank"] == sized["calibration"]["batch"] >= 1
    assert sized["first_bucket_bytes"] == 1 << 20 and sized["fusion_threshold"] == (64 * 64 + 64) * 4
    for r in rows.values():
        assert len(r["per_step_ms"]["off"]["step"]) == len(r["per_step_ms"]["on"]["step"]) == 4
        assert len(r["allreduce_alone_ms"]) == 4 and len(r["comm_on_ms"]) == 4
        assert r["step_off_s"] > 0 and r["step_on_s"] > 0 and r["allreduce_alone_s"] > 0
        assert r["step_off_iqr_s"][0] <= r["step_off_s"] <= r["step_off_iqr_s"][1]
        assert 0 <= r["hidden_fraction"] <= 1
        bound = min(r["backward_s"], r["allreduce_alone_s"])
        assert r["efficiency"] == pytest.approx((r["step_off_s"] - r["step_on_s"]) / bound)
    summary = [line for line in text.splitlines() if line.startswith("  ") and ("sized" in line or "digits" in line)]
    assert [line.split()[0] for line in summary] == ["sized", "digits"]

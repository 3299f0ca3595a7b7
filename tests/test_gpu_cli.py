"""`--device gpu` on the command line: ringsync-train and the all-reduce sweep refuse cleanly
without a GPU (exit 2, one line); with one, training matches the CPU and the sweep checks out.

Subprocess MPI jobs, so these run outside mpiexec (plain pytest): `make test` runs the refusal
check, `make test-gpu` the GPU training check.
"""
import json

import pytest
from mpitools import program_lines, run_mpi

from ringsync.transport import gpu

REASON = gpu.gpu_unavailable_reason()
TRAIN = ["-m", "ringsync.training.train", "--dataset", "synthetic", "--samples", "512", "--features", "16",
         "--hidden", "32", "--epochs", "2", "--batch-size", "16", "--quiet"]
SWEEP = ["benchmarks/allreduce_sweep.py", "--device", "gpu", "-b", "4K", "-e", "1M", "-f", "16",
         "-n", "3", "-r", "2", "-w", "1"]


@pytest.mark.skipif(REASON is None, reason="a GPU is usable here; this checks machines without one")
def test_device_gpu_without_a_gpu_exits_2_with_one_line():
    result = run_mpi(2, TRAIN + ["--device", "gpu"], timeout=120)
    assert result.returncode == 2, result.stderr
    lines = program_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("ringsync-train: error: --device gpu: "), result.stderr
    assert "Traceback" not in result.stderr and "CuPy" in lines[0]


@pytest.mark.skipif(REASON is None, reason="a GPU is usable here; this checks machines without one")
def test_sweep_device_gpu_without_a_gpu_exits_2_with_one_line():
    result = run_mpi(2, SWEEP, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = program_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("allreduce_sweep.py: error: --device gpu: "), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(REASON is None, reason="a GPU is usable here; this checks machines without one")
def test_gpu_example_without_a_gpu_exits_2_with_one_line():
    result = run_mpi(2, ["examples/gpu_allreduce.py"], timeout=120)
    lines = program_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("gpu_allreduce.py: ") and "Traceback" not in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"no GPU: {REASON}")
def test_gpu_example_runs():
    result = run_mpi(2, ["examples/gpu_allreduce.py"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "as expected: yes; bitwise identical on all ranks: yes" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"no GPU: {REASON}")
def test_gpu_sweep_checks_out(tmp_path):
    out = tmp_path / "sweep.json"
    result = run_mpi(2, SWEEP + ["--json", str(out)], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in rows} >= {"staged", "mpi"}
    assert all(r["check"] == "ok" for r in rows), [(r["impl"], r["size"], r["check"]) for r in rows]


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"no GPU: {REASON}")
def test_gpu_training_matches_cpu_training(tmp_path):
    reports = {}
    for device in ("cpu", "gpu"):
        path = tmp_path / f"{device}.json"
        result = run_mpi(2, TRAIN + ["--device", device, "--report", str(path)], timeout=300)
        assert result.returncode == 0, result.stderr
        reports[device] = json.loads(path.read_text())
    cpu, gpu = reports["cpu"], reports["gpu"]
    assert gpu["device"] == "gpu" and gpu["params_identical_across_ranks"]
    # Same data, same order, same arithmetic up to float32 rounding (GEMMs differ in order).
    assert gpu["final_loss"] == pytest.approx(cpu["final_loss"], rel=1e-3, abs=1e-4)
    assert gpu["test_accuracy"] == pytest.approx(cpu["test_accuracy"], abs=0.02)

"""ringsync's CuPy glue code, run on a NumPy-backed fake CuPy (tests/fake_cupy.py), on the CPU.

GLUE COVERAGE ONLY, never counted as GPU coverage: it runs the Python logic of the device
front doors (both transports), fusion on device arrays and `ringsync-train --device gpu`
(checkpoint and resume included), but nothing CUDA. tests/test_gpu.py is the GPU check.
"""
import json

import pytest
from mpitools import run_mpi

JOB = "tests/fake_cupy_job.py"
TRAIN = ["--dataset", "synthetic", "--samples", "512", "--features", "16", "--hidden", "32",
         "--batch-size", "16", "--quiet"]


@pytest.mark.parametrize("nranks", [2, 3])
def test_device_collectives_glue(nranks):
    result = run_mpi(nranks, [JOB, "collectives"], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"fake-cupy glue: ok on {nranks} ranks" in result.stdout


def test_train_device_gpu_glue_matches_cpu_and_resumes(tmp_path):
    def report(name, args):
        path = tmp_path / f"{name}.json"
        result = run_mpi(2, args + ["--report", str(path)], timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(path.read_text())

    cpu = report("cpu", ["-m", "ringsync.training.train", *TRAIN, "--epochs", "2"])
    gpu = report("gpu", [JOB, "train", *TRAIN, "--epochs", "2", "--device", "gpu"])
    ckpt = str(tmp_path / "ckpt.npz")
    report("half", [JOB, "train", *TRAIN, "--epochs", "1", "--device", "gpu", "--save", ckpt])
    resumed = report("resumed", [JOB, "train", *TRAIN, "--epochs", "2", "--device", "gpu", "--resume", ckpt])
    assert gpu["device"] == "gpu" and gpu["params_identical_across_ranks"]
    assert gpu["final_loss"] == pytest.approx(cpu["final_loss"], rel=1e-5)
    assert resumed["params_sha256"] == gpu["params_sha256"]   # resume is exact


def test_gpu_example_glue():
    code = ("import sys, runpy; sys.path.insert(0, 'tests'); import fake_cupy; fake_cupy.install(); "
            "runpy.run_path('examples/gpu_allreduce.py', run_name='__main__')")
    result = run_mpi(3, ["-c", code], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "as expected: yes; bitwise identical on all ranks: yes" in result.stdout

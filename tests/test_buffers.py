"""gpu.py on the CPU: backend detection, device choice, transport choice, scratch reuse.

None of this touches a GPU; tests/test_gpu.py does, and skips without one.
"""
import subprocess
import sys

import numpy as np
import pytest
from mpitools import ROOT

from ringsync.algorithms.staged import segments
from ringsync.config import Settings
from ringsync.transport import gpu


def test_numpy_arrays_never_import_cupy():
    code = ("import sys, numpy as np, ringsync.transport.gpu as b; "
            "assert b.array_module(np.ones(3)) is np and not b.is_device_array([1, 2]); "
            "assert b.contiguous_copy(np.ones((3, 2)).T).flags.c_contiguous; "
            "assert 'cupy' not in sys.modules, 'cupy was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("local,count,expected", [(0, 1, 0), (1, 1, 0), (3, 2, 1), (5, 4, 1)])
def test_ranks_take_devices_round_robin(monkeypatch, local, count, expected):
    monkeypatch.delenv("RINGSYNC_GPU_DEVICE", raising=False)
    assert gpu.choose_device(count, local) == expected


def test_device_override_by_argument_and_environment(monkeypatch):
    monkeypatch.setenv("RINGSYNC_GPU_DEVICE", "1")
    assert gpu.choose_device(4, local=3) == 1
    assert gpu.choose_device(4, local=3, device=2) == 2
    with pytest.raises(ValueError, match="device must be in \\[0, 4\\).*got 7"):
        gpu.choose_device(4, local=0, device=7)
    with pytest.raises(TypeError, match="device must be an int"):
        gpu.choose_device(4, local=0, device="0")
    monkeypatch.setenv("RINGSYNC_GPU_DEVICE", "9")
    with pytest.raises(ValueError, match="got 9"):
        gpu.choose_device(2, local=0)
    monkeypatch.setenv("RINGSYNC_GPU_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="RINGSYNC_GPU_DEVICE"):
        gpu.choose_device(2, local=0)


def test_transport_setting_and_probe():
    def probe_yes():
        return True, "the probe"

    def probe_no():
        return False, "the probe"

    assert gpu.decide_transport("1", probe_no)[0] == gpu.CUDA_AWARE
    assert gpu.decide_transport("0", probe_yes)[0] == gpu.STAGED
    assert gpu.decide_transport("auto", probe_yes) == (gpu.CUDA_AWARE, "auto: the probe says yes")
    assert gpu.decide_transport("auto", probe_no)[0] == gpu.STAGED


def test_mpi_cuda_probe_answers_and_respects_mpich_switch(monkeypatch):
    supported, how = gpu.mpi_cuda_support()
    assert isinstance(supported, bool) and how
    from mpi4py import MPI
    if MPI.get_vendor()[0] == "MPICH":
        monkeypatch.setenv("MPIR_CVAR_ENABLE_GPU", "0")
        assert gpu.mpi_cuda_support() == (False, "MPIR_CVAR_ENABLE_GPU=0 turns MPICH's GPU support off")


def test_scratch_cache_allocates_once_and_regrows():
    made = []
    cache = gpu.ScratchCache({"pinned": lambda n, dt: made.append(n) or np.empty(n, dt)})
    a = cache.get("pinned", 10, np.float32)
    b = cache.get("pinned", 4, "float32")
    assert made == [10] and b.base is a.base and b.size == 4
    cache.get("pinned", 0, np.float32)
    cache.get("pinned", 11, np.float32)
    cache.get("pinned", 3, np.float64)
    assert made == [10, 11, 3] and cache.allocations == 3


def test_segments_cover_the_buffer():
    assert segments(0, 4) == []
    assert segments(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert segments(3, 1 << 20) == [(0, 3)]


def test_staging_segment_from_environment(monkeypatch):
    monkeypatch.delenv("RINGSYNC_STAGING_SEGMENT", raising=False)
    assert gpu.staging_segment(4, Settings.from_env().staging_segment) == 1 << 18
    monkeypatch.setenv("RINGSYNC_STAGING_SEGMENT", "2")
    assert gpu.staging_segment(8, Settings.from_env().staging_segment) == 1
    monkeypatch.setenv("RINGSYNC_STAGING_SEGMENT", "0")
    with pytest.raises(ValueError, match="RINGSYNC_STAGING_SEGMENT"):
        gpu.staging_segment(4, Settings.from_env().staging_segment)


def test_without_a_gpu_the_reason_is_one_line():
    reason = gpu.gpu_unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is usable here; this test covers machines without one")
    assert "\n" not in reason and ("CuPy" in reason)
    with pytest.raises(gpu.GPUUnavailable):
        gpu.device_count()


@pytest.mark.mpi
def test_force_transport(rs):
    gpu.force_transport(gpu.CUDA_AWARE)
    assert gpu.transport() == gpu.CUDA_AWARE
    gpu.force_transport(gpu.STAGED)
    assert gpu.transport() == gpu.STAGED
    gpu.force_transport(None)
    assert gpu.transport() in (gpu.CUDA_AWARE, gpu.STAGED)
    with pytest.raises(ValueError, match="name must be"):
        gpu.force_transport("nvlink")

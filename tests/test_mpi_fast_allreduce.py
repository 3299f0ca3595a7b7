"""The fast all-reduce paths (pipelined ring, recursive doubling) against the teaching ring and an
oracle (MPI's Allreduce for floats, exact NumPy arithmetic on the gathered inputs for integers).

Every dtype, every op, odd lengths (fewer elements than ranks, chunks that do not divide),
segments small enough that a chunk travels in many pieces, and the same bits on every rank.
"""
from dataclasses import replace

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import (
    Verdicts,
    assert_everywhere,
    exact_integer_allreduce,
    ringsync_settings,
    same_bits_everywhere,
)

from ringsync import ops
from ringsync.algorithms.doubling import recursive_doubling_allreduce_
from ringsync.algorithms.pipelined import pipelined_ring_allreduce_, ring_plan
from ringsync.algorithms.ring import ring_allreduce_
from ringsync.choice import choose
from ringsync.config import Settings

COMM = MPI.COMM_WORLD
LENGTHS = [1, 2, 3, 5, 7, 13, 100, 1001]
UFUNCS = {"sum": np.add, "min": np.minimum, "max": np.maximum}
MPI_OP = {"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}


def rank_data(n, dtype, seed):
    """Different, reproducible data on every rank; small integers so sums never overflow."""
    rng = np.random.default_rng([seed, COMM.rank])
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(n).astype(dtype)
    lo = 0 if np.dtype(dtype).kind == "u" else -20
    return rng.integers(lo, 20, size=n).astype(dtype)


def fast(algorithm, x, reduce, segment):
    """Run one fast algorithm on a copy of x (fresh comm duplicate: isolated message space)."""
    out = x.copy()
    if algorithm == "pipelined":
        scratch = np.empty(2 * max(1, min(segment, -(-x.size // COMM.size))), dtype=x.dtype)
        pipelined_ring_allreduce_(out, COMM, reduce, scratch, segment)
    else:
        recursive_doubling_allreduce_(out, COMM, reduce, np.empty(x.size, dtype=x.dtype))
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["pipelined", "doubling"])
# NumPy's own dtypes (a fixed list: bfloat16 joins ops.SUPPORTED_DTYPES only once some test has
# made one, and has its tests in test_mpi_bf16.py)
@pytest.mark.parametrize("dtype", [name for name in ops.DTYPE_NAMES if name != "bfloat16"])
def test_fast_paths_match_teaching_ring_and_mpi(algorithm, dtype):
    v = Verdicts()
    is_float = np.dtype(dtype).kind == "f"
    for n in LENGTHS:
        x = rank_data(n, dtype, seed=n)
        wide = x.astype(np.float64) if is_float else x      # MPI has no float16: oracle in float64
        for op, reduce in UFUNCS.items():
            teaching = ring_allreduce_(x.copy(), COMM, reduce)
            if is_float:
                oracle = np.empty_like(wide)
                COMM.Allreduce(wide, oracle, op=MPI_OP[op])
            else:          # MPIs differ on integer overflow: exact arithmetic instead
                oracle = exact_integer_allreduce(x, op)
            # a chunk (n / p elements) in many segments, in a few, with a short last one
            # (segments mean nothing to doubling)
            segments = (1,) if algorithm == "doubling" else (1, 7) if n < 50 else (7, 64) if n < 500 else (7, 100)
            for segment in segments:
                got = fast(algorithm, x, reduce, segment)
                if algorithm == "pipelined" or COMM.size <= 2 or not is_float or op != "sum":
                    # Same reduction order as the teaching ring (always for the pipelined ring;
                    # for doubling when p <= 2 or the op is exact): identical bits.
                    ok = np.array_equal(got.view(np.uint8), teaching.view(np.uint8))
                else:      # (doubling only, with its one segment)
                    scale = np.empty_like(wide)
                    COMM.Allreduce(np.abs(wide), scale, op=MPI.SUM)
                    bound = 2 * COMM.size * np.finfo(dtype).eps * scale
                    ok = bool(np.all(np.abs(got.astype(np.float64) - oracle) <= bound))
                if not is_float or op != "sum":  # exact results: equal to the oracle
                    ok = ok and np.array_equal(got.astype(wide.dtype), oracle)
                v.expect(ok, f"{algorithm} {dtype}: wrong for n={n} {op} segment={segment}")
                v.same_bits(got, f"{algorithm} {dtype} n={n} {op} segment={segment}")
    v.check()


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["pipelined", "doubling"])
def test_signed_zeros_and_nans_give_the_same_bits_everywhere(algorithm):
    # min/max of +0 and -0 (or of two NaNs) return whichever operand comes first: the
    # algorithms must fix the operand order so every rank keeps the same bits.
    x = np.array([0.0, -0.0, np.nan, 1.0, -np.nan, 0.0, -0.0], dtype=np.float32)
    x = np.roll(x, COMM.rank)
    for reduce in UFUNCS.values():
        got = fast(algorithm, x, reduce, segment=2)
        assert_everywhere(same_bits_everywhere(got), f"{algorithm} {reduce.__name__}: bits differ")


@pytest.mark.mpi
@pytest.mark.parametrize("algorithm", ["auto", "doubling", "pipelined", "ring"])
def test_front_door_honours_the_algorithm_setting(rs, algorithm):
    with ringsync_settings(RINGSYNC_ALLREDUCE=algorithm, RINGSYNC_SEGMENT_BYTES="40"):
        failures = []
        for n in (0, 1, 5, 999, 20000):
            x = rank_data(n, "float64", seed=n)
            oracle = np.empty_like(x)
            COMM.Allreduce(x, oracle, op=MPI.SUM)
            got = rs.allreduce(x, op="sum")
            ok = same_bits_everywhere(got) and np.allclose(got, oracle, rtol=1e-12)     # (collective first)
            if algorithm in ("ring", "pipelined"):   # checked ring, pipelined ring: ring.py's bits
                ring = ring_allreduce_(x.copy(), COMM, np.add)      # (every rank, whatever `ok` says)
                ok = ok and np.array_equal(got.view(np.uint8), ring.view(np.uint8))
            if not ok:
                failures.append(n)
        assert_everywhere(not failures, f"{algorithm}: wrong for lengths {failures}")


def test_choice_by_size_and_override():
    settings = Settings(allreduce="auto", small_bytes=100, segment_bytes=1000)
    assert choose(100, 2, settings) == "doubling"
    assert choose(101, 2, settings) == "ring"          # a chunk fits in one segment
    assert choose(2000, 2, settings) == "ring"
    assert choose(2001, 2, settings) == "pipelined"    # chunks span several segments
    assert choose(3000, 3, settings) == "ring"
    assert choose(10, 2, replace(settings, allreduce="ring")) == "ring"
    assert choose(10**9, 2, replace(settings, allreduce="doubling")) == "doubling"
    assert choose(5000, 2, settings, shared=True, small=8000) == "doubling"   # gathered on the opening
    assert choose(9000, 2, settings, shared=True, small=8000) == "shared"
    assert settings.small_limit(2, True, 1 << 20) == 1 << 18      # RINGSYNC_SHM_SMALL_BYTES / (p-1)
    assert settings.small_limit(5, True, 1 << 20) == 1 << 16
    assert settings.small_limit(2, True, 4096) == 4096             # within one slot
    assert settings.small_limit(2, False, 1 << 20) == 100


def test_bad_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("RINGSYNC_ALLREDUCE", "fastest")
    with pytest.raises(ValueError, match="RINGSYNC_ALLREDUCE"):
        Settings.from_env()


def test_ring_plan_segments_cover_every_chunk_exactly():
    for n, p, segment in [(0, 3, 4), (1, 4, 1), (10, 3, 3), (1001, 4, 64), (7, 2, 100)]:
        chunks, segments = ring_plan(n, p, segment)
        assert len(chunks) == len(segments) == p
        for chunk, segs in zip(chunks, segments):
            covered = [i for s in segs for i in range(s.start, s.stop)]
            assert covered == list(range(chunk.start, chunk.stop))
            assert all(s.stop - s.start <= segment for s in segs)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["doubling", "pipelined", "ring"])
@pytest.mark.parametrize("n", [10, 30000])
def test_every_algorithm_refuses_mismatched_calls_on_every_rank(rs, algorithm, n):
    # The agreement check (agreement.py) opens every algorithm: lengths that differ across
    # ranks must raise on every rank, leave the input untouched, and leave the world usable.
    with ringsync_settings(RINGSYNC_ALLREDUCE=algorithm):
        x = np.ones(n + COMM.rank, dtype=np.float32)
        raised = False
        try:
            rs.allreduce_(x)
        except ValueError:
            raised = True
        assert_everywhere(raised and bool(np.all(x == 1)), f"{algorithm}: mismatch not refused cleanly")
        ok = rs.allreduce(np.ones(n, dtype=np.float32))
        assert_everywhere(bool(np.all(ok == COMM.size)), f"{algorithm}: the next call went wrong")

"""Gradient compressors: pure logic, no MPI (one "rank": the all-reduce is the identity).

The MPI side (every rank, the agreement check, checkpoints) is tests/test_mpi_compression.py.
"""
import dataclasses

import numpy as np
import pytest
from mpitools import run_mpi

from ringsync import ops
from ringsync.training.compression import (
    CastEngine,
    Compression,
    PowerSGD,
    PowerSGDEngine,
    cast_with_feedback_,
    check_compressor,
    low_rank_product_,
    orthogonalize_,
    parse_compression,
)

U = 2.0 ** -12      # a quarter of float16's spacing at 1 (2**-10)


def identity(flat, shapes, op):
    """The all-reduce on one rank: nothing to add, nothing to divide."""


def bf16_or_skip():
    if getattr(ops, "BFLOAT16", None) is None:
        pytest.skip("bf16 needs ml_dtypes (pip install 'ringsync[bf16]')")
    return ops.BFLOAT16


# --- a 16-bit float's finiteness, by its bits (ops.all_finite) -------------------------------------

def check_all_finite(dtype):
    """ops.all_finite against np.isfinite on every bit pattern of the 16-bit float `dtype`."""
    every = np.arange(1 << 16, dtype=np.uint64).astype(np.uint16).view(dtype)
    finite = np.isfinite(every.astype(np.float32))
    assert 0 < finite.sum() < every.size
    for value, expected in zip(every.reshape(-1, 1), finite):
        assert ops.all_finite(value) == expected, value.view(np.uint16)
    assert ops.all_finite(every[finite]) and not ops.all_finite(every)
    grid = every[finite][:7 * 3000].reshape(-1, 7).copy()
    grid[::2, 0] = np.inf                                           # strided, 2-D: only where seen
    assert ops.all_finite(grid[:, 1:]) and ops.all_finite(grid[1::2]) and not ops.all_finite(grid[::2])
    assert ops.all_finite(every[:0])
    assert not ops.all_finite(np.array([1.0, np.nan], np.float32)) and ops.all_finite(np.ones(3, np.int16))
    inf_bits = int(np.array(np.inf, dtype).view(np.uint16))
    tiny = np.array([inf_bits], np.uint16).byteswap().view(dtype)     # finite: a subnormal
    assert np.isfinite(tiny.astype(np.float32)).all()
    assert ops.all_finite(tiny.astype(dtype.newbyteorder()))           # stored as Inf's bits
    assert ops.all_finite(grid[:, 1::2]) and ops.all_finite(grid[::-1, 3]) and ops.all_finite(grid[::-3, 1::3])
    assert ops.all_finite(np.array(every[1], dtype)) and not ops.all_finite(np.array(np.inf, dtype))   # 0-d


def test_all_finite_judges_every_float16_pattern_as_isfinite_does():
    check_all_finite(np.dtype(np.float16))


# --- error feedback, by hand --------------------------------------------------------------------

def test_fp16_error_feedback_by_hand():
    """g = 1 + 2**-12 each step, in float32. float16 has 10 fraction bits (spacing 2**-10 at 1):
    step 1 sends 1 + 2**-12 -> 1, keeps e = 2**-12; step 2 sends 1 + 2**-11 (a tie: to even,
    1), keeps 2**-11; step 3 sends 1 + 3·2**-12 -> 1 + 2**-10, keeps -2**-12. What was sent
    plus what is kept is always what came in: nothing is lost, only delayed."""
    residual = np.zeros(1, np.float32)
    payload = np.empty(1, np.float16)
    sent, kept = [], []
    for _ in range(3):
        span = np.array([1 + U], np.float32)
        cast_with_feedback_(span, residual, 1, payload)
        sent.append(float(payload[0]))
        kept.append(float(residual[0]))
    assert sent == [1.0, 1.0, 1 + 4 * U]
    assert kept == [U, 2 * U, -U]
    assert sum(sent) + kept[-1] == 3 * (1 + U)
    # without error feedback the 2**-12 is lost every step
    span = np.array([1 + U], np.float32)
    cast_with_feedback_(span, None, 1, payload)
    assert float(payload[0]) == 1.0 and span[0] == np.float32(1 + U)


def test_pre_scaled_cast_and_its_residual():
    """An average over c = 4 ranks: the payload holds x/4 (so 200000 fits float16), and the
    residual is x - 4·payload, at the gradient's scale."""
    span = np.array([200000.0, 1 + U], np.float32)
    residual = np.zeros(2, np.float32)
    payload = np.empty(2, np.float16)
    cast_with_feedback_(span, residual, 4, payload)
    assert payload[0] == np.float16(50000) and payload[1] == np.float16(0.25)
    assert residual.tolist() == [200000 - 4 * float(np.float16(50000)), U]


def test_cast_engine_falls_back_when_float16_overflows():
    """70000 does not fit float16: the bucket goes uncompressed (counted), exactly, and the
    residual is cleared (the uncompressed send lost nothing)."""
    engine = CastEngine(dataclasses.replace(Compression.fp16, error_feedback=True), 3, np.float32)
    engine.residual[...] = [0.5, 0.0, 0.0]
    calls = []
    span = np.array([70000.0, 1.0, 2.0], np.float32)
    sent = engine.reduce_bucket_(span, 0, ((3,),), ops.Average, 1,
                                 lambda flat, shapes, op: calls.append((flat.dtype, op)))
    assert calls == [(np.float16, ops.Sum), (np.float32, ops.Average)]
    assert engine.fallbacks == 1 and sent == 3 * 2 + 3 * 4
    assert span.tolist() == [70000.5, 1.0, 2.0] and not engine.residual.any()
    span = np.array([60000.0, 1.0, 2.0], np.float32)           # fits: no fallback
    engine.reduce_bucket_(span, 0, ((3,),), ops.Average, 1, identity)
    assert engine.fallbacks == 1 and span[0] == 60000


def test_cast_round_trip_bound_against_float64():
    """One cast: |decompress(compress(x)) - x| <= 2**-11 |x| (float16, normal range)."""
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 100
    payload, ctx = Compression.fp16.compress(x)
    back = Compression.fp16.decompress(payload, ctx)
    assert payload.dtype == np.float16 and back.dtype == np.float32
    err = np.abs(back.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= 2.0 ** -11 * np.abs(x.astype(np.float64)) + 2.0 ** -25)
    exact = np.array([0.5, -3.0, 1024.0, 0.0], np.float32)          # representable: exact
    assert np.array_equal(Compression.fp16.decompress(*Compression.fp16.compress(exact)), exact)
    none_payload, none_ctx = Compression.none.compress(exact)
    assert np.array_equal(Compression.none.decompress(none_payload, none_ctx), exact)


def test_bf16_round_trip():
    bf16 = bf16_or_skip()
    x = np.array([1.0, 3.0e38, 1 + 2.0 ** -9, -0.1], np.float32)
    payload, ctx = Compression.bf16.compress(x)
    assert payload.dtype == bf16
    back = Compression.bf16.decompress(payload, ctx)
    assert np.all(np.isfinite(back)) and back[2] == 1.0
    assert np.all(np.abs(back - x) <= 2.0 ** -8 * np.abs(x))


# --- PowerSGD, by hand --------------------------------------------------------------------------

def test_powersgd_draws_a_dead_q_column_afresh():
    """A zero gradient leaves Q = 0, and warm start would keep it so for good: the tensor's
    gradient would never be sent again. The column is drawn afresh from the seed and step."""
    engine = PowerSGDEngine(PowerSGD(rank=1, start_iter=0), [(16, 16)], np.float64)
    engine.step_([np.zeros((16, 16))], ops.Average, identity, step=0)
    assert engine.qs[0].any()
    again = PowerSGDEngine(PowerSGD(rank=1, start_iter=0), [(16, 16)], np.float64)
    again.step_([np.zeros((16, 16))], ops.Average, identity, step=0)
    assert np.array_equal(engine.qs[0], again.qs[0])               # the same draw everywhere
    g = np.random.default_rng(1).standard_normal((16, 16))
    engine.step_([g], ops.Average, identity, step=1)
    assert g.any() and np.abs(engine.residual).max() < 100


def test_powersgd_on_a_2x2_matrix_by_hand():
    """M = [[1, 2], [3, 4]], Q = [1, 0]: P = M Q = [1, 3], P̂ = [1, 3]/√10,
    Q = M^T P̂ = [10, 14]/√10, P̂ Q^T = [[1, 1.4], [3, 4.2]]; e = M - P̂ Q^T = [[0, .6], [0, -.2]]."""
    c = PowerSGD(rank=1, start_iter=0, min_compression_rate=0.5)
    engine = PowerSGDEngine(c, [(2, 2), (2,)], np.float64)
    assert engine.low == [(0, 2, 2, 1)] and engine.plain == [1]
    engine.qs[0][...] = [[1.0], [0.0]]
    grads = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([5.0, 6.0])]
    sent = engine.step_(grads, ops.Average, identity)
    assert np.allclose(grads[0], [[1.0, 1.4], [3.0, 4.2]], rtol=0, atol=1e-12)
    assert np.allclose(engine.residual, [0.0, 0.6, 0.0, -0.2, 0.0, 0.0], rtol=0, atol=1e-12)
    assert np.allclose(engine.qs[0][:, 0], np.array([10.0, 14.0]) / np.sqrt(10), atol=1e-12)
    assert grads[1].tolist() == [5.0, 6.0]                      # uncompressed, exact
    assert sent == (2 + 2) * 8 + 2 * 8                          # P and the bias, then Q
    # warm start and error feedback: the next step starts from this Q and adds e back
    grads = [np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([5.0, 6.0])]
    engine.step_(grads, ops.Average, identity)
    m = np.array([[1.0, 2.6], [3.0, 3.8]])                      # g + e
    p = m @ (np.array([10.0, 14.0]) / np.sqrt(10))
    p /= np.linalg.norm(p)
    assert np.allclose(grads[0], np.outer(p, m.T @ p), atol=1e-12)


def test_powersgd_keeps_small_and_1d_tensors_whole():
    c = PowerSGD(rank=2)               # min_compression_rate 2: (n + m)·2·2 < n·m
    assert c.matrix_rank((10,)) == 0 and c.matrix_rank((4, 4)) == 0
    assert c.matrix_rank((8, 8)) == 0 and c.matrix_rank((9, 9)) == 2
    assert c.matrix_rank((16, 2, 4)) == 2                       # viewed as 16 x 8
    assert PowerSGD(rank=8, min_compression_rate=0.1).matrix_rank((3, 20)) == 3   # min(rank, n, m)


def test_orthogonalize_gives_orthonormal_columns_and_handles_zeros():
    p = np.random.default_rng(1).standard_normal((50, 4))
    orthogonalize_(p)
    assert np.allclose(p.T @ p, np.eye(4), atol=1e-12)
    z = np.zeros((5, 2))
    z[:, 0] = 1.0
    orthogonalize_(z)
    assert np.allclose(z[:, 0], 1 / np.sqrt(5)) and not z[:, 1].any()


def test_low_rank_product_is_p_q_transposed():
    rng = np.random.default_rng(2)
    p, q = rng.standard_normal((6, 3)), rng.standard_normal((5, 3))
    out = np.empty((6, 5))
    assert np.allclose(low_rank_product_(p, q, out), p @ q.T, atol=1e-12)


def test_powersgd_first_q_comes_from_the_seed():
    a = PowerSGD(seed=3).initial_q(2, 7, 2, np.dtype(np.float32))
    b = PowerSGD(seed=3).initial_q(2, 7, 2, np.dtype(np.float32))
    c = PowerSGD(seed=4).initial_q(2, 7, 2, np.dtype(np.float32))
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_powersgd_compress_decompress_full_rank_is_exact():
    c = PowerSGD(rank=3, min_compression_rate=0.01)
    x = np.random.default_rng(5).standard_normal((3, 8))
    payload, ctx = c.compress(x)
    assert payload[0].shape == (3, 3) and payload[1].shape == (8, 3)
    assert np.allclose(c.decompress(payload, ctx), x, atol=1e-12)
    bias = np.arange(4.0)
    assert np.array_equal(c.decompress(*c.compress(bias)), bias)


# --- settings: parsing, defaults, signatures ---------------------------------------------------

def test_parse_compression():
    assert parse_compression("none") is Compression.none
    assert parse_compression("fp16") == Compression.fp16 and not Compression.fp16.error_feedback
    assert parse_compression("fp16", error_feedback=True).error_feedback
    assert parse_compression("powersgd:4") == PowerSGD(rank=4)
    assert parse_compression("powersgd:4").error_feedback                 # on by default
    assert parse_compression("powersgd:1", error_feedback=False) == PowerSGD(rank=1, error_feedback=False)
    assert parse_compression("none", error_feedback=False) is Compression.none
    for bad in ("", "fp32", "powersgd", "powersgd:0", "powersgd:x", "FP16", "powersgd:-1", "fp16 "):
        with pytest.raises(ValueError, match="none, fp16, bf16 or powersgd:R") as info:
            parse_compression(bad)
        assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="none has no error"):
        parse_compression("none", error_feedback=True)


def test_parse_bf16():
    if getattr(ops, "BFLOAT16", None) is None:
        with pytest.raises(ImportError, match="ml_dtypes"):
            parse_compression("bf16")
    else:
        assert parse_compression("bf16", error_feedback=True) == dataclasses.replace(
            Compression.bf16, error_feedback=True)


def test_signatures_name_every_setting():
    assert Compression.none.signature() == "none"
    assert Compression.fp16.signature() == "fp16 error_feedback=off"
    assert dataclasses.replace(Compression.bf16, error_feedback=True).signature() == "bf16 error_feedback=on"
    sig = PowerSGD(rank=4, start_iter=3, min_compression_rate=1.5, error_feedback=False, seed=7).signature()
    assert sig == "powersgd:4 error_feedback=off start_iter=3 min_rate=1.5 seed=7"
    assert len(PowerSGD().signature()) <= 64          # the agreement record shows 64 bytes of a name
    names = {c.name for c in (Compression.none, Compression.fp16, Compression.bf16, PowerSGD())}
    assert names == {"none", "fp16", "bf16", "powersgd"}


def test_settings_are_checked():
    for bad in ({"rank": 0}, {"rank": 1.5}, {"start_iter": -1}, {"min_compression_rate": 0},
                {"min_compression_rate": float("nan")}, {"seed": -1}):
        with pytest.raises(ValueError):
            PowerSGD(**bad)
    with pytest.raises(TypeError, match="error_feedback"):
        PowerSGD(error_feedback="yes")
    with pytest.raises(ValueError, match="none loses nothing"):
        dataclasses.replace(Compression.none, error_feedback=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Compression.fp16.error_feedback = True
    with pytest.raises(TypeError, match="compression must be"):
        check_compressor("fp16")


def test_gpu_arrays_are_refused():
    class FakeDeviceArray:
        __cuda_array_interface__ = None
    with pytest.raises(TypeError, match="GPU"):
        Compression.fp16.compress(FakeDeviceArray())
    with pytest.raises(TypeError, match="float16/32/64"):
        Compression.fp16.compress(np.arange(3))


FAKE_CUPY_OPTIMIZER = """
import sys
sys.path.insert(0, "tests")
import fake_cupy
cp = fake_cupy.install()
import ringsync as rs
from ringsync.training.nn import MLP
rs.init()
params = MLP([4, 3], xp=cp).params
try:
    rs.DistributedOptimizer(rs.SGD(params), compression=rs.PowerSGD())
except TypeError as exc:
    print("refused:", exc)
rs.DistributedOptimizer(rs.SGD(params))
print("none accepted")
"""


def test_optimizer_refuses_cupy_gradients_for_compression():
    """GPU gradients (the NumPy-backed fake CuPy, tests/fake_cupy.py) cannot be compressed."""
    result = run_mpi(1, ["-c", FAKE_CUPY_OPTIMIZER], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "refused: gradient compression runs on the host (NumPy) only" in result.stdout
    assert "none accepted" in result.stdout

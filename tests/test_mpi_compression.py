"""DistributedOptimizer(compression=...) across ranks: none, fp16, bf16, PowerSGD.

The oracle for fp16/bf16 is the float64 mean of every rank's gradient (gathered with MPI);
the bound checked is the one docs/compression.md claims:

    |result - exact| <= p·u·(1 + p·u)·mean_i |x_i| + p·s     (op average; sum: p times it)

with u = 2**-11 (fp16) or 2**-8 (bf16), s the format's smallest subnormal: one rounding of
x/p to the 16-bit format, then p - 1 additions, each rounded to it (not widened).
"""
import dataclasses

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere, ringsync_settings, same_bits_everywhere

from ringsync import ops
from ringsync.training.compression import Compression
from ringsync.training.nn import MLP

COMM = MPI.COMM_WORLD
R, P = COMM.rank, COMM.size
FP16_EF = dataclasses.replace(Compression.fp16, error_feedback=True)


def formats():
    """(name, unit roundoff, smallest subnormal) of each 16-bit format this process has."""
    out = [("fp16", 2.0 ** -11, 2.0 ** -24)]
    if getattr(ops, "BFLOAT16", None) is not None:
        out.append(("bf16", 2.0 ** -8, 2.0 ** -133))
    return out


def chain_oracle(rs, parts, name, op):
    """The sum of the ranks' payloads (x/p rounded to the format for an average) added in
    allreduce's order (collectives.summation_order), each addition rounded to the format;
    None where that order is not one chain (recursive doubling on 3+ ranks)."""
    dtype = np.dtype(np.float16) if name == "fp16" else ops.BFLOAT16
    n = parts[0].size
    order = rs.collectives.summation_order(n, dtype)
    if order is None:
        return None
    divisor = np.float32(P if op == "average" else 1)
    payloads = [np.divide(x, divisor, dtype=np.float32).astype(dtype) for x in parts]
    chain = np.empty(n, dtype)
    for lo, hi, ranks in order:
        chain[lo:hi] = payloads[ranks[0]][lo:hi]
        for q in ranks[1:]:
            chain[lo:hi] += payloads[q][lo:hi]
    return chain


def compressor(rs, name, error_feedback=False):
    c = getattr(rs.Compression, name)
    return dataclasses.replace(c, error_feedback=error_feedback) if error_feedback else c


def fill(params, step, scale=1.0):
    """This rank's gradient for `step`: different on every rank and every step."""
    g = np.random.default_rng([step, R]).standard_normal(params.flat_grad.size) * scale
    params.flat_grad[...] = g
    return params.flat_grad.copy()


def make(rs, sizes=(8, 6, 4), dtype=np.float32, compression=None, **kw):
    model = MLP(list(sizes), seed=0, dtype=dtype)
    extra = {} if compression is None else {"compression": compression}
    opt = rs.DistributedOptimizer(rs.SGD(model.params, lr=0.1, momentum=0.9), **kw, **extra)
    return model.params, opt


class ListParams:
    """Gradients as separate arrays (not a FlatBuffer's views): buckets are packed."""

    def __init__(self, shapes, dtype=np.float32):
        self.arrays = [np.zeros(s, dtype) for s in shapes]

    def grads(self):
        return self.arrays


class Holder:
    def __init__(self, params):
        self.params = params

    def step(self):
        pass


# --- none: exactly today's optimizer -----------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("fusion_bytes", [None, 64])
def test_none_is_bitwise_the_plain_optimizer(rs, fusion_bytes):
    plain, opt_plain = make(rs, fusion_bytes=fusion_bytes)
    none, opt_none = make(rs, compression=rs.Compression.none, fusion_bytes=fusion_bytes)
    for step in range(3):
        g = fill(plain, step)
        none.flat_grad[...] = g
        opt_plain.step()
        opt_none.step()
        reference = g.copy()
        rs.grouped_allreduce_([reference], op=rs.Average)
        assert_everywhere(np.array_equal(plain.flat_grad.view(np.uint32), reference.view(np.uint32)),
                          "the plain optimizer = one grouped all-reduce")
    assert_everywhere(np.array_equal(plain.data.view(np.uint32), none.data.view(np.uint32)),
                      "Compression.none must be bitwise the plain optimizer")
    report = opt_none.compression_report()
    assert_everywhere(report["compression"] == "none" and report["compression_ratio"] == 1.0
                      and report["payload_bytes_per_step"] == none.flat_grad.nbytes
                      and opt_none.compression_state() == {}, f"none's report: {report}")


# --- fp16 / bf16: the bound against a float64 oracle, the same bits everywhere ----------------

@pytest.mark.mpi
@pytest.mark.parametrize("op", ["average", "sum"])
@pytest.mark.parametrize("sizes", [(8, 6, 4), (256, 256, 16)])       # rides the opening; larger paths
@pytest.mark.parametrize("fmt", formats(), ids=lambda f: f[0])
def test_cast_within_the_bound_and_bitwise_identical(rs, fmt, sizes, op):
    name, u, subnormal = fmt
    params, opt = make(rs, sizes, compression=compressor(rs, name), op=op)
    for step in range(2):
        x = fill(params, step, scale=10.0 ** (step * 2 - 1))
        opt.synchronize()
        got = params.flat_grad.astype(np.float64)
        parts = np.stack(COMM.allgather(x)).astype(np.float64)
        exact = parts.sum(axis=0) if op == "sum" else parts.mean(axis=0)
        mean_abs = np.abs(parts).mean(axis=0) * (P if op == "sum" else 1)
        bound = P * u * (1 + P * u) * mean_abs + P * subnormal
        worst = float(np.max(np.abs(got - exact) - bound))
        assert_everywhere(worst <= 0, f"{name} {op}: past the claimed bound by {worst}")
        chain = chain_oracle(rs, COMM.allgather(x), name, op)
        if chain is not None:     # not widened: the sum is the chain of 16-bit additions, bit for bit
            assert_everywhere(np.array_equal(params.flat_grad, chain.astype(np.float32)),
                              f"{name} {op}: not the chain of {name} additions")
        assert_everywhere(same_bits_everywhere(params.flat_grad), f"{name}: ranks differ")
    report = opt.compression_report()
    ok = report["compression_ratio"] == 2.0 and report["fp16_fallbacks"] == 0 \
        and report["payload_bytes_per_step"] == params.flat_grad.size * 2
    assert_everywhere(ok, f"{name}'s report: {report}")


@pytest.mark.mpi
@pytest.mark.parametrize("fusion_bytes", [None, 64])
def test_cast_on_separate_arrays_and_buckets(rs, fusion_bytes):
    """Gradients as separate arrays (packed) in several buckets: the same as one FlatBuffer."""
    shapes = [(8, 6), (6,), (6, 4), (4,)]
    listed = ListParams(shapes)
    opt_list = rs.DistributedOptimizer(Holder(listed), compression=rs.Compression.fp16,
                                       fusion_bytes=fusion_bytes)
    flat, opt_flat = make(rs, compression=rs.Compression.fp16, fusion_bytes=fusion_bytes)
    g = fill(flat, 0)
    offset = 0
    for a in listed.arrays:
        a.reshape(-1)[...] = g[offset:offset + a.size]
        offset += a.size
    opt_list.synchronize()
    opt_flat.synchronize()
    joined = np.concatenate([a.reshape(-1) for a in listed.arrays])
    assert_everywhere(np.array_equal(joined, flat.flat_grad), "separate arrays = FlatBuffer views")


@pytest.mark.mpi
def test_fp16_error_feedback_keeps_what_the_cast_lost(rs):
    """Each rank's residual is its own g + e - p·fp16((g + e)/p); the result stays in the bound."""
    params, opt = make(rs, compression=FP16_EF)
    residual = np.zeros(params.flat_grad.size, np.float32)
    for step in range(3):
        g = fill(params, step, scale=1e-3)
        opt.synchronize()
        span = g + residual
        payload = np.divide(span, np.float32(P)).astype(np.float16)
        residual = span - np.float32(P) * payload.astype(np.float32)
        state = opt.compression_state()
        assert_everywhere(np.array_equal(state["residual"], residual), "residual algebra")
        assert_everywhere(same_bits_everywhere(params.flat_grad), "fp16 with error feedback: ranks differ")
    assert_everywhere(opt.compression_report()["error_feedback"] is True, "report says error feedback")


@pytest.mark.mpi
def test_fp16_falls_back_also_when_ranks_check_for_nonfinite_input(rs):
    """RINGSYNC_CHECK_FINITE=1: a finite gradient whose pre-scaled value passes 65504 on one
    rank only is no user error: the bucket falls back on every rank, and the result is right."""
    with ringsync_settings(RINGSYNC_CHECK_FINITE="1"):
        model = MLP([4, 5, 3], seed=0)
        params = model.params
        try:
            opt = rs.DistributedOptimizer(rs.SGD(params, lr=0.1), fusion_bytes=64, compression=FP16_EF)
            g = fill(params, 0)
            g[:20] = 70000.0 * COMM.size if COMM.rank == 0 else 0.0    # x/p = 70000 on rank 0 only
            params.flat_grad[...] = g
            opt.synchronize()
            ok = np.array_equal(params.flat_grad[:20], np.full(20, 70000.0, np.float32))
            assert_everywhere(ok and opt.compression_report()["fp16_fallbacks"] == 1, "fell back, right")
        finally:
            params.close()


@pytest.mark.mpi
@pytest.mark.parametrize("shared", [False, True], ids=["private", "shared-grads"])
def test_fp16_falls_back_past_65504_and_counts_it(rs, shared):
    """70000 on every rank: float16 cannot hold the result, so that bucket (and only it) is
    sent uncompressed: the same bits as the plain optimizer's, finite, counted."""
    model = MLP([4, 5, 3], seed=0, shared_grads=shared)
    params = model.params
    try:
        opt = rs.DistributedOptimizer(rs.SGD(params, lr=0.1), fusion_bytes=64, compression=FP16_EF)
        g = fill(params, 0)
        g[:20] = 70000.0                                 # fc0.weight: a bucket of its own
        params.flat_grad[...] = g
        opt.synchronize()
        plain = g.copy()
        rs.grouped_allreduce_([plain[:20]], op=rs.Average)
        ok = np.array_equal(params.flat_grad[:20], plain[:20]) and np.isfinite(params.flat_grad).all()
        assert_everywhere(ok, "the fallen-back bucket = the plain float32 average")
        report = opt.compression_report()
        assert_everywhere(report["fp16_fallbacks"] == 1, f"one bucket fell back: {report}")
        assert_everywhere(not opt.compression_state()["residual"][:20].any(), "its residual is cleared")
        assert_everywhere(same_bits_everywhere(params.flat_grad), "ranks differ after a fallback")
        expected = params.flat_grad.size * 2 + 20 * 4
        assert_everywhere(report["payload_bytes_per_step"] == expected, f"bytes: {report}")
        if getattr(ops, "BFLOAT16", None) is not None:     # bfloat16 holds 70000: no fallback
            opt16 = rs.DistributedOptimizer(rs.SGD(params, lr=0.1), compression=rs.Compression.bf16)
            params.flat_grad[...] = g
            opt16.synchronize()
            assert_everywhere(opt16.compression_report()["fp16_fallbacks"] == 0
                              and np.isfinite(params.flat_grad).all(), "bf16 holds 70000")
    finally:
        params.close()


# --- PowerSGD -------------------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("rank,error_feedback", [(1, True), (2, True), (1, False)])
def test_powersgd_is_bitwise_identical_on_every_rank(rs, rank, error_feedback):
    c = rs.PowerSGD(rank=rank, start_iter=0, error_feedback=error_feedback)
    params, opt = make(rs, (32, 24, 10), compression=c)
    for step in range(5):
        fill(params, step)
        opt.step()
        assert_everywhere(same_bits_everywhere(params.flat_grad), f"step {step}: gradients differ")
        assert_everywhere(same_bits_everywhere(params.data), f"step {step}: parameters differ")
        assert_everywhere(np.isfinite(params.data).all(), "finite")
    state = opt.compression_state()
    assert_everywhere(same_bits_everywhere(state["q"]) and int(state["step"]) == 5, "Q and step agree")
    assert_everywhere(("residual" in state) == error_feedback, "residual kept with error feedback")
    report = opt.compression_report()
    # (32 + 24)·r + (24 + 10)·r values of P and Q, the two biases (24 + 10) whole
    expected = ((32 + 24) * rank + (24 + 10) * rank + 24 + 10) * 4
    ok = report["payload_bytes_per_step"] == expected \
        and report["uncompressed_bytes_per_step"] == params.flat_grad.nbytes
    assert_everywhere(ok, f"PowerSGD's bytes: {report}, expected {expected}")


@pytest.mark.mpi
def test_powersgd_start_iter_is_bitwise_plain(rs):
    plain, opt_plain = make(rs, (32, 24, 10))
    low, opt_low = make(rs, (32, 24, 10), compression=rs.PowerSGD(rank=1, start_iter=3))
    for step in range(4):
        low.flat_grad[...] = fill(plain, step)
        opt_plain.step()
        opt_low.step()
        same = np.array_equal(plain.data.view(np.uint32), low.data.view(np.uint32))
        assert_everywhere(same == (step < 3), f"step {step}: plain for start_iter=3 steps, then compressed")


@pytest.mark.mpi
def test_powersgd_at_full_rank_is_the_exact_average(rs):
    params, opt = make(rs, (6, 4, 3), dtype=np.float64,
                       compression=rs.PowerSGD(rank=4, start_iter=0, min_compression_rate=0.01,
                                               error_feedback=False))
    for step in range(3):
        x = fill(params, step)
        opt.synchronize()
        exact = np.mean(COMM.allgather(x), axis=0)
        assert_everywhere(np.allclose(params.flat_grad, exact, rtol=0, atol=1e-10),
                          f"step {step}: full rank must give the average")


# --- agreement: settings that differ raise on every rank ----------------------------------------

def mismatch_cases(rs):
    cases = [
        ("compressor", rs.Compression.fp16, rs.PowerSGD(rank=1), ("fp16", "powersgd:1")),
        ("rank", rs.PowerSGD(rank=1), rs.PowerSGD(rank=2), ("powersgd:1", "powersgd:2")),
        ("error feedback", rs.Compression.fp16, FP16_EF, ("error_feedback=off", "error_feedback=on")),
        ("powersgd error feedback", rs.PowerSGD(), rs.PowerSGD(error_feedback=False),
         ("error_feedback=on", "error_feedback=off")),
        ("start_iter", rs.PowerSGD(), rs.PowerSGD(start_iter=0), ("start_iter=10", "start_iter=0")),
        ("none against fp16", rs.Compression.none, rs.Compression.fp16, ("fp16 error_feedback=off",)),
    ]
    if getattr(ops, "BFLOAT16", None) is not None:
        cases.append(("fp16 against bf16", rs.Compression.fp16, rs.Compression.bf16, ("fp16", "bf16")))
    return cases


@pytest.mark.mpi(min_size=2)
def test_different_compression_raises_on_every_rank(rs):
    for what, mine, others, words in mismatch_cases(rs):
        params, opt = make(rs, (32, 24, 10), compression=mine if R == 0 else others)
        fill(params, 0)
        try:
            opt.synchronize()
            message = None
        except rs.MismatchError as exc:
            message = str(exc)
        ok = message is not None and all(w in message for w in words)
        assert_everywhere(ok, f"{what}: {message!r} should name {words}")
        total = rs.allreduce(np.ones(3), op=rs.Sum)          # the world goes on
        assert_everywhere(np.array_equal(total, np.full(3, float(P))), "after the mismatch")


# --- checkpoints: the state round trip --------------------------------------------------------

def run_steps(opt, params, steps):
    for step in steps:
        fill(params, step)
        opt.step()


@pytest.mark.mpi
@pytest.mark.parametrize("kind,stop", [("fp16", 2), ("powersgd", 1), ("powersgd", 4)])
def test_compression_state_round_trip_continues_bitwise(rs, kind, stop):
    """Stop after `stop` steps, save, restore into a fresh optimizer: the next steps are the
    same bits as the uninterrupted run (PowerSGD: across its start_iter=2 too)."""
    c = FP16_EF if kind == "fp16" else rs.PowerSGD(rank=2, start_iter=2)
    params, opt = make(rs, (32, 24, 10), compression=c)
    run_steps(opt, params, range(stop))
    saved = {k: v.copy() for k, v in opt.compression_state().items()}
    weights, velocity = params.data.copy(), {k: v.copy() for k, v in opt.state_dict().items()}
    run_steps(opt, params, range(stop, stop + 3))
    resumed, opt2 = make(rs, (32, 24, 10), compression=c)
    resumed.data[...] = weights
    opt2.load_state_dict(velocity)
    opt2.load_compression_state(saved)
    run_steps(opt2, resumed, range(stop, stop + 3))
    assert_everywhere(np.array_equal(params.data.view(np.uint32), resumed.data.view(np.uint32)),
                      f"{kind}: resumed after step {stop} differs from the uninterrupted run")
    assert_everywhere(set(saved) == ({"residual"} if kind == "fp16" else {"residual", "q", "step"}),
                      f"state keys: {sorted(saved)}")
    bad = dict(saved)
    bad["residual"] = bad["residual"][:-1]
    with pytest.raises(ValueError, match="residual"):
        opt2.load_compression_state(bad)
    with pytest.raises(ValueError, match="missing"):
        opt2.load_compression_state({})


# --- what compression refuses ------------------------------------------------------------------

@pytest.mark.mpi
def test_compression_refuses_other_ops_and_dtypes(rs):
    model = MLP([4, 3], seed=0)
    with pytest.raises(ValueError, match="average or sum"):
        rs.DistributedOptimizer(rs.SGD(model.params), op=rs.Max, compression=rs.Compression.fp16)
    with pytest.raises(TypeError, match="compression must be"):
        rs.DistributedOptimizer(rs.SGD(model.params), compression="fp16")
    ints = Holder(ListParams([(3,)], dtype=np.int32))
    with pytest.raises(TypeError, match="float16/32/64"):
        rs.DistributedOptimizer(ints, compression=rs.PowerSGD())

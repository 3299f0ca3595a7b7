"""Cross-rank agreement: ranks that make different calls all raise, and the world still works."""
import numpy as np
import pytest
from mpi4py import MPI

from mpitools import assert_everywhere

COMM = MPI.COMM_WORLD
R, P = COMM.rank, COMM.size


def raises_everywhere(call, error, match):
    """Run call() on every rank; every rank must raise `error` matching `match`."""
    try:
        call()
        got = "no error"
    except error as exc:
        got = str(exc)
    import re
    assert_everywhere(re.search(match, got) is not None, f"rank {R} got: {got}")
    return got


def world_still_works(rs):
    x = np.arange(7, dtype=np.float64) + R
    expected = np.arange(7) * P + P * (P - 1) / 2
    assert_everywhere(np.array_equal(rs.allreduce(x), expected), "allreduce after a mismatch")
    rs.barrier()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("length", [0, 1, 5, 1000])
def test_size_mismatch(rs, length):
    other = length + 3 if R == P - 1 else length
    msg = raises_everywhere(lambda: rs.allreduce(np.ones(other)), rs.MismatchError, "shape differs")
    assert_everywhere(f"({length + 3},) on rank {P - 1}" in msg, msg)
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_dtype_mismatch(rs):
    dtype = np.float32 if R == 1 else np.float64
    msg = raises_everywhere(lambda: rs.allreduce(np.ones(64, dtype)), rs.MismatchError,
                            "dtype differs: float64 on ranks? [0-9, ]+ vs float32 on rank 1")
    assert_everywhere("shape" not in msg, msg)
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_shape_mismatch_with_the_same_size(rs):
    shape = (3, 2) if R == 0 else (2, 3)
    raises_everywhere(lambda: rs.allreduce(np.ones(shape)), rs.MismatchError,
                      r"shape differs: \(3, 2\) on rank 0 vs \(2, 3\) on rank")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_op_mismatch(rs):
    op = rs.Max if R == P - 1 else rs.Sum
    raises_everywhere(lambda: rs.allreduce(np.ones(10), op=op), rs.MismatchError,
                      f"op differs: sum on ranks? [0-9, ]+ vs max on rank {P - 1}")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_tensor_count_mismatch_in_a_fused_group(rs):
    # Same buffer, same dtype: only the number of packed tensors differs.
    shapes = ((4,), (4,)) if R == 0 else ((8,),)
    flat = np.ones(8, dtype=np.float32)
    before = flat.copy()
    raises_everywhere(lambda: rs.allreduce_fused_(flat, "sum", shapes), rs.MismatchError,
                      "tensor count differs: 2 on rank 0 vs 1 on rank")
    assert_everywhere(np.array_equal(flat, before), "a refused in-place call changed its buffer")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_fused_groups_that_agree_are_reduced(rs):
    flat = np.full(6, R + 1, dtype=np.float64)
    rs.allreduce_fused_(flat, "average", ((2,), (2, 2)), name="bucket0")
    assert_everywhere(np.allclose(flat, (P + 1) / 2))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("other", ["broadcast", "barrier", "allgather", "allreduce_empty"])
def test_different_collectives_raise_not_hang(rs, other):
    calls = {
        "broadcast": lambda: rs.broadcast(np.ones(100)),
        "barrier": rs.barrier,
        "allgather": lambda: rs.allgather(np.ones((2, 100))),
        "allreduce_empty": lambda: rs.allreduce(np.ones(0)),
    }
    mine = calls[other] if R == 1 else (lambda: rs.allreduce(np.ones(100)))
    first = other.split("_")[0]
    want = "shape differs" if other == "allreduce_empty" else f"collective differs: .*{first} on rank 1"
    raises_everywhere(mine, rs.MismatchError, want)
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_call_order_mismatch_by_name(rs):
    a, b = np.ones(16), np.ones(16)
    names = ["w", "b"] if R == 0 else ["b", "w"]
    raises_everywhere(lambda: rs.allreduce(a, name=names[0]), rs.MismatchError,
                      "name differs: 'w' on rank 0 vs 'b' on rank")
    raises_everywhere(lambda: rs.allreduce(b, name=names[1]), rs.MismatchError, "name differs")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_extra_call_on_one_rank_meets_the_others_next_call(rs):
    # Rank 0 makes a barrier call the others do not make: it meets their allreduce.
    call = rs.barrier if R == 0 else (lambda: rs.allreduce(np.ones(3)))
    raises_everywhere(call, rs.MismatchError, "collective differs: barrier on rank 0 vs allreduce")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_call_counter_mismatch_is_reported_and_realigned(rs):
    from ringsync.context import world

    if R == 1:
        world().checker.calls += 1      # as if rank 1 had made one more call than the others
    raises_everywhere(lambda: rs.allreduce(np.ones(3)), rs.MismatchError,
                      "call number \\(call order\\) differs: #[0-9]+ on ranks? [0-9, ]+ vs #[0-9]+ on rank 1")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_in_place_buffer_untouched_after_a_mismatch(rs):
    x = np.full(1001 if R == 0 else 1000, float(R))
    before = x.copy()
    raises_everywhere(lambda: rs.allreduce_(x), rs.MismatchError, "shape differs")
    assert_everywhere(np.array_equal(x, before))
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_broadcast_shape_and_root_mismatch(rs):
    raises_everywhere(lambda: rs.broadcast(np.ones(4 if R else 5)), rs.MismatchError, "shape differs")
    raises_everywhere(lambda: rs.broadcast(np.ones(4), root=R % 2), rs.MismatchError, "root differs")
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_bad_argument_on_one_rank_fails_every_rank(rs):
    ro = np.ones(5)
    ro.flags.writeable = R != 1
    if R == 1:
        with pytest.raises(ValueError, match="x is read-only"):
            rs.allreduce_(ro)
        got = True
    else:
        with pytest.raises(rs.MismatchError, match="invalid arguments.*ValueError on rank 1"):
            rs.allreduce_(ro)
        got = True
    assert_everywhere(got)
    world_still_works(rs)


@pytest.mark.mpi(min_size=2)
def test_nonfinite_input_raises_on_every_rank(rs):
    from ringsync.context import world

    checker = world().checker
    checker.finite = True
    try:
        x = np.ones(8, dtype=np.float32)
        if R == P - 1:
            x[3] = np.nan
        raises_everywhere(lambda: rs.allreduce(x, name="fc1.weight"), FloatingPointError,
                          f"allreduce 'fc1.weight' .*NaN or Inf in the input on rank {P - 1}")
        assert_everywhere(np.array_equal(rs.allreduce(np.ones(3, np.float32)), np.full(3, P)))
    finally:
        checker.finite = False


@pytest.mark.mpi
def test_check_can_be_switched_off(rs):
    from ringsync.context import world

    checker = world().checker
    was = checker.enabled
    checker.enabled = False
    try:
        world_still_works(rs)
        assert_everywhere(np.array_equal(rs.allgather(np.full(2, R)), np.repeat(np.arange(P), 2)))
    finally:
        checker.enabled = was

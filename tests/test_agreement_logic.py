"""Serial tests of the agreement check's pure logic: records, verdicts, neutral elements."""
import numpy as np
import pytest
from mpi4py import MPI

from ringsync import agreement
from ringsync.agreement import (
    ALLGATHER,
    ALLREDUCE,
    BROADCAST,
    JOIN,
    MismatchError,
    judge,
)
from ringsync.config import Settings
from ringsync.uneven import neutral


def record(kind=ALLREDUCE, op="sum", dtype=np.float32, shape=(4,), root=-1, group=1, name=None,
           calls=7, flags=0):
    checker = agreement.Checker(MPI.COMM_SELF, Settings())
    checker.enabled = True                  # a 1-rank communicator switches it off
    checker.calls = calls - 1
    checker.arm(kind, op, np.dtype(dtype) if dtype else None, shape, root=root, group=group, name=name)
    checker.flags = flags
    return checker.record()


def test_agreeing_records_give_the_call_back():
    table = np.array([record(), record()])
    row, joined = judge(table, 0)
    assert joined == [] and agreement.record_call(row) == (ALLREDUCE, "sum", np.float32, -1, 4)


def test_each_difference_is_named_with_its_ranks():
    table = np.array([record(name="w"), record(shape=(5,), name="w"), record(op="max", name="w")])
    error, _ = judge(table, 0)
    assert isinstance(error, MismatchError)
    assert str(error) == ("allreduce 'w' (call #7): op differs: sum on ranks 0, 1 vs max on rank 2; "
                          "shape differs: (4,) on ranks 0, 2 vs (5,) on rank 1")


def test_a_different_collective_is_named_first():
    error, _ = judge(np.array([record(), record(BROADCAST, "", shape=(4,), root=0)]), 1)
    assert str(error) == "collective call #7: collective differs: allreduce on rank 0 vs broadcast on rank 1"


def test_allgather_shows_its_free_first_dimension():
    error, _ = judge(np.array([record(ALLGATHER, "", shape=(3,)), record(ALLGATHER, "", shape=(2,))]), 0)
    assert "trailing shape differs: (*, 3) on rank 0 vs (*, 2) on rank 1" in str(error)


def test_nonfinite_and_refusal_flags():
    error, _ = judge(np.array([record(name="g"), record(name="g", flags=agreement.NONFINITE)]), 0)
    assert isinstance(error, FloatingPointError) and "'g'" in str(error) and "on rank 1" in str(error)
    refused = record(agreement.REFUSED, name="TypeError", flags=agreement.REFUSAL)
    error, _ = judge(np.array([record(), refused]), 0)
    assert "invalid arguments (TypeError on rank 1" in str(error)


def test_joined_ranks_only_are_no_error():
    row, joined = judge(np.array([record(JOIN, "", None, ()), record(), record()]), 1)
    assert joined == [0] and agreement.record_shape(row) == (4,)
    error, _ = judge(np.array([record(BROADCAST, "", shape=(2,), root=1), record(JOIN, "", None, ())]), 0)
    assert "the root, rank 1, has joined" in str(error)


@pytest.mark.parametrize("op,dtype,value", [("sum", "float32", 0), ("average", "int64", 0),
                                            ("min", "float64", np.inf), ("max", "float16", -np.inf),
                                            ("min", "int8", 127), ("max", "uint16", 0)])
def test_neutral_elements_leave_the_reduction_unchanged(op, dtype, value):
    got = neutral(3, np.dtype(dtype), op)
    assert got.dtype == np.dtype(dtype) and np.all(got == value)

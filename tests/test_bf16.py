"""bfloat16's place among ringsync's dtypes: stable codes, float helpers, the agreement
check's names, and one clear error without ml_dtypes (in a subprocess that hides it)."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from mpitools import ROOT
from test_compression import check_all_finite

from ringsync import agreement, ops
from ringsync.agreement import ALLREDUCE, Call, MismatchError, judge, make_record
from ringsync.uneven import neutral

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bf16 needs ml_dtypes: pip install 'ringsync[bf16]'")
BF16 = np.dtype(ml_dtypes.bfloat16)
OLD_NAMES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64",
             "uint8", "uint16", "uint32", "uint64"]


def run_python(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, check=False)


def test_codes_never_change_and_bfloat16_comes_next():
    assert list(ops.DTYPE_NAMES) == [*OLD_NAMES, "bfloat16"]
    for code, name in enumerate(OLD_NAMES, start=1):
        assert ops.dtype_code(np.dtype(name)) == code and ops.dtype_name(code) == name
    assert ops.dtype_code(BF16) == 12 and ops.dtype_name(12) == "bfloat16"
    assert ops.dtype_code(None) == 0 and ops.dtype_name(0) == "-" and ops.dtype_name(99) == "dtype #99"
    assert make_record(Call(ALLREDUCE, "sum", BF16, (3,)))["dtype"] == 12


def test_is_float_and_finfo():
    assert all(ops.is_float(np.dtype(t)) for t in ("float16", "float32", "float64"))
    assert ops.is_float(BF16)
    assert not any(ops.is_float(np.dtype(t)) for t in ("int8", "uint16", "V2", "bool"))
    assert ops.finfo(BF16).eps == 2.0 ** -7 and float(ops.finfo(BF16).max) > 3.38e38
    assert ops.finfo(np.dtype(np.float16)).eps == np.finfo(np.float16).eps


def test_all_finite_judges_every_bfloat16_pattern_as_isfinite_does():
    check_all_finite(BF16)


def test_a_bfloat16_array_is_supported_once_seen():
    ops.check_dtype(BF16)
    assert BF16 in ops.SUPPORTED and ops.BFLOAT16 == BF16 and ops.require_bfloat16() == BF16
    with pytest.raises(TypeError, match="supported: float16.*uint64, bfloat16 \\(with ml_dtypes\\)"):
        ops.check_dtype(np.dtype(np.complex64))


def test_the_agreement_check_names_bfloat16():
    rows = [make_record(Call(ALLREDUCE, "sum", np.dtype(d), (4,))) for d in (np.float16, BF16, BF16)]
    error, _ = judge(np.array(rows), 0)
    assert isinstance(error, MismatchError)
    assert "dtype differs: float16 on rank 0 vs bfloat16 on ranks 1, 2" in str(error)
    assert agreement.record_call(rows[1]).dtype == BF16


def test_neutral_elements_of_bfloat16():
    assert neutral(3, BF16, "sum").dtype == BF16 and not neutral(3, BF16, "sum").astype(float).any()
    assert np.all(neutral(2, BF16, "min").astype(float) == np.inf)
    assert np.all(neutral(2, BF16, "max").astype(float) == -np.inf)


def test_ringsync_does_not_import_ml_dtypes_itself():
    # Importing ml_dtypes costs ~0.8 s: only a caller who uses bfloat16 pays it.
    out = run_python("""
        import sys, numpy as np, ringsync, ringsync.collectives, ringsync.uneven
        ringsync.ops.check_dtype(np.dtype(np.float32))
        print("ml_dtypes" in sys.modules)
    """)
    assert out.returncode == 0 and out.stdout.split() == ["False"], out.stderr


def test_without_ml_dtypes_one_clear_error():
    out = run_python("""
        import sys
        sys.modules["ml_dtypes"] = None              # as if it were not installed
        import numpy as np
        from ringsync import ops
        from ringsync.agreement import ALLREDUCE, Call, judge, make_record, record_call
        assert ops.BFLOAT16 is None and len(ops.SUPPORTED) == 11
        try:
            ops.require_bfloat16()
        except ImportError as exc:
            print(exc)
        rows = [make_record(Call(ALLREDUCE, "sum", np.dtype(np.float16), (4,))) for _ in range(2)]
        rows[1]["dtype"] = 12                        # another rank's bfloat16
        print(judge(np.array(rows), 0)[0])
        try:
            record_call(rows[1])
        except ImportError as exc:
            print(exc)
    """)
    missing = "bf16 needs the optional package ml_dtypes: pip install 'ringsync[bf16]'"
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        missing, "allreduce (call #0): dtype differs: float16 on rank 0 vs bfloat16 on rank 1", missing]

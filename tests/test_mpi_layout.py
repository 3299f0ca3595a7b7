"""A buffer's trip through allreduce_ goes down the layers and never climbs back up.

sys.setprofile sees every Python call; each call from one ringsync module into another must
go to the same layer or a lower one (layers: tests/test_layout.py).
"""
import sys

import numpy as np
import pytest
from mpitools import assert_everywhere
from test_layout import layer

CASES = {"4 KB (gathered)": 1024, "64 KB (ring)": 16 * 1024, "4 MB (pipelined)": 1024 * 1024}


def module_of(frame) -> str:
    return frame.f_globals.get("__name__", "")


def trace(call) -> tuple[list[str], list[str]]:
    """Run call(); return (ringsync modules in the order first entered, calls that climb up)."""
    path, climbs = [], []

    def profile(frame, event, arg):
        if event != "call":
            return
        callee, caller = module_of(frame), module_of(frame.f_back) if frame.f_back else ""
        if not callee.startswith("ringsync"):
            return
        if callee not in path:
            path.append(callee)
        if caller.startswith("ringsync") and caller != callee:
            a, b = layer(caller), layer(callee)
            if a is not None and b is not None and b < a:
                climbs.append(f"{caller}.{frame.f_back.f_code.co_name} -> {callee}.{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return path, climbs


@pytest.mark.mpi
@pytest.mark.parametrize("case", list(CASES))
def test_allreduce_goes_down_the_layers(rs, case):
    x = np.ones(CASES[case], dtype=np.float32)
    rs.allreduce_(x)                       # plans and caches first, then the call we trace
    path, climbs = trace(lambda: rs.allreduce_(x))
    assert_everywhere(not climbs, f"{case}: calls that climb back up a layer: {climbs}")
    assert_everywhere(path[0] == "ringsync.collectives", f"{case}: path {path}")

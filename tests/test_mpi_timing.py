"""Timing probes on real ranks: hooks, the gathered report, the timeline, and the off switch."""
import json

import numpy as np
import pytest
from mpi4py import MPI
from mpitools import assert_everywhere

COMM = MPI.COMM_WORLD


def run_steps(rs, steps, size=1000):
    g = np.ones(size, dtype=np.float32)
    for _ in range(steps):
        rs.timing.begin_step()
        with rs.timing.span("pack"):
            x = g * 2
        rs.allreduce_(x, op=rs.Average)
        rs.allreduce_(x)
        rs.timing.end_step()
    return x


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["barrier", "passive"])
def test_hooks_and_the_report_agree_on_every_rank(rs, mode, tmp_path_factory):
    local, gathered = [], []
    rs.timing.on_step(local.append)
    rs.timing.on_step(gathered.append, gathered=True)
    try:
        rs.timing.start(mode, every=3)
        x = run_steps(rs, 7)
        rep = rs.timing.finish()
    finally:
        rs.timing.remove_hook(local.append)
        rs.timing.remove_hook(gathered.append)
    assert_everywhere(np.array_equal(x, np.full(1000, 2.0 * COMM.size, np.float32)), "results changed")
    assert_everywhere(len(local) == 7 and [r.step for r in local] == list(range(7)), "local hooks")
    assert_everywhere(all(r.wait_s is None and r.rank == COMM.rank and r.step_s > 0 for r in local))
    if COMM.rank == 0:
        ok = (len(gathered) == 7 and all(len(g) == COMM.size and g[0].wait_s is not None for g in gathered)
              and [g[0].step for g in gathered] == list(range(7)))
    else:
        ok = gathered == []
    assert_everywhere(ok, "gathered hooks run on rank 0 only, once per step")
    mine = json.dumps(rep, sort_keys=True)
    assert_everywhere(all(m == mine for m in COMM.allgather(mine)), "report differs across ranks")
    st = rep["straggler"]
    assert_everywhere(st["steps"] == 7 and len(rep["ranks"]) == COMM.size and st["mode"] == mode)
    assert_everywhere(abs(st["cost_s"] - sum(r["wait_s"] for r in rep["ranks"])) < 1e-9)
    assert_everywhere(min(r["wait_s"] for r in rep["ranks"]) >= 0 and 0 <= st["cost_fraction"] < 1)


@pytest.mark.mpi
def test_timeline_has_one_track_per_rank(rs, tmp_path_factory):
    folder = COMM.bcast(str(tmp_path_factory.mktemp("tl")) if COMM.rank == 0 else None)
    path = f"{folder}/trace.json"
    rs.timing.start("barrier", every=0, timeline=path)
    run_steps(rs, 4)
    rs.timing.finish()
    ok, why = True, ""
    if COMM.rank == 0:
        with open(path) as f:
            events = json.load(f)["traceEvents"]
        spans = [e for e in events if e["ph"] == "X"]
        tracks = {e["tid"] for e in spans}
        names = {e["name"] for e in spans}
        ok = tracks == set(range(COMM.size)) and {"step", "compute", "allreduce", "pack"} <= names
        ok = ok and sum(e["name"] == "step" for e in spans) == 4 * COMM.size
        why = f"tracks {tracks}, names {names}"
    assert_everywhere(ok, why)


@pytest.mark.mpi
def test_off_mode_records_nothing_and_outside_steps_probes_are_silent(rs):
    rs.timing.start("off")
    run_steps(rs, 2)
    assert_everywhere(rs.timing.finish() is None)
    rs.timing.start("barrier")
    rs.allreduce(np.ones(3))                 # outside a step: not timed, no barrier
    rep = rs.timing.finish()
    assert_everywhere(rep["straggler"]["steps"] == 0)


@pytest.mark.mpi
def test_bad_arguments_raise_on_every_rank(rs):
    for kwargs in ({"mode": "loud"}, {"mode": "off", "timeline": "x.json"}, {"every": -1},
                   {"stragglers": {COMM.size: 0.1}}, {"jitter": "exp:-1"},
                   {"timeline": "/no/such/folder/t.json"}):
        try:
            rs.timing.start(**kwargs)
            raised = False
            rs.timing.finish()
        except ValueError:
            raised = True
        assert_everywhere(raised, f"start({kwargs}) did not raise")

"""The straggler maths, injection parsing, timeline building and the report CLI, without MPI."""
import json

import numpy as np
import pytest

from ringsync.timing import inject, straggler, timeline
from ringsync.timing.report import main as report_main


def synthetic(p=4, steps=10, slow=2, delay=0.05, mode="barrier"):
    """Raw durations as ranks would record them when rank `slow` computes `delay` longer."""
    rng = np.random.default_rng(0)
    compute = 0.01 + 0.001 * rng.random((p, steps))
    compute[slow] += delay
    arrive = compute                                 # all start together, arrive after compute
    last = arrive.max(axis=0)
    latency, transfer = 1e-4, 2e-3
    barrier = last - arrive + latency if mode == "barrier" else np.zeros((p, steps))
    collective = np.full((p, steps), transfer) if mode == "barrier" else last - arrive + transfer
    step = compute + barrier + collective
    return step, barrier, collective, compute


@pytest.mark.parametrize("mode", ["barrier", "passive"])
def test_a_straggler_is_named_and_its_cost_is_everyone_elses_wait(mode):
    step, barrier, collective, compute = synthetic(mode=mode)
    rep = straggler.straggler_report(step, barrier, collective, mode)
    ranks, st = rep["ranks"], rep["straggler"]
    assert st["slowest_rank"] == 2
    assert [r["steps_slowest"] for r in ranks] == [0, 0, 10, 0]
    expected_wait = (compute.max(axis=0) - compute).sum(axis=1)
    assert [r["wait_s"] for r in ranks] == pytest.approx(expected_wait, abs=1e-9)
    assert ranks[2]["wait_s"] == 0.0
    for r in (0, 1, 3):
        assert 0.045 * 10 < ranks[r]["wait_s"] < 0.055 * 10
    assert st["cost_s"] == pytest.approx(sum(r["wait_s"] for r in ranks))
    assert st["cost_fraction"] == pytest.approx(st["cost_s"] / step.sum())
    assert [r["compute_s"] for r in ranks] == pytest.approx(compute.sum(axis=1))
    for r, row in enumerate(ranks):   # the three parts add up to each rank's step time
        assert row["compute_s"] + row["wait_s"] + row["allreduce_s"] == pytest.approx(step[r].sum())
    assert len(st["wait_per_step_s"]) == 4 and len(st["wait_per_step_s"][0]) == 10


def test_one_rank_and_no_steps():
    rep = straggler.straggler_report(np.ones((1, 3)), np.zeros((1, 3)), np.zeros((1, 3)), "barrier")
    assert rep["straggler"]["cost_s"] == 0 and rep["ranks"][0]["compute_s"] == 3
    empty = straggler.straggler_report(np.zeros((2, 0)), np.zeros((2, 0)), np.zeros((2, 0)), "passive")
    assert empty["straggler"]["cost_fraction"] == 0 and empty["straggler"]["steps"] == 0
    assert "2 rank(s), 0 step(s)" in straggler.format_report(empty)
    with pytest.raises(ValueError, match="ranks, steps"):
        straggler.straggler_report(np.zeros(3), np.zeros(3), np.zeros(3), "barrier")


def test_format_report_and_merge_into_a_document():
    rep = straggler.straggler_report(*synthetic()[:3], "barrier")
    text = straggler.format_report(rep)
    assert "slowest rank: 2" in text and "wait_s" in text and len(text.splitlines()) == 8
    doc = straggler.merge_report({"ranks": [{"rank": 0, "loss": 1.0}]}, rep)
    assert len(doc["ranks"]) == 4 and doc["ranks"][0]["loss"] == 1.0
    assert {"compute_s", "wait_s", "allreduce_s", "steps_slowest"} <= set(doc["ranks"][3])
    assert {"slowest_rank", "cost_s", "cost_fraction"} <= set(doc["straggler"])
    assert straggler.merge_report({"x": 1}, None) == {"x": 1}


@pytest.mark.parametrize("text,expected", [("2:0.05", (2, 0.05)), ("0:0", (0, 0.0))])
def test_parse_straggler(text, expected):
    assert inject.parse_straggler(text) == expected


@pytest.mark.parametrize("text", ["banana", "2", "2:", ":0.1", "-1:0.1", "1:-2", "1:nan", "1:inf", "a:1"])
def test_parse_straggler_rejects(text):
    with pytest.raises(ValueError, match="RANK:SECONDS"):
        inject.parse_straggler(text)


@pytest.mark.parametrize("text", ["gauss:1", "exp", "exp:-1", "uniform:x", "exp:inf"])
def test_parse_jitter_rejects(text):
    with pytest.raises(ValueError, match="jitter"):
        inject.parse_jitter(text)


def test_delays_are_reproducible_and_per_rank(monkeypatch):
    slept = []
    monkeypatch.setattr(inject.time, "sleep", slept.append)
    a, b = inject.Delays(1, {1: 0.05}, "exp:0.01", seed=3), inject.Delays(1, {1: 0.05}, "exp:0.01", seed=3)
    assert [a() for _ in range(5)] == [b() for _ in range(5)]
    assert all(s > 0.05 for s in slept)
    other = inject.Delays(0, {1: 0.05}, "uniform:0.01", seed=3)
    assert all(0 <= other() <= 0.01 for _ in range(20))
    assert not inject.Delays(0, {1: 0.05}) and inject.Delays(1, {1: 0.05})


def test_step_spans_split_the_wait_and_fill_compute_gaps():
    spans = [("step", 0.0, 1.0, 0), ("pack", 0.1, 0.2, 0), ("barrier", 0.3, 0.7, 0),
             ("allreduce", 0.7, 0.8, 0), ("allreduce", 0.85, 0.9, 0)]
    got = sorted(timeline.step_spans(spans, [0.35]), key=lambda s: (s[1], -s[2]))
    names = [(n, round(a, 3), round(b, 3)) for n, a, b, _ in got]
    assert names == [("step", 0.0, 1.0), ("compute", 0.0, 0.3), ("pack", 0.1, 0.2),
                     ("wait", 0.3, 0.65), ("barrier", 0.65, 0.7), ("allreduce", 0.7, 0.8),
                     ("compute", 0.8, 0.85), ("allreduce", 0.85, 0.9), ("compute", 0.9, 1.0)]


def test_trace_events_have_one_track_per_rank(tmp_path):
    per_rank = [[("step", 10.0 + r, 11.0 + r, 0), ("compute", 10.0 + r, 10.5 + r, 0)] for r in range(3)]
    events = timeline.trace_events(per_rank, np.array([0.0, 1.0, 2.0]))  # clocks 1 s and 2 s ahead
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["tid"] for e in spans} == {0, 1, 2}
    assert [e["ts"] for e in spans if e["name"] == "step"] == [0.0, 0.0, 0.0]
    names = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {"rank 0", "rank 1", "rank 2"}
    path = tmp_path / "t.json"
    timeline.write_json_atomically(str(path), {"traceEvents": events})
    assert json.loads(path.read_text())["traceEvents"] == events
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def write_report(tmp_path, **changes):
    rep = straggler.straggler_report(*synthetic()[:3], "barrier")
    doc = straggler.merge_report({"epochs": 1}, rep)
    doc.update(changes)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_report_cli_prints_the_table_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out.png"
    assert report_main([write_report(tmp_path), "--plot", str(out)]) == 0
    assert "slowest rank: 2" in capsys.readouterr().out
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("case", ["missing", "notjson", "nostraggler", "badranks", "badslowest", "plotdir", "flag"])
def test_report_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    changes = {"nostraggler": {"straggler": None}, "badranks": {"ranks": [{"rank": 0}]},
               "badslowest": {"straggler": {"slowest_rank": 9, "cost_s": 0, "cost_fraction": 0}}}
    path = write_report(tmp_path, **changes.get(case, {}))
    if case == "missing":
        path = str(tmp_path / "nope.json")
    if case == "notjson":
        (tmp_path / "report.json").write_text("{oops")
    argv = {"plotdir": [path, "--plot", str(tmp_path / "no" / "x.png")], "flag": [path, "--bogus"]}.get(case, [path])
    assert report_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringsync-report: error:") and err.count("\n") == 1, err

"""ringsync-model train (ringsync/model/simulate.py): the Monte Carlo against the order-statistics
formulas, the modes' bookkeeping, the lab check, and the command line. Serial, no MPI."""
from __future__ import annotations

import json

import pytest

from ringsync.model import cli
from ringsync.model.simulate import LAB, Jitter, analytic_wait, harmonic, lab_check, parse_jitter, simulate_mode

M = 0.005
EXP = Jitter("exp", M)


def test_harmonic_and_formulas():
    assert harmonic(0) == 0 and harmonic(1) == 1 and harmonic(4) == pytest.approx(25 / 12)
    assert analytic_wait(4, M) == pytest.approx(M * 25 / 12)                 # m·H_4 = 10.42 ms
    assert analytic_wait(4, M, 1) == pytest.approx(M * 13 / 12)              # m(H_4 - H_1) = 5.42 ms
    assert analytic_wait(1024, M) == pytest.approx(M * 7.5094, rel=1e-4)


@pytest.mark.parametrize("p, steps", [(4, 20000), (64, 4000), (1024, 1500)])
def test_bsp_and_backup_wait_match_the_order_statistics(p, steps):
    """Exponential jitter: bsp waits m·H_p, backup:B m(H_p - H_B) (B = 5 % of p, nearest; B = 1 at p = 4)."""
    bsp = simulate_mode("bsp", "", p, 0.1, EXP, 0.0, steps, seed=1)
    assert bsp["lost_s"] == pytest.approx(analytic_wait(p, M), rel=0.03)
    assert bsp["theory_s"] == pytest.approx(analytic_wait(p, M))
    arg = "1" if p == 4 else "0.05"
    backup = simulate_mode("backup", arg, p, 0.1, EXP, 0.0, steps, seed=1)
    b = backup["B"]
    assert b == (1 if p == 4 else round(0.05 * p))
    assert backup["lost_s"] == pytest.approx(analytic_wait(p, M, b), rel=0.03)
    assert backup["useful"] == (p - b) / p
    assert backup["efficiency"] == pytest.approx((p - b) / p * 0.1 / (0.1 + backup["lost_s"]))


def test_efficiency_counts_compute_wait_and_communication():
    r = simulate_mode("bsp", "", 16, 0.1, Jitter(), 0.02, 10)
    assert (r["lost_s"], r["theory_s"], r["unit_s"]) == (0.0, 0.0, pytest.approx(0.12))
    assert r["efficiency"] == pytest.approx(0.1 / 0.12)
    local = simulate_mode("local", "4", 16, 0.1, Jitter(), 0.02, 10)  # one all-reduce per 4 steps
    assert local["comm_s"] == pytest.approx(0.005) and local["efficiency"] == pytest.approx(0.1 / 0.105)


def test_straggler_costs_its_delay_unless_backup_drops_it():
    slow = parse_jitter("straggler:0.02:2")
    for mode, arg in (("bsp", ""), ("local", "4")):
        r = simulate_mode(mode, arg, 64, 0.1, slow, 0.0, 50)
        assert r["lost_s"] == pytest.approx(0.02) == r["theory_s"]
        assert r["rank_wait_s"] == pytest.approx(0.02 * 62 / 64)           # the lab's "wait": the others'
    assert simulate_mode("backup", "2", 64, 0.1, slow, 0.0, 50)["lost_s"] == 0.0
    assert simulate_mode("backup", "1", 64, 0.1, slow, 0.0, 50)["lost_s"] == pytest.approx(0.02)
    assert parse_jitter("straggler:0.02:0.1").stragglers(100) == 10


def test_local_averages_jitter_out():
    bsp = simulate_mode("bsp", "", 64, 0.1, EXP, 0.0, 800)
    local = simulate_mode("local", "8", 64, 0.1, EXP, 0.0, 800)
    assert M < local["lost_s"] < bsp["lost_s"] / 2


def test_lognormal_mean_is_its_mean():
    r = simulate_mode("bsp", "", 1, 0.1, parse_jitter("lognormal:0.005:0.5"), 0.0, 50000)
    assert r["lost_s"] == pytest.approx(0.005, rel=0.02)


def test_async_is_capped_by_the_server_link():
    free = simulate_mode("async", "", 8, 0.1, EXP, 0.01, 4000)
    assert not free["ps_bound"] and free["efficiency"] == pytest.approx(0.1 / (0.1 + M + 0.01), rel=0.02)
    assert free["staleness_mean"] == 7
    capped = simulate_mode("async", "", 64, 0.1, EXP, 0.01, 200, ps_s=0.004)   # 250 updates/s at most
    assert capped["ps_bound"] and capped["efficiency"] == pytest.approx(250 * 0.1 / 64)
    assert capped["rank_wait_s"] > 0


def test_lab_check_against_the_measured_figures(tmp_path):
    rows = {r["what"]: r for r in lab_check(LAB)}
    if not rows:
        pytest.skip(f"{LAB} not present")
    bsp = rows["bsp, jitter: added per step"]
    assert bsp["simulated"] == pytest.approx(bsp["formula_value"], rel=0.01)    # m·H_4 = 10.42 ms
    assert bsp["measured"] == pytest.approx(11.574) and 1.0 < bsp["ratio"] < 1.25
    straggler = rows["bsp, straggler: wait per rank and step"]
    assert straggler["simulated"] == pytest.approx(15.0) and straggler["ratio"] == pytest.approx(1.02, abs=0.02)
    assert lab_check(tmp_path / "absent.json") == []


def test_cli_writes_txt_json_png(tmp_path, capsys):
    out = tmp_path / "scale"
    assert cli.main(["train", "--p", "4,64", "--steps", "100", "--sync", "bsp,backup:1,local:4,async",
                     "--out", str(out), "--lab", "none"]) == 0
    text = capsys.readouterr().out
    assert text == (tmp_path / "scale.txt").read_text() and "efficiency" in text
    result = json.loads((tmp_path / "scale.json").read_text())
    assert [r["mode"] for r in result["rows"]] == ["bsp", "backup:1", "local:4", "async"] * 2
    assert all(0 < r["efficiency"] <= 1 for r in result["rows"])
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"
    cli.main(["train", "--p", "4", "--steps", "10", "--json", "--grad-bytes", "0", "--lab", "none", "--seed", "3"])
    assert json.loads(capsys.readouterr().out)["rows"][0]["comm_s"] == 0


@pytest.mark.parametrize("argv", [
    ["--jitter", "gauss:0.005"], ["--jitter", "exp:-1"], ["--jitter", "lognormal:0.005"],
    ["--jitter", "straggler:0.02:0"], ["--p", "4097"], ["--p", "0"], ["--sync", "backup:4", "--p", "2,4"],
    ["--sync", "ssp:2"], ["--sync", "local:0"], ["--compute", "-0.1"], ["--compute", "0"],
    ["--rate", "fast"], ["--algorithm", "magic"], ["--calibration", "/nonexistent.json"],
])
def test_bad_input_exits_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--steps", "1", "--lab", "none", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ringsync-model")

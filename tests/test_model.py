"""The cost model (ringsync/model/): formulas against cases worked by hand, the fit against
data made from known parameters, and every subcommand's bad input. No MPI."""
from __future__ import annotations

import json
import math

import pytest

from ringsync.config import Settings
from ringsync.model import algorithms as alg
from ringsync.model import counts
from ringsync.model.cli import main
from ringsync.model.fit import Observation, fit, impl_terms, unpaced
from ringsync.model.params import Calibration, Topology

ONE_HOST_4 = Topology((4,))
TWO_BY_TWO = Topology((2, 2), 10**9)


def close(terms: dict, expected: dict) -> bool:
    keys = set(terms) | set(expected)
    return all(math.isclose(terms.get(k, 0.0), expected.get(k, 0.0), rel_tol=1e-12, abs_tol=1e-9) for k in keys)


def test_the_ring_sends_2_p_minus_1_rounds_of_n_over_p():
    assert close(alg.ring(1200, ONE_HOST_4), {"local.alpha": 6, "local.beta": 1800, "gamma": 900})
    # across 2 hosts every step crosses: one chunk per step through each host's link
    assert close(alg.ring(4000, TWO_BY_TWO), {"net.alpha": 6, "net.beta": 6000, "gamma": 3000})


def test_doubling_pays_for_the_link_its_round_crosses_and_shares():
    n = 1000
    # round 1 pairs ranks of one host; round 2 crosses, two ranks of each host at once
    assert close(alg.doubling(n, TWO_BY_TWO),
                 {"local.alpha": 1, "local.beta": n, "net.alpha": 1, "net.beta": 2 * n, "gamma": 2 * n})
    # p = 3: fold (0 -> 1, reduced), one swap between 1 and 2, unfold (1 -> 0)
    assert close(alg.doubling(n, Topology((3,))), {"local.alpha": 3, "local.beta": 3 * n, "gamma": 2 * n})


def test_rabenseifner_and_tree_on_four_ranks():
    n = 4096
    assert close(alg.rabenseifner(n, ONE_HOST_4), {"local.alpha": 4, "local.beta": 1.5 * n, "gamma": 0.75 * n})
    assert close(alg.tree(n, ONE_HOST_4), {"local.alpha": 4, "local.beta": 4 * n, "gamma": 2 * n})


def test_the_opening_and_the_small_path_riding_on_it():
    # Bruck: one block of 32 bytes, then two
    assert close(alg.opening(0, ONE_HOST_4), {"local.alpha": 2, "local.beta": 96})
    assert close(alg.gathered(100, ONE_HOST_4), {"local.alpha": 2, "local.beta": 3 * (104 + 32), "gamma": 300})
    assert close(alg.gathered(100, ONE_HOST_4, shm=True), {"shm.sync": 1, "shm.copy": 100, "gamma": 300})


def test_shared_memory_and_hierarchical():
    mib = 1 << 20
    # two pieces of a slot each; a rank copies in the half it does not reduce, and all out
    assert close(alg.shared(2 * mib, Topology((2,)), slot_bytes=mib),
                 {"shm.sync": 4, "shm.copy": 3 * mib, "gamma": mib})
    # 2 hosts x 2: each chunk's ring crosses: 2 messages per piece, n through each link
    assert close(alg.shared(mib, TWO_BY_TWO, slot_bytes=mib),
                 {"shm.sync": 2, "shm.copy": 1.5 * mib, "gamma": 0.5 * mib + 0.25 * mib,
                  "net.alpha": 2, "net.beta": mib})
    # unequal hosts (2 + 1): the lone rank owns both chunks, so runs both rings
    assert alg.shared(mib, Topology((2, 1), 10**9), slot_bytes=mib)["net.alpha"] == 4


def test_ringsync_choice_follows_the_thresholds():
    s = Settings()
    assert alg.ringsync_choice(4096, TWO_BY_TWO, s) == "ride"
    assert alg.ringsync_choice(64 << 20, TWO_BY_TWO, s) == "shared"
    assert alg.ringsync_choice(64 << 20, Topology((1, 1), 10**9), s) == "pipelined"
    assert alg.ringsync_choice(100 << 10, Topology((1, 1), 10**9), s) == "ring"
    assert alg.ringsync_choice(64 << 20, ONE_HOST_4, s) == "shared"


def test_seconds_prices_terms_and_derives_an_unfitted_rate():
    cal = Calibration(nets={10**9: (50e-6, 8.5e-9)})
    assert math.isclose(alg.seconds({"net.alpha": 2, "net.beta": 1000}, cal, 10**9), 100e-6 + 8.5e-6)
    alpha, beta = cal.net(10 * 10**9)       # the same wire overhead, ten times the rate
    assert alpha == 50e-6 and math.isclose(beta, 0.85e-9)


def test_counts_of_the_ring_add_up_to_its_bytes():
    n, p = 10, 4        # chunks 3, 3, 2, 2 elements
    total = sum(counts.ring(n, 4, p, r).bytes for r in range(p))
    assert total == 2 * (p - 1) * n * 4
    assert counts.opening(0, 4) == counts.Traffic(2, 96)
    assert counts.doubling(8, 4, 3, 0) == counts.Traffic(1, 32)     # hands over and sits out
    assert counts.doubling(8, 4, 3, 1) == counts.Traffic(2, 64)     # swaps once, hands back


def test_the_fit_recovers_known_parameters():
    truth = Calibration(gamma=0.3e-9, shm_sync=4e-6, shm_copy=0.25e-9, local_alpha=8e-6, local_beta=0.4e-9,
                        nets={10**9: (80e-6, 8.6e-9), 10**10: (60e-6, 0.86e-9)})
    observations = []
    for top in (Topology((2,)), Topology((3,)), Topology((1, 1), 10**9), Topology((1, 1), 10**10),
                Topology((2, 2), 10**9), Topology((2, 2), 10**10)):
        for size in (4096, 65536, 1 << 20, 16 << 20):
            for impl in ("ringsync", "teaching"):
                terms = impl_terms(impl, size, top, Settings())
                observations.append(Observation("synthetic", "mpich", top, impl, size,
                                                alg.seconds(terms, truth, top.rate_bps), terms))
    got = fit(observations)
    for name in ("gamma", "shm_sync", "shm_copy", "local_alpha", "local_beta"):
        assert math.isclose(getattr(got, name), getattr(truth, name), rel_tol=1e-6), name
    for rate, (alpha, beta) in truth.nets.items():
        assert math.isclose(got.nets[rate][0], alpha, rel_tol=1e-6)
        assert math.isclose(got.nets[rate][1], beta, rel_tol=1e-6)
    assert max(abs(r["error"]) for r in got.residuals) < 1e-6


def test_the_fit_prices_bursts_and_refuses_what_it_cannot_tell_apart():
    truth = Calibration(nets={10**9: (80e-6, 8.6e-9)})
    burst = 100_000
    observations = []
    for size in (4096, 16384, 65536, 1 << 20, 4 << 20, 16 << 20):
        for impl in ("ringsync", "teaching"):
            top = Topology((1, 1), 10**9)
            terms = impl_terms(impl, size, top, Settings())
            # within the burst, the bytes leave at the unshaped (local) speed
            priced = unpaced(terms) if terms.get("net.beta", 0) <= burst else terms
            observations.append(Observation("synthetic", "mpich", top, impl, size,
                                            alg.seconds(priced, truth, 10**9), terms, burst))
    got = fit(observations)
    assert got.nets[10**9] == pytest.approx(truth.nets[10**9], rel=1e-6)
    assert "net@1000000000.beta" in got.fitted and "gamma" not in got.fitted     # no one-host data
    with pytest.raises(ValueError, match="cannot tell"):
        fit([o for o in observations if o.size == 4 << 20 and o.impl == "teaching"])    # 1 row, α and β
    with pytest.raises(ValueError, match="4 x the shaper's burst"):
        fit([o for o in observations if o.size < burst])


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_one_host_terms_send_what_the_code_sends(p):
    """algorithms.py's rounds and bytes equal counts.py's busiest rank (equal chunks). (With a
    fold, doubling's critical path has one round more than any rank sends: rank 0's hand-over,
    the swaps, rank 1's hand-back.)"""
    top, n = Topology((p,)), 4 * p * 1000
    cases = [(alg.ring(n, top), [counts.ring(n // 4, 4, p, r) for r in range(p)]),
             (alg.opening(0, top), [counts.opening(0, p)])]
    if p & (p - 1) == 0:
        cases.append((alg.doubling(n, top), [counts.doubling(n // 4, 4, p, r) for r in range(p)]))
    for terms, traffic in cases:
        assert terms.get("local.alpha", 0) == max(t.messages for t in traffic)
        assert terms.get("local.beta", 0) == max(t.bytes for t in traffic)


def one_line_exit(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ringsync-model") and ": error: " in err, err
    return err


@pytest.mark.parametrize("argv", [
    [],
    ["fit", "--out", "x.json"],
    ["fit", "/nonexistent.json", "--out", "x.json"],
    ["check", "/nonexistent.json", "--calibration", "/nonexistent.json"],
    ["predict", "--ranks-per-host", "0"],
    ["predict", "--ranks-per-host", "8", "--rate", "fast"],
    ["predict", "--ranks-per-host", "8", "--rate", "1gbit", "--p", "8193"],
    ["predict", "--ranks-per-host", "8", "--rate", "1gbit", "--sizes", "4Q"],
    ["predict", "--ranks-per-host", "8", "--rate", "1gbit", "--algorithms", "butterfly"],
    ["predict", "--ranks-per-host", "8", "--p", "64"],          # several hosts, no rate
    ["predict", "--ranks-per-host", "2", "--p", "2", "--out", "/nonexistent/dir/p"],
    ["check", "x.json", "--calibration", "c.json", "--tolerance", "nan"],
    ["train", "--p", "4", "--grad-bytes", "0", "--steps", "10", "--lab", "none", "--out", "/nonexistent/dir/t"],
])
def test_bad_input_exits_2_with_one_line(capsys, argv):
    one_line_exit(capsys, argv)


def test_bad_files_exit_2_with_one_line(capsys, tmp_path):
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"benchmark": "something else"}))
    assert "junk.json" in one_line_exit(capsys, ["fit", str(junk), "--out", str(tmp_path / "c.json")])
    assert not (tmp_path / "c.json").exists()
    bad = tmp_path / "cal.json"
    bad.write_text(json.dumps({"gamma": -1}))
    assert "cal.json" in one_line_exit(capsys, ["predict", "--ranks-per-host", "2", "--calibration", str(bad)])


def test_predict_json_has_one_entry_per_algorithm_size_and_p(capsys, tmp_path):
    assert main(["predict", "--ranks-per-host", "8", "--rate", "10gbit", "--sizes", "4K,64M",
                 "--p", "64,1024,4096", "--json", "--out", str(tmp_path / "pred")]) == 0
    doc = json.loads(capsys.readouterr().out)
    keys = {(r["algorithm"], r["size_bytes"], r["p"]) for r in doc["predictions"]}
    assert len(keys) == len(doc["predictions"]) == (1 + len(alg.ALGORITHMS)) * 2 * 3
    for r in doc["predictions"]:
        assert {"algorithm", "size_bytes", "p", "hosts", "seconds", "busbw"} <= set(r)
        assert r["hosts"] == r["p"] // 8 and r["seconds"] > 0
    assert (tmp_path / "pred.png").stat().st_size > 0 and (tmp_path / "pred.txt").exists()

"""Overlap in MPI jobs of their own: settings read at init() (the point-to-point ring on 3 ranks,
simulated nodes of 2 on 4 ranks), and ringsync-train's --overlap, --buckets and
--backward-passes-per-step end to end (report, checkpoint bits, timeline, refusals)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from mpitools import ROOT, program_lines, run_mpi

# One job: the same model trained with overlap on, off (backward's buckets) and fused, and
# with 2 accumulated passes (overlap on and off), on rank-dependent data; rank 0 prints one
# JSON line with what the test checks. argv[1]: "shared" puts the gradients in the node's
# shared memory (as ringsync-train does).
JOB = r"""
import hashlib, json, sys
import numpy as np
from mpi4py import MPI
import ringsync as rs
from ringsync.collectives import host_algorithm
from ringsync.context import world
from ringsync.training.nn import MLP

rs.init()
comm, shared = MPI.COMM_WORLD, sys.argv[1] == "shared"
SIZES, FUSION = [50, 70, 40, 10], 16384

def run(passes=1, **kwargs):
    model = MLP(SIZES, seed=3, shared_grads=shared)
    opt = rs.DistributedOptimizer(rs.SGD(model.params, lr=0.05, momentum=0.9), fusion_bytes=FUSION,
                                  backward_passes_per_step=passes, **kwargs)
    rng = np.random.default_rng([9, comm.rank])
    for _ in range(4):
        x = rng.standard_normal((6, SIZES[0])).astype(np.float32)
        y = rng.integers(0, SIZES[-1], 6)
        part = 6 // passes
        for k in range(passes):
            model.loss_and_grad(x[k * part:(k + 1) * part], y[k * part:(k + 1) * part])
        opt.step()
    data = model.params.data.copy()
    itemsize = data.itemsize
    plan = [(hi - lo) * itemsize for lo, hi in opt.bucket_plan()]
    model.params.close()
    return data, plan

out = {}
for name, passes, kwargs in (("overlap", 1, {"overlap": True}), ("backward", 1, {"buckets": "backward"}),
                             ("fused", 1, {}), ("overlap2", 2, {"overlap": True}),
                             ("backward2", 2, {"buckets": "backward"})):
    data, plan = run(passes, **kwargs)
    digests = comm.allgather(hashlib.sha256(data.tobytes()).hexdigest())
    out[name] = {"sha": digests[0], "identical": len(set(digests)) == 1, "bucket_bytes": plan,
                 "algorithms": [host_algorithm(b, checked=world().checker.enabled) for b in plan],
                 "data": data.tolist()}
s = world().settings
out["settings"] = {"transport": s.transport, "node_size": s.node_size, "first": s.first_bucket_bytes}
if comm.rank == 0:
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()
rs.shutdown()
"""


def job_result(nranks, shared, monkeypatch, **env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = run_mpi(nranks, ["-c", JOB, "shared" if shared else "private"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, result.stdout[-3000:]
    return json.loads(lines[0][len("RESULT "):])


def check_job(out):
    """Overlap on and off: the same bits (k passes too); every run identical on every rank; the
    fused run, another summation order, close; several buckets, the first one small."""
    for name in ("overlap", "backward", "fused", "overlap2", "backward2"):
        assert out[name]["identical"], name
    assert out["overlap"]["sha"] == out["backward"]["sha"]
    assert out["overlap2"]["sha"] == out["backward2"]["sha"]
    assert out["overlap"]["bucket_bytes"] == out["backward"]["bucket_bytes"]
    # layers fc2 (1640 B) and fc1 (11360 B) would share a bucket but for the first cap (4096)
    assert out["overlap"]["bucket_bytes"] == [1640, 11360, 14280], out["overlap"]["bucket_bytes"]
    assert len(out["fused"]["bucket_bytes"]) == 2
    got, fused = np.array(out["overlap"]["data"]), np.array(out["fused"]["data"])
    assert np.allclose(got, fused, rtol=1e-4, atol=1e-6)
    assert np.allclose(got, np.array(out["overlap2"]["data"]), rtol=1e-4, atol=1e-6)   # 2 passes of 3 ~ 1 of 6


def test_overlap_on_the_point_to_point_ring_on_3_ranks(monkeypatch):
    """p2p on 3 ranks: every bucket takes the ring, whose chunk boundaries depend on the
    bucket's size (so backward's buckets and fused ones add in different orders)."""
    out = job_result(3, False, monkeypatch, RINGSYNC_TRANSPORT="p2p", RINGSYNC_FIRST_BUCKET_BYTES="4096",
                     RINGSYNC_SMALL_BYTES="1024")
    assert out["settings"] == {"transport": "p2p", "node_size": 0, "first": 4096}
    assert out["overlap"]["algorithms"] == ["ring"] * 3, out["overlap"]["algorithms"]
    assert out["fused"]["algorithms"] == ["ring"] * 2, out["fused"]["algorithms"]
    check_job(out)


@pytest.mark.parametrize("shared", [False, True])
def test_overlap_across_simulated_nodes_of_2_on_4_ranks(monkeypatch, shared):
    """RINGSYNC_NODE_SIZE=2 on 4 ranks: shared memory within each pair, the hierarchical
    all-reduce across them; with the gradients in the node's shared memory or not."""
    out = job_result(4, shared, monkeypatch, RINGSYNC_NODE_SIZE="2", RINGSYNC_FIRST_BUCKET_BYTES="4096",
                     RINGSYNC_SMALL_BYTES="1024")
    assert out["settings"]["node_size"] == 2 and out["settings"]["first"] == 4096
    assert out["overlap"]["algorithms"] == ["shared"] * 3, out["overlap"]["algorithms"]
    check_job(out)


# --- ringsync-train -----------------------------------------------------------------------------

TRAIN = ["-m", "ringsync.training.train", "--quiet", "--max-steps", "10", "--seed", "2"]


def train(nranks, tmp_path, tag, *flags, timeout=120):
    """Run ringsync-train; return (parameters by name, report dict, the finished process)."""
    save, report = tmp_path / f"{tag}.npz", tmp_path / f"{tag}.json"
    result = run_mpi(nranks, [*TRAIN, *flags, "--save", str(save), "--report", str(report)], timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(save) as f:
        params = {k: f[k] for k in f.files if k != "meta" and not k.startswith("optimizer/")}
    return params, json.loads(report.read_text()), result


def test_overlap_and_backward_buckets_train_the_same_bits(tmp_path, monkeypatch):
    """3 ranks on the point-to-point ring with a 4 KiB first bucket and 40 KiB fusion buckets:
    --overlap and --buckets backward end on the same parameters, bit for bit, with plain
    gradients, fp16-compressed ones and 2 passes per step; every run identical on all ranks."""
    monkeypatch.setenv("RINGSYNC_TRANSPORT", "p2p")
    monkeypatch.setenv("RINGSYNC_FIRST_BUCKET_BYTES", "4096")
    common = ["--batch-size", "8", "--fusion-mb", str(40960 / 2**20)]
    reports = {}
    for tag, flags in (("overlap", ["--overlap"]), ("backward", ["--buckets", "backward"]),
                       ("fp16-overlap", ["--overlap", "--compression", "fp16"]),
                       ("fp16-backward", ["--buckets", "backward", "--compression", "fp16"]),
                       ("k2-overlap", ["--overlap", "--backward-passes-per-step", "2"]),
                       ("k2-backward", ["--buckets", "backward", "--backward-passes-per-step", "2"])):
        _, reports[tag], _ = train(3, tmp_path, tag, *common, *flags)
        assert reports[tag]["params_identical_across_ranks"] is True, tag
        assert reports[tag]["buckets"] == "backward" and reports[tag]["steps"] == 10, tag
        # the digits model [64, 128, 64, 10] by layer: fc2 (2600 B; fc1 would pass the first cap),
        # fc1 (33024 B; fc0 would pass the cap), fc0 (33280 B)
        assert reports[tag]["bucket_count"] == 3, (tag, reports[tag]["bucket_count"])
    for a, b in (("overlap", "backward"), ("fp16-overlap", "fp16-backward"), ("k2-overlap", "k2-backward")):
        assert reports[a]["params_sha256"] == reports[b]["params_sha256"], (a, b)
    assert len({reports[t]["params_sha256"] for t in ("overlap", "fp16-overlap", "k2-overlap")}) == 3
    assert reports["fp16-overlap"]["compression"] == "fp16"
    assert reports["fp16-overlap"]["payload_bytes_per_step"] * 2 == reports["fp16-overlap"]["uncompressed_bytes_per_step"]
    assert reports["k2-overlap"]["backward_passes_per_step"] == 2 and reports["overlap"]["backward_passes_per_step"] == 1


def test_overlap_reports_hidden_and_exposed_time_per_rank(tmp_path):
    _, report, _ = train(2, tmp_path, "overlap", "--overlap", "--batch-size", "16")
    assert report["params_identical_across_ranks"] is True and report["world_size"] == 2
    assert report["buckets"] == "backward" and report["bucket_count"] >= 1 and report["overlap_enabled"] is True
    block = report["overlap"]
    assert isinstance(block, dict), block
    assert [r["rank"] for r in block["ranks"]] == [0, 1]
    for row in block["ranks"]:
        assert row["comm_s"] > 0 and row["hidden_s"] >= 0 and row["exposed_s"] >= 0, row
        assert row["hidden_s"] + row["exposed_s"] == pytest.approx(row["comm_s"], rel=1e-9, abs=1e-12), row
    assert 0.0 <= block["hidden_fraction"] <= 1.0
    hidden = sum(r["hidden_s"] for r in block["ranks"])
    assert block["hidden_fraction"] == pytest.approx(hidden / sum(r["comm_s"] for r in block["ranks"]))
    for name in ("comm_s", "hidden_s", "exposed_s"):
        assert len(block["per_step"][name]) == 2 and all(len(row) == 10 for row in block["per_step"][name])
    # without --overlap: no communication thread, no such block, the report says so
    _, plain, _ = train(2, tmp_path, "plain", "--batch-size", "16")
    assert "overlap" not in plain and plain["overlap_enabled"] is False
    assert plain["buckets"] == "fused" and plain["bucket_count"] == 1
    assert plain["backward_passes_per_step"] == 1


@pytest.mark.parametrize("flags", [[], ["--overlap"]])
def test_the_summary_prints_and_the_timeline_has_a_communication_track(tmp_path, flags):
    """Not --quiet: the run ends with its summary (and with --overlap, the overlap table); the
    timeline has a track for each rank's communication thread when it ran calls."""
    timeline, report = tmp_path / "t.json", tmp_path / "r.json"
    result = run_mpi(2, ["-m", "ringsync.training.train", "--max-steps", "4", "--batch-size", "16",
                         *flags, "--timeline", str(timeline), "--report", str(report)], timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "parameters bitwise identical on all 2 rank(s): yes" in result.stdout, result.stdout
    assert ("of the communication thread's time ran during backward" in result.stdout) == bool(flags), result.stdout
    events = json.loads(timeline.read_text())["traceEvents"]
    tracks = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    if not flags:
        assert set(tracks) == {"rank 0", "rank 1"}, tracks
        return
    assert set(tracks) == {"rank 0", "rank 1", "rank 0 communication thread", "rank 1 communication thread"}
    for r in (0, 1):
        thread = [e for e in spans if e["tid"] == tracks[f"rank {r} communication thread"]]
        assert len(thread) >= 4 and all(e["name"].startswith("bucket of") and e["dur"] >= 0 for e in thread), thread
        assert {e["args"]["step"] for e in thread} == {0, 1, 2, 3}
        assert not any(e["name"].startswith("bucket of") for e in spans if e["tid"] == tracks[f"rank {r}"])


def test_backward_passes_per_step_trains_like_one_pass(tmp_path):
    """Each rank's batch of 32 in 4 passes of 8: the same training as one pass of 32, to rounding."""
    common = ["--batch-size", "32", "--max-steps", "44"]         # 2 epochs of digits on 2 ranks
    one, r1, _ = train(2, tmp_path, "k1", *common)
    four, r4, _ = train(2, tmp_path, "k4", *common, "--backward-passes-per-step", "4")
    assert r4["backward_passes_per_step"] == 4 and r4["buckets"] == "fused" and r4["global_batch"] == 64
    assert r4["params_identical_across_ranks"] is True
    num = sum(float(((four[k].astype(np.float64) - one[k]) ** 2).sum()) for k in one)
    den = sum(float((one[k].astype(np.float64) ** 2).sum()) for k in one)
    assert (num / den) ** 0.5 <= 1e-4
    assert r1["test_accuracy"] > 0.8 and abs(r4["test_accuracy"] - r1["test_accuracy"]) <= 0.02, (r1, r4)


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "ringsync.training.train", "--quiet", "--max-steps", "1", *args],
                          cwd=ROOT, check=False, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, words", [
    (["--overlap", "--sync", "local:4"], "--overlap works with --sync bsp only"),
    (["--buckets", "backward", "--sync", "async"], "--buckets works with --sync bsp only"),
    (["--backward-passes-per-step", "2", "--sync", "ssp:1"], "--backward-passes-per-step 2 works with --sync bsp"),
    (["--overlap", "--buckets", "fused"], "--buckets fused"),
    (["--backward-passes-per-step", "3", "--batch-size", "32"], "--backward-passes-per-step 3 must divide --batch-size 32"),
    (["--overlap", "--compression", "powersgd:2"], "--compression powersgd:2"),
    (["--buckets", "backward", "--compression", "powersgd:1"], "--compression powersgd:1"),
    (["--overlap", "--device", "gpu"], "--device cpu"),
    (["--backward-passes-per-step", "0"], "--backward-passes-per-step"),
    (["--buckets", "sideways"], "--buckets"),
])
def test_bad_overlap_flags_exit_2_with_one_line(args, words):
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringsync-train: error:") and words in lines[0], lines


def test_a_bad_combination_on_2_ranks_is_said_once():
    result = run_mpi(2, [*TRAIN, "--overlap", "--sync", "local:4"], timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = program_lines(result.stderr)
    assert len(lines) == 1 and "--overlap works with --sync bsp only" in lines[0] and "Traceback" not in result.stderr


def test_allowed_combinations_are_taken(tmp_path):
    """--buckets fused with 2 passes, and PowerSGD with 2 passes (fused buckets), train."""
    for tag, flags in (("fused-k2", ["--buckets", "fused", "--backward-passes-per-step", "2"]),
                       ("psgd-k2", ["--compression", "powersgd:1", "--backward-passes-per-step", "2"])):
        _, report, _ = train(1, tmp_path, tag, "--batch-size", "16", "--max-steps", "3", *flags)
        assert report["buckets"] == "fused" and report["backward_passes_per_step"] == 2 and report["steps"] == 3

"""ringsync-train end to end, as subprocess MPI jobs (each one under a timeout).

The central claim: p ranks with per-rank batch B train exactly like 1 rank with batch p*B.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
from mpitools import ROOT, run_mpi

TRAIN = ["-m", "ringsync.training.train", "--quiet"]


def train(nranks, tmp_path, tag, *flags, timeout=120):
    """Run ringsync-train; return (parameters by name, report dict)."""
    save, report = tmp_path / f"{tag}.npz", tmp_path / f"{tag}.json"
    args = [*TRAIN, *flags]
    if "--save" not in flags:
        args += ["--save", str(save)]
    result = run_mpi(nranks, [*args, "--report", str(report)], timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(flags[flags.index("--save") + 1] if "--save" in flags else save) as f:
        params = {k: f[k] for k in f.files if k != "meta" and not k.startswith("optimizer/")}
    return params, json.loads(report.read_text())


def rel_err(a, b):
    num = sum(float(((a[k].astype(np.float64) - b[k]) ** 2).sum()) for k in a)
    den = sum(float((b[k].astype(np.float64) ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def test_p_ranks_with_batch_b_equal_one_rank_with_batch_pb(tmp_path):
    steps = ["--max-steps", "40", "--seed", "3"]
    ref, _ = train(1, tmp_path, "p1", "--batch-size", "64", *steps)
    for p in (2, 4):
        got, report = train(p, tmp_path, f"p{p}", "--batch-size", str(64 // p), *steps)
        assert report["world_size"] == p and report["global_batch"] == 64 and report["steps"] == 40
        assert report["params_identical_across_ranks"] is True
        assert set(got) == set(ref)
        assert rel_err(got, ref) <= 1e-4, (p, rel_err(got, ref))
    # fusion off (one all-reduce per gradient array) trains the same model
    unfused, _ = train(2, tmp_path, "nofusion", "--batch-size", "32", "--fusion-mb", "0", *steps)
    assert rel_err(unfused, ref) <= 1e-4
    # and a different global batch is a different training run: the comparison can fail
    other, _ = train(1, tmp_path, "b32", "--batch-size", "32", *steps)
    assert rel_err(other, ref) > 1e-2


def test_default_digits_run_on_4_ranks_learns_and_stays_identical(tmp_path):
    report_path = tmp_path / "r.json"
    result = run_mpi(4, ["-m", "ringsync.training.train", "--report", str(report_path)], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["test_accuracy"] >= 0.95, report["test_accuracy"]
    assert report["params_identical_across_ranks"] is True
    assert [r["rank"] for r in report["ranks"]] == [0, 1, 2, 3]
    for key in ("world_size", "steps", "epochs", "global_batch", "final_loss", "samples_per_second"):
        assert key in report
    assert "parameters bitwise identical on all 4 rank(s): yes" in result.stdout
    assert result.stdout.count("test accuracy") == 1           # the summary is printed by rank 0 only


def test_resume_continues_exactly(tmp_path):
    common = ["--batch-size", "32", "--seed", "1"]
    straight, _ = train(2, tmp_path, "straight", "--epochs", "2", *common)
    ckpt = str(tmp_path / "ckpt.npz")
    train(2, tmp_path, "first", "--epochs", "1", "--save", ckpt, *common)
    with np.load(ckpt) as f:
        meta = json.loads(str(f["meta"]))
        assert meta["epoch"] == 1 and meta["step_in_epoch"] == 0
        assert "optimizer/fc0.weight" in f.files and np.abs(f["optimizer/fc0.weight"]).max() > 0
    resumed, report = train(2, tmp_path, "second", "--epochs", "2", "--resume", ckpt,
                            "--save", ckpt, *common)
    assert report["resumed_from_step"] == meta["step"] and report["steps"] == 2 * meta["step"]
    assert max(float(np.abs(resumed[k] - straight[k]).max()) for k in straight) <= 1e-6
    # mid-epoch, through --save-every: stop at step 30 (of 44), resume to the end
    mid = str(tmp_path / "mid.npz")
    train(2, tmp_path, "mid1", "--epochs", "2", "--max-steps", "30", "--save", mid, "--save-every", "7", *common)
    with np.load(mid) as f:
        assert json.loads(str(f["meta"]))["step"] == 30
    resumed, _ = train(2, tmp_path, "mid2", "--epochs", "2", "--resume", mid, "--save", mid, *common)
    assert max(float(np.abs(resumed[k] - straight[k]).max()) for k in straight) <= 1e-6


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "ringsync.training.train", "--quiet", *args], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, words", [
    (["--batch-size", "0"], "--batch-size"),
    (["--dataset", "nope"], "--dataset"),
    (["--epochs", "-1"], "--epochs"),
    (["--hidden", "64,x"], "--hidden"),
    (["--lr", "nan"], "--lr"),
    (["--save-every", "3"], "--save-every"),
    (["--data", "a.npz", "--dataset", "digits"], "either"),
    (["--save", "/no/such/folder/x.npz"], "does not exist"),
    (["--batch-size", "5000"], "exceeds"),
])
def test_bad_command_lines_exit_2_with_one_line(args, words):
    result = cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringsync-train: error:") and words in lines[0]


def test_missing_or_corrupt_files_fail_clearly_and_overwrite_nothing(tmp_path):
    result = cli("--resume", str(tmp_path / "missing.npz"))
    assert result.returncode == 2 and "no such file" in result.stderr and "Traceback" not in result.stderr
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 half a zip file")
    result = cli("--resume", str(corrupt), "--save", str(corrupt), "--report", str(tmp_path / "r.json"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(corrupt) in result.stderr
    assert corrupt.read_bytes() == b"PK\x03\x04 half a zip file" and not (tmp_path / "r.json").exists()
    np.savez(tmp_path / "nolabels.npz", X=np.zeros((10, 3)))
    result = cli("--data", str(tmp_path / "nolabels.npz"))
    assert result.returncode == 2 and "missing array(s) y" in result.stderr


def test_resume_refuses_a_different_model(tmp_path):
    ckpt = tmp_path / "c.npz"
    r = cli("--max-steps", "2", "--save", str(ckpt))
    assert r.returncode == 0, r.stderr
    before = ckpt.read_bytes()
    r = cli("--max-steps", "4", "--resume", str(ckpt), "--save", str(ckpt), "--hidden", "32")
    assert r.returncode == 2 and "sizes" in r.stderr and "Traceback" not in r.stderr
    assert ckpt.read_bytes() == before


def test_own_data_file_trains(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4))
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "mine.npz", X=x, y=y)
    report = tmp_path / "r.json"
    r = cli("--data", str(tmp_path / "mine.npz"), "--epochs", "5", "--batch-size", "16",
            "--report", str(report))
    assert r.returncode == 0, r.stderr
    got = json.loads(report.read_text())
    assert got["dataset"] == "mine" and got["test_accuracy"] > 0.85


def test_horovod_style_example_runs():
    result = run_mpi(2, ["examples/train_mlp.py"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model identical on every rank: True" in result.stdout
    accuracy = float(result.stdout.split("accuracy ")[-1].split(";")[0])
    assert accuracy > 0.95


# --- gradient compression (--compression, issue 21): flags, report, checkpoints ------------------

def checkpoint_arrays(path):
    """Every array in a checkpoint file but meta, by key (parameters, optimizer/, compression/)."""
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k != "meta"}, json.loads(str(f["meta"]))


@pytest.mark.parametrize("compression", [["--compression", "fp16", "--error-feedback"],
                                         ["--compression", "powersgd:2"]])
def test_resume_with_compression_is_bitwise_exact(tmp_path, compression):
    """Every rank's error-feedback residual (and PowerSGD's Q) is saved and given back to it:
    a run stopped and resumed, at an epoch's end or mid-epoch, ends on the very same bits."""
    common = ["--batch-size", "32", "--seed", "1", "--hidden", "32,16", *compression]
    straight_ckpt = str(tmp_path / "straight.npz")
    straight, report = train(2, tmp_path, "straight", "--epochs", "2", "--save", straight_ckpt, *common)
    assert report["compression"] == compression[1] and report["error_feedback"] is True
    final, final_meta = checkpoint_arrays(straight_ckpt)
    assert final_meta["compression_state_ranks"] == 2 and final_meta["error_feedback"] is True
    assert final_meta["compression"] == compression[1] and final_meta["compression_signature"]
    assert any(k.startswith("compression/0/") for k in final)
    assert {k.replace("compression/0/", "compression/1/") for k in final if k.startswith("compression/0/")} \
        == {k for k in final if k.startswith("compression/1/")}
    for stop in (["--epochs", "1"], ["--epochs", "2", "--max-steps", "30", "--save-every", "7"]):
        ckpt = str(tmp_path / f"{stop[-1]}.npz")
        train(2, tmp_path, "first", *stop, "--save", ckpt, *common)
        resumed, again = train(2, tmp_path, "second", "--epochs", "2", "--resume", ckpt, "--save", ckpt, *common)
        assert again["steps"] == report["steps"] and again["params_sha256"] == report["params_sha256"]
        assert set(resumed) == set(straight) and all(np.array_equal(resumed[k], straight[k]) for k in straight)
        got, _ = checkpoint_arrays(ckpt)
        assert set(got) == set(final), set(got) ^ set(final)
        assert all(np.array_equal(got[k], final[k]) for k in final), [
            k for k in final if not np.array_equal(got[k], final[k])]


def test_compression_report_counts_the_bytes(tmp_path):
    from ringsync.training.compression import PowerSGD

    n_params = 64 * 32 + 32 + 32 * 10 + 10
    warm = PowerSGD().start_iter                  # PowerSGD's first steps are plain all-reduces
    steps = ["--max-steps", str(warm + 4), "--hidden", "32", "--batch-size", "16"]
    for p in (1, 3):
        ring = 2 * (p - 1) / p
        _, none = train(p, tmp_path, f"none{p}", *steps)
        assert none["compression"] == "none" and none["error_feedback"] is False
        assert none["payload_bytes_per_step"] == none["uncompressed_bytes_per_step"] == 4 * n_params
        assert none["compression_ratio"] == 1.0 and none["fp16_fallbacks"] == 0
        assert none["ring_bytes_per_rank_per_step"] == pytest.approx(ring * 4 * n_params)
        _, fp16 = train(p, tmp_path, f"fp16{p}", *steps, "--compression", "fp16")
        assert fp16["compression"] == "fp16" and fp16["error_feedback"] is False
        assert fp16["payload_bytes_per_step"] == 2 * n_params and fp16["compression_ratio"] == pytest.approx(2.0)
        assert fp16["uncompressed_bytes_per_step"] == 4 * n_params and fp16["fp16_fallbacks"] == 0
        assert fp16["ring_bytes_per_rank_per_step"] == pytest.approx(ring * 2 * n_params)
        assert fp16["uncompressed_ring_bytes_per_rank_per_step"] == none["ring_bytes_per_rank_per_step"]
        _, psgd = train(p, tmp_path, f"psgd{p}", *steps, "--compression", "powersgd:1")
        assert psgd["compression"] == "powersgd:1" and psgd["error_feedback"] is True
        compressed = psgd["compressed_step_bytes"]
        assert compressed < 2 * n_params and psgd["compressed_step_ratio"] == pytest.approx(4 * n_params / compressed)
        assert psgd["payload_bytes_per_step"] * (warm + 4) == pytest.approx(warm * 4 * n_params + 4 * compressed)
        assert psgd["compression_ratio"] == pytest.approx(4 * n_params / psgd["payload_bytes_per_step"])
        assert psgd["ring_bytes_per_rank_per_step"] == pytest.approx(ring * psgd["payload_bytes_per_step"])
        assert psgd["params_identical_across_ranks"] is True


def test_compression_is_named_in_the_first_line(tmp_path):
    for flags, words in ((["--compression", "powersgd:2", "--no-error-feedback"],
                          "--compression powersgd:2 --no-error-feedback"),
                         ([], "--compression none")):
        result = run_mpi(2, ["-m", "ringsync.training.train", "--max-steps", "3", *flags], timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        first = result.stdout.splitlines()[0]
        assert first.startswith("ringsync-train: 2 rank(s)") and words in first, first
        assert "parameters bitwise identical on all 2 rank(s): yes" in result.stdout


@pytest.mark.parametrize("args, words", [
    (["--compression", "zip"], "--compression"),
    (["--compression", "powersgd"], "--compression"),
    (["--compression", "powersgd:x"], "--compression"),
    (["--compression", "powersgd:0"], "--compression"),
    (["--no-error-feedback"], "--no-error-feedback needs --compression"),
    (["--compression", "none", "--error-feedback"], "--error-feedback needs --compression"),
    (["--compression", "fp16", "--sync", "local:2"], "--sync bsp only"),
    (["--compression", "powersgd:1", "--sync", "async"], "--sync bsp only"),
    (["--compression", "fp16", "--device", "gpu"], "--device cpu only"),
])
def test_bad_compression_flags_exit_2_with_one_line(args, words):
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringsync-train: error:") and words in lines[0], lines


def test_bf16_without_ml_dtypes_exits_2_with_one_line():
    hide = ("import sys; sys.modules['ml_dtypes'] = None; from ringsync.training.train import main; "
            "sys.exit(main(['--quiet', '--max-steps', '1', '--compression', 'bf16']))")
    result = subprocess.run([sys.executable, "-c", hide], cwd=ROOT, check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ringsync-train: error:") and "ml_dtypes" in lines[0], lines


def test_resume_refuses_other_compression_or_world_size(tmp_path):
    ckpt = tmp_path / "c.npz"
    common = ["--max-steps", "6", "--hidden", "16", "--save", str(ckpt)]
    train(2, tmp_path, "ef", *common, "--batch-size", "16", "--compression", "fp16", "--error-feedback")
    before = ckpt.read_bytes()
    for nranks, flags, words in (
            (2, ["--batch-size", "16"], "--compression fp16 --error-feedback, this run has --compression none"),
            (2, ["--batch-size", "16", "--compression", "fp16"], "this run has --compression fp16 --no-error-feedback"),
            (2, ["--batch-size", "16", "--compression", "powersgd:1"], "--compression powersgd:1"),
            (1, ["--batch-size", "32", "--compression", "fp16", "--error-feedback"], "residuals of 2 rank(s)")):
        r = run_mpi(nranks, [*TRAIN, "--max-steps", "8", "--hidden", "16", "--resume", str(ckpt),
                             "--save", str(ckpt), *flags], timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        lines = [line for line in r.stderr.splitlines() if line.startswith("ringsync-train")]
        assert len(lines) == 1 and words in lines[0], (flags, r.stderr[-3000:])
        assert ckpt.read_bytes() == before
    # a compressed run does not resume from a checkpoint of an uncompressed one either
    plain = tmp_path / "plain.npz"
    train(2, tmp_path, "plain", "--max-steps", "6", "--hidden", "16", "--batch-size", "16", "--save", str(plain))
    r = run_mpi(2, [*TRAIN, "--max-steps", "8", "--hidden", "16", "--batch-size", "16", "--resume", str(plain),
                    "--compression", "fp16"], timeout=120)
    assert r.returncode == 2 and "trained with --compression none" in r.stderr, r.stderr[-3000:]


def test_resume_without_error_feedback_may_change_the_rank_count(tmp_path):
    """Without error feedback the compression state (PowerSGD's Q and step) is the same on every
    rank, so a checkpoint of 2 ranks resumes on 1 with the same global batch."""
    ckpt = tmp_path / "c.npz"
    common = ["--hidden", "16", "--compression", "powersgd:1", "--no-error-feedback"]
    train(2, tmp_path, "two", "--max-steps", "12", "--batch-size", "16", "--save", str(ckpt), *common)
    _, report = train(1, tmp_path, "one", "--max-steps", "14", "--batch-size", "32", "--resume", str(ckpt),
                      "--save", str(ckpt), *common)
    assert report["resumed_from_step"] == 12 and report["steps"] == 14 and report["world_size"] == 1
    got, meta = checkpoint_arrays(ckpt)
    assert meta["compression_state_ranks"] == 1 and "compression/0/q" in got and "compression/0/residual" not in got

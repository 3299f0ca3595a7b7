"""The benchmark harness: size parsing, CLI errors (exit 2, one line), and tiny end-to-end runs."""
import json
import shlex
import subprocess
import sys

import pytest
from mpitools import ROOT, mpiexec_command, run_mpi

sys.path.insert(0, str(ROOT / "benchmarks"))
import itertools

import benchlib as bl


@pytest.mark.parametrize("text, value", [("4096", 4096), ("4K", 4096), ("4k", 4096), ("64M", 64 << 20),
                                         ("1G", 1 << 30), ("8KB", 8192)])
def test_parse_size(text, value):
    assert bl.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "4Q", "-4K", "0", "1.5M"])
def test_parse_size_rejects(text):
    with pytest.raises(Exception, match="size"):
        bl.parse_size(text)


def test_size_list_and_busbw():
    assert bl.size_list(4096, 65536, 4) == [4096, 16384, 65536]
    assert bl.size_list(4096, 10000, 2) == [4096, 8192]
    assert bl.size_list(8, 8, 1) == [8]
    assert bl.busbw_factor(1) == 0 and bl.busbw_factor(2) == 1 and bl.busbw_factor(4) == 1.5
    assert bl.human(4096) == "4K" and bl.human(64 << 20) == "64M" and bl.human(1000) == "1000"


def test_dtype_names():
    assert bl.parse_dtype("float").name == "float32" and bl.parse_dtype("half").name == "float16"
    with pytest.raises(Exception, match="dtype"):
        bl.parse_dtype("complex64")


@pytest.mark.parametrize("script, args", [
    ("allreduce_sweep.py", ["-b", "4Q"]),
    ("allreduce_sweep.py", ["-b", "8M", "-e", "4K"]),
    ("allreduce_sweep.py", ["-n", "0"]),
    ("allreduce_sweep.py", ["--impls", "nccl"]),
    ("allreduce_sweep.py", ["-d", "bool"]),
    ("fusion.py", ["-N", "x"]),
    ("fusion.py", ["--thresholds", "1K,oops"]),
    ("scaling.py", ["--ranks", "1,two"]),
    ("straggler.py", ["--ranks", "1"]),
    ("straggler.py", ["--ranks", "2", "--slow-rank", "5"]),
    ("broadcast_allgather.py", ["-b", "8M", "-e", "1K"]),
    ("broadcast_allgather.py", ["-r", "0"]),
    ("handoff.py", ["-b", "8M", "-e", "1K"]),
    ("handoff.py", ["-b", "4K", "-r", "0"]),
    ("train_step.py", ["--transports", "p2p,tcp"]),
    ("train_step.py", ["--transports", "p2p,p2p"]),
    ("cluster_bench.py", ["--shapes", "2by2", "--out", "x"]),
    ("cluster_bench.py", ["--rates", "fast", "--out", "x"]),
    ("link_bytes.py", ["--sizes", "banana"]),
    ("compression_digits.py", ["--ranks", "0"]),
    ("compression_digits.py", ["--timeout", "nan"]),
])
def test_bad_cli_input_exits_2_with_one_line(script, args):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_sweep_runs_and_checks_results(tmp_path):
    out = tmp_path / "sweep.json"
    done = run_mpi(2, [str(ROOT / "benchmarks" / "allreduce_sweep.py"), "-b", "1K", "-e", "64K", "-f", "8",
                       "-n", "2", "-r", "2", "-w", "1", "--impls", "ringsync,teaching,mpi,ceiling",
                       "--json", str(out), "--csv", str(tmp_path / "sweep.csv")], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in rows} == {"ringsync", "teaching", "mpi", "ceiling"}
    assert {r["size"] for r in rows} == {1024, 8192, 65536}
    assert all(r["check"] == "ok" for r in rows if r["impl"] != "ceiling")
    assert all(r["busbw_GBps"] == pytest.approx(r["algbw_GBps"]) for r in rows)  # 2 ranks: factor 1
    rows_printed = [line for line in done.stdout.splitlines() if " ringsync " in line and not line.startswith("#")]
    assert len(rows_printed) == 3  # rank 0 prints, once per size
    assert (tmp_path / "sweep.csv").read_text().startswith("size,count,type,impl")


def test_fusion_runs(tmp_path):
    out = tmp_path / "fusion.json"
    done = run_mpi(2, [str(ROOT / "benchmarks" / "fusion.py"), "-N", "8", "-S", "1K", "-n", "1", "-r", "1",
                       "-w", "0", "--json", str(out)], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    modes = [r["mode"] for r in rows]
    assert modes[:5] == ["one-by-one", "grouped", "grouped-views", "flat", "horovod-cpu"] and "grouped@8K" in modes
    # every mode but the threshold sweep agrees with a float64 reference sum, horovod-cpu included
    assert all(r["check"] == "ok" for r in rows[:5]) and all(r["check"] == "-" for r in rows[5:])
    assert next(r for r in rows if r["mode"] == "horovod-cpu")["over_horovod_cpu"] == 1.0


def test_broadcast_allgather_runs_per_transport(tmp_path):
    out = tmp_path / "bag.json"
    done = run_mpi(2, [str(ROOT / "benchmarks" / "broadcast_allgather.py"), "-b", "1K", "-e", "64K", "-f", "8",
                       "-r", "1", "--json", str(out)], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [(r["collective"], r["bytes"]) for r in rows] == [
        (c, n) for c in ("broadcast", "allgather") for n in (1024, 8192, 65536)]
    assert all(r["check"] == "ok" and r["p2p_us"] > 0 and r["shm_us"] > 0 for r in rows)


def test_handoff_times_every_copy(tmp_path):
    out = tmp_path / "handoff.json"
    done = run_mpi(2, [str(ROOT / "benchmarks" / "handoff.py"), "-b", "4K", "-e", "256K", "-f", "8", "-r", "1",
                       "--json", str(out)], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["bytes"] for r in rows] == [4096, 32768, 262144]
    steps = ("private", "trapped", "copy_", "shared", "handoff", "read", "add", "mpi")
    assert all(r[f"{s}_us"] > 0 for r in rows for s in steps)
    assert all(r["trapped_over_private"] == pytest.approx(r["trapped_us"] / r["private_us"]) for r in rows)


def test_train_step_measures_both_transports(tmp_path):
    """One launch per transport; each row says what it measured."""
    out = tmp_path / "step.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--transports", "p2p,shm",
                           "--models", "digits", "--rounds", "1", "--steps", "2", "--warmup", "0",
                           "--mpiexec", shlex.join(mpiexec_command()), "--json", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in done.stdout + done.stderr
    result = json.loads(out.read_text())
    rows = {r["transport"]: r for r in result["results"]}
    assert rows["p2p"]["model"] == "digits" and rows["p2p"]["params"] == 17226 and rows["p2p"]["step_ms"] > 0
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(rows) == {"p2p", "shm"} and not result["meta"]["failures"]
    assert rows["shm"]["params"] == 17226 and rows["shm"]["step_ms"] > 0


# --- benchmarks/compression.py (issue 21) ------------------------------------------------------

def load_compression_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_compression", ROOT / "benchmarks" / "compression.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args", [
    ["-b", "4Q"],
    ["-b", "8M", "-e", "1M"],
    ["-b", "1002", "-e", "1002"],
    ["-r", "0"],
    ["--compressors", "zip"],
    ["--compressors", "fp16,fp16"],
    ["--compressors", "powersgd:0"],
    ["--compressors", ","],
    ["--rates", "1gbit"],
    ["--cluster", "2by2"],
    ["--cluster", "1x2"],
    ["--cluster", "2x2", "--rates", "fast"],
    ["--cluster", "2x2", "--rates", "1gbit,1gbit"],
    ["--wire-size", "1001"],
])
def test_compression_bad_cli_input_exits_2_with_one_line(args):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compression.py"), *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("compression.py: ") and done.stdout == ""


def test_compression_matrix_shapes_and_crossover():
    cb = load_compression_bench()
    assert cb.matrix_shape(1 << 20) == (512, 512) and cb.matrix_shape(2 << 20) == (512, 1024)
    assert cb.matrix_shape(64 << 20) == (4096, 4096) and cb.matrix_shape(4 * 7) == (1, 7)
    g = 1e9
    # fp16 1.5x faster at 1 Gbit/s, 0.5x at 4 Gbit/s: crosses 1 half way in log rate, at 2 Gbit/s
    found = cb.crossover([(4 * g, 0.5), (1 * g, 1.5)])
    assert found["rate_bps"] == pytest.approx(2 * g) and "below 2.00 Gbit/s" in found["note"]
    assert cb.crossover([(g, 1.2), (10 * g, 1.1)])["rate_bps"] is None
    assert "every rate" in cb.crossover([(g, 1.2), (10 * g, 1.1)])["note"]
    assert "never" in cb.crossover([(g, 0.9), (10 * g, 0.8)])["note"]


def test_compression_runs_every_compressor(tmp_path):
    """Two ranks, two sizes: the table, the three files, payloads and errors as the compressors promise."""
    prefix = tmp_path / "comp"
    done = run_mpi(2, [str(ROOT / "benchmarks" / "compression.py"), "-b", "64K", "-e", "256K", "-f", "4",
                       "--rounds", "2", "--warmup", "1", "--compressors", "none,fp16,powersgd:1",
                       "--out", str(prefix)], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((tmp_path / "comp.json").read_text())
    assert (tmp_path / "comp.png").stat().st_size > 0
    table = [line for line in (tmp_path / "comp.txt").read_text().splitlines() if not line.startswith("#")]
    assert [line.split()[2] for line in table] == ["none", "fp16", "powersgd:1"] * 2
    rows = {(r["size"], r["compressor"]): r for r in doc["results"]}
    assert set(rows) == {(s, c) for s in (65536, 262144) for c in ("none", "fp16", "powersgd:1")}
    assert rows[65536, "none"]["matrix"] == [128, 128] and rows[262144, "none"]["matrix"] == [256, 256]
    for size, n in ((65536, 128), (262144, 256)):
        assert rows[size, "none"]["payload_bytes"] == size and rows[size, "none"]["vs_none"] == 1.0
        assert rows[size, "fp16"]["payload_bytes"] == size // 2
        assert rows[size, "powersgd:1"]["payload_bytes"] == 2 * n * 4        # P and Q, n x 1 each
        assert rows[size, "none"]["compress_us"] is None and rows[size, "none"]["rel_error"] < 1e-6
        assert rows[size, "fp16"]["rel_error"] < 2e-3 and rows[size, "fp16"]["compress_us"] > 0
        assert 0 < rows[size, "powersgd:1"]["rel_error"] <= 1.0 and rows[size, "powersgd:1"]["decompress_us"] > 0
    assert all(r["time_us"] > 0 and len(r["rounds_us"]) == 2 for r in doc["results"])
    assert "start_iter=0" in doc["meta"]["signatures"]["powersgd:1"] and doc["meta"]["ranks"] == 2


def test_compression_bytes_gives_each_compressor_s_ratio():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compression_bytes.py")], check=False,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in done.stdout.splitlines() if not line.startswith("#")}
    assert rows[("digits", "none")] == ["68,904", "1.00"] and rows[("digits", "fp16")] == ["34,452", "2.00"]
    # PowerSGD rank 1: each n x m matrix sends n + m values, the vectors all of theirs (float32)
    sizes = [1024, 2048, 2048, 2048, 10]
    expected = 4 * sum((n + m) * 1 + m for n, m in itertools.pairwise(sizes))
    assert rows[("sized", "powersgd:1")][0] == f"{expected:,}", (rows[("sized", "powersgd:1")], expected)


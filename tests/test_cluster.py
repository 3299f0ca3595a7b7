"""Across emulated hosts (ringsync-cluster, issue 19): `make test-cluster`, root only.

Each test builds its own hosts (network namespaces joined by a switch, docs/cluster.md),
launches a job across them with this Python's MPI (MPICH's or Open MPI's wheel), and tears
them down. Nodes come from MPI (RINGSYNC_NODE_SIZE unset): the ranks of one host share
memory, the hosts share nothing but files. Without root or namespaces these tests skip with
the reason, and fail instead where RINGSYNC_REQUIRE_CLUSTER=1 (CI).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from mpitools import ROOT, program_lines

from ringsync.cluster import Cluster, ClusterError, ClusterSpec, launch, links
from ringsync.cluster import hosts as cluster_hosts

pytestmark = pytest.mark.cluster


def can_emulate() -> str | None:
    try:
        cluster_hosts.check_can_emulate()
    except ClusterError as exc:
        return str(exc)
    return None


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """Every test may need root; none may leave a namespace, interface or /dev/shm file."""
    why = can_emulate()
    if why:
        if os.environ.get("RINGSYNC_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"RINGSYNC_REQUIRE_CLUSTER=1 but no emulated hosts: {why}")
        pytest.skip(f"no emulated hosts: {why}")
    os.environ.pop("RINGSYNC_NODE_SIZE", None)        # nodes from MPI, not simulated
    runs, shm, ifaces = set(cluster_hosts.runs()), set(os.listdir("/dev/shm")), root_interfaces()
    spaces = namespaces_in_use()
    yield
    assert set(cluster_hosts.runs()) <= runs, "a cluster of this test is still up"
    assert root_interfaces() <= ifaces, "an interface appeared in the root namespace"
    # A namespace with a process still inside outlives its name, with its veth and qdisc.
    # (A process being killed may take a moment to be gone: 2 s, not longer.)
    deadline = time.monotonic() + 2
    while not namespaces_in_use() <= spaces and time.monotonic() < deadline:
        time.sleep(0.05)
    assert namespaces_in_use() <= spaces, f"a process of this test lives on in a namespace: {strays(spaces)}"
    grew = unmapped(set(os.listdir("/dev/shm")) - shm)
    if grew:                  # a file another job on this machine is making: gone or mapped soon
        time.sleep(2)
        grew = unmapped(grew)
    assert not grew, f"/dev/shm grew: {grew}"


def namespaces_in_use() -> set[int]:
    """Every network and PID namespace some process on the machine is in (by inode)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for kind in ("net", "pid"):
            try:
                found.add(os.stat(f"/proc/{pid}/ns/{kind}").st_ino)
            except OSError:
                pass
    return found


def strays(known: set[int]) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            spaces = {os.stat(f"/proc/{pid}/ns/{k}").st_ino for k in ("net", "pid")}
            if spaces - known:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100])
        except OSError:
            pass
    return found


def root_interfaces() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def unmapped(names: set[str]) -> set[str]:
    """The files among `names` in /dev/shm that no running process maps (left behind)."""
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        mapped |= {line.split()[-1] for line in maps.splitlines() if "/dev/shm/" in line}
    return {n for n in names if f"/dev/shm/{n}" not in mapped and os.path.exists(f"/dev/shm/{n}")}


@pytest.fixture
def shared():
    """A folder every host sees (each host has its own /tmp, as cluster nodes do)."""
    folder = Path(tempfile.mkdtemp(prefix="ringsync-cluster-test-", dir="/var/tmp"))
    folder.chmod(0o755)              # under sudo the ranks run as the user who called it
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def job(folder: Path, code: str) -> str:
    path = folder / "job.py"
    path.write_text(code)
    return str(path)


def run(cluster: Cluster, argv: list[str], timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return launch.run(cluster, [sys.executable, *argv], timeout=timeout, **kw)


WHERE = """
import socket, sys
import ringsync as rs
rs.init()
w = rs.context.world()
shm = [line.split(" - ")[1].split()[1] for line in open("/proc/self/mountinfo")
       if line.split()[4] == "/dev/shm"]                  # the host's own /dev/shm
sys.stdout.write(f"rank {rs.rank()} host {socket.gethostname()} local {rs.local_rank()} "
                 f"{rs.local_size()} nodes {'one' if w.single_node else 'many'} shm {shm[-1]}\\n")
"""


@pytest.mark.parametrize("slots", [[2, 1], [2, 2, 1]])
def test_local_ranks_and_nodes_come_from_the_hosts(shared, slots):
    with Cluster.up(ClusterSpec(slots)) as cluster:
        done = run(cluster, [job(shared, WHERE)])
    assert done.returncode == 0, done.stderr[-3000:]
    seen = sorted(line.split() for line in program_lines(done.stdout))
    expected, r = [], 0
    for h, n in enumerate(slots):
        for local in range(n):
            expected.append(["rank", str(r), "host", f"host{h}", "local", str(local), str(n),
                             "nodes", "many", "shm", "ringsync-shm"])
            r += 1
    assert sorted(seen, key=lambda s: int(s[1])) == expected, done.stdout


DAEMON = """
import os, sys
import ringsync as rs
rs.init()
environ = open(f"/proc/{os.getppid()}/environ", "rb").read().split(b"\\0")
marked = any(e.startswith(b"RINGSYNC_MARKER=") for e in environ)
sys.stdout.write(f"rank {rs.rank()} uid {os.getuid()} pidns {os.stat('/proc/self/ns/pid').st_ino} "
                 f"daemon_env_marked {marked}\\n")
"""


def test_ranks_start_through_the_agent_in_their_host(shared):
    """Every host's daemon starts as ssh would start it: in the host's namespaces (PID ones
    too), as the cluster's user, with a clean environment (the launcher's own variables, here
    RINGSYNC_MARKER, do not reach the daemon; MPI then forwards what it forwards itself)."""
    with Cluster.up(ClusterSpec([2, 1])) as cluster:
        done = run(cluster, [job(shared, DAEMON)], env={"RINGSYNC_MARKER": "1"})
        pidns = {h.pid_ns: h.hostname for h in cluster.hosts}
        uid = cluster.uid
    assert done.returncode == 0, done.stderr[-3000:]
    rows = sorted(line.split() for line in program_lines(done.stdout))
    assert len(rows) == 3, done.stdout
    hosts = [pidns.get(int(r[5])) for r in rows]
    assert sorted(hosts) == ["host0", "host0", "host1"], (rows, pidns)
    assert all(r[3] == str(uid) and r[7] == "False" for r in rows), rows


RESULTS = """
import hashlib, sys
import numpy as np
from mpi4py import MPI
import ringsync as rs
rs.init()
comm, r, p = MPI.COMM_WORLD, rs.rank(), rs.size()
bad = []


def check(name, got, want):
    digests = comm.allgather(hashlib.sha256(np.ascontiguousarray(got).tobytes()).hexdigest())
    if len(set(digests)) != 1:
        bad.append(f"{name}: ranks differ")
    if got.dtype != want.dtype or not np.array_equal(got, want):
        bad.append(f"{name}: not the oracle's")


for n in (0, 1, 3, p - 1, p + 1, 1000, 65537, 1 << 18, 1 << 22):    # 4-byte elements: to 16 MiB
    for dtype in (np.float32, np.int32):
        x = ((np.arange(n) * (r + 3)) % 1000).astype(dtype)           # whole numbers: exact sums
        want = np.empty_like(x)
        comm.Allreduce(x, want, op=MPI.SUM)
        check(f"allreduce sum {n} {dtype.__name__}", rs.allreduce(x), want)
        comm.Allreduce(x, want, op=MPI.MAX)
        check(f"allreduce max {n} {dtype.__name__}", rs.allreduce(x, op=rs.Max), want)
    x = (np.arange(n) + r).astype(np.float64)
    want = x.copy()
    comm.Bcast(want, root=p - 1)
    check(f"broadcast {n}", rs.broadcast(x, root=p - 1), want)
    if n <= 1 << 18:
        want = np.empty(n * p, np.float64)
        comm.Allgather(x, want)
        check(f"allgather {n}", rs.allgather(x), want)
    parts = [((np.arange(k) + r) % 7).astype(np.float32) for k in (n, 5, n // 3 + 1)]
    wants = [np.empty_like(a) for a in parts]
    for a, b in zip(parts, wants):
        comm.Allreduce(a, b, op=MPI.SUM)
    for i, (got, want) in enumerate(zip(rs.grouped_allreduce(parts, op=rs.Sum), wants)):
        check(f"grouped {n} part {i}", got, want)
sys.stdout.write(f"rank {r}: {'ok' if not bad else 'BAD ' + '; '.join(bad[:5])}\\n")
"""


def test_results_across_hosts_are_the_oracle_s_on_every_rank(shared):
    with Cluster.up(ClusterSpec([2, 2, 1])) as cluster:
        done = run(cluster, [job(shared, RESULTS)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = program_lines(done.stdout)
    assert sorted(lines) == [f"rank {r}: ok" for r in range(5)], done.stdout[-3000:]


def test_the_links_carry_what_the_ring_must_send_at_their_rate(shared):
    """Proof that MPI is pinned to TCP between hosts: the bytes are on the links (a shortcut
    through shared memory would leave them near zero), and the links run at their rate."""
    code = ("import numpy as np, ringsync as rs\nrs.init()\n"
            "x = np.ones(1 << 20, np.float32)\nrs.allreduce_(x)\nassert x[0] == rs.size()\n")
    with Cluster.up(ClusterSpec([2, 2], rate_bps=10**9)) as cluster:
        before = links.counters(cluster)
        done = run(cluster, [job(shared, code)])
        moved = links.difference(links.counters(cluster), before)
        rate = links.measure_rate(cluster, "host0", "host1")
    assert done.returncode == 0, done.stderr[-3000:]
    expected = links.ring_bytes_per_link(4 << 20, hosts=2)       # 4 MiB each way per host
    for host, m in moved.items():
        for way in (m.up, m.down):
            assert expected <= way <= 1.25 * expected, (host, way, expected)
    for bps in (rate.up_bps, rate.down_bps):
        assert bps == pytest.approx(1e9, rel=0.05), rate


MISMATCH = """
import sys
import numpy as np
import ringsync as rs
rs.init()
n = 1000 if rs.rank() != rs.size() - 1 else 999     # the last host disagrees
try:
    rs.allreduce(np.ones(n))
    sys.stdout.write(f"rank {rs.rank()}: no error\\n")
except rs.MismatchError as exc:
    sys.stdout.write(f"rank {rs.rank()}: MismatchError\\n")
"""


def test_disagreeing_calls_raise_on_every_rank_across_hosts(shared):
    with Cluster.up(ClusterSpec([2, 1])) as cluster:
        done = run(cluster, [job(shared, MISMATCH)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(program_lines(done.stdout)) == [f"rank {r}: MismatchError" for r in range(3)]


FAIL = """
import os, signal, sys, time
import numpy as np
import ringsync as rs
rs.init()
start = time.monotonic()
for step in range(100000):
    if rs.rank() == rs.size() - 1 and time.monotonic() - start > 1.0:
        sys.stderr.write(f"failing at step {{step}}\\n")
        sys.stderr.flush()
        {failure}
    rs.allreduce(np.ones(100000))
"""


@pytest.mark.parametrize("failure", ["raise RuntimeError('boom on the last host')",
                                     "os.kill(os.getpid(), signal.SIGKILL)"])
def test_a_failure_on_one_host_ends_the_job_on_every_host(shared, failure):
    with Cluster.up(ClusterSpec([2, 1])) as cluster:
        t0 = time.monotonic()
        done = run(cluster, [job(shared, FAIL.format(failure=failure))], timeout=90)
        took = time.monotonic() - t0
    assert done.returncode not in (0, 124), (done.returncode, done.stderr[-3000:])
    assert "failing at step" in done.stderr
    if "raise" in failure:
        assert "boom on the last host" in done.stderr, done.stderr[-3000:]
    assert took < 60, took                 # seconds after the failure, not the timeout


def test_the_straggler_report_names_the_slow_rank_and_its_host(shared):
    report = shared / "report.json"
    with Cluster.up(ClusterSpec([2, 2])) as cluster:
        done = run(cluster, ["-m", "ringsync.training.train", "--max-steps", "10",
                             "--straggler", "3:0.05", "--report", str(report)])
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["straggler"]["slowest_rank"] == 3
    assert doc["straggler"]["slowest_host"] == "host1"
    assert [row["host"] for row in doc["ranks"]] == ["host0", "host0", "host1", "host1"]
    assert "slowest rank: 3 on host1" in done.stdout


def params(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files if k != "meta" and not k.startswith("optimizer/")}


def test_training_across_hosts_equals_one_rank(shared):
    """p ranks with batch B train like 1 rank with batch pB (test_train.py's claim), across
    hosts; the hierarchical sum adds in another order, so to the same tolerance, not bitwise."""
    steps = ["-m", "ringsync.training.train", "--quiet", "--max-steps", "40", "--seed", "3"]
    one = subprocess.run([sys.executable, *steps, "--batch-size", "64", "--save", str(shared / "one.npz")],
                         check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert one.returncode == 0, one.stderr[-3000:]
    with Cluster.up(ClusterSpec([2, 2])) as cluster:
        done = run(cluster, [*steps, "--batch-size", "16", "--save", str(shared / "four.npz"),
                             "--report", str(shared / "four.json")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((shared / "four.json").read_text())["params_identical_across_ranks"] is True
    ref, got = params(shared / "one.npz"), params(shared / "four.npz")
    num = sum(float(((got[k].astype(np.float64) - ref[k]) ** 2).sum()) for k in ref)
    den = sum(float((ref[k].astype(np.float64) ** 2).sum()) for k in ref)
    assert (num / den) ** 0.5 <= 1e-4


def test_overlap_across_hosts_gives_the_bits_of_overlap_off(shared):
    """--overlap against the same buckets after backward, on hosts of 2 and 1 ranks (the
    hierarchical all-reduce, its rings across the link): the same parameters, bit for bit."""
    steps = ["-m", "ringsync.training.train", "--quiet", "--max-steps", "12", "--fusion-mb", "0.02"]
    env = {"RINGSYNC_FIRST_BUCKET_BYTES": "4096"}
    digests = {}
    with Cluster.up(ClusterSpec([2, 1])) as cluster:
        for name, flags in (("on", ["--overlap"]), ("off", ["--buckets", "backward"])):
            done = run(cluster, [*steps, *flags, "--report", str(shared / f"{name}.json")], env=env)
            assert done.returncode == 0, done.stderr[-3000:]
            doc = json.loads((shared / f"{name}.json").read_text())
            assert doc["params_identical_across_ranks"] is True and doc["bucket_count"] == 3, doc["bucket_count"]
            digests[name] = doc["params_sha256"]
    assert digests["on"] == digests["off"]
    assert doc["overlap_enabled"] is False and "overlap" not in doc


CLI = [sys.executable, "-m", "ringsync.cluster.cli"]
SLEEPER = """
import sys, time
import ringsync as rs
rs.init()
sys.stdout.write("started\\n")
sys.stdout.flush()
time.sleep(120)
"""


def test_the_command_runs_a_job_and_exits_with_its_code(shared):
    code = "import ringsync as rs, sys\nrs.init()\nsys.exit(3 if rs.rank() == 1 else 0)\n"
    done = subprocess.run([*CLI, "run", "--hosts", "2", "--rate", "1gbit", "--", sys.executable,
                           job(shared, code)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-3000:]
    done = subprocess.run([*CLI, "run", "--slots", "1,1", "--", sys.executable, job(shared, WHERE)],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and len(program_lines(done.stdout)) == 2, done.stderr[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_stopped_command_leaves_nothing(shared, sig):
    tool = subprocess.Popen([*CLI, "run", "--slots", "2,1", "--", sys.executable, job(shared, SLEEPER)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    name = tool.stderr.readline().split()[1]              # "ringsync-cluster: rsc-... up: ..."
    assert name.startswith("rsc-"), name
    for _ in range(3):
        assert tool.stdout.readline() == "started\n"
    tool.send_signal(sig)
    tool.communicate(timeout=60)
    if sig == signal.SIGKILL:      # no teardown ran: the hosts died with it, `down` removes the rest
        assert name in cluster_hosts.runs()
        down = subprocess.run([*CLI, "down", name], check=False, capture_output=True, text=True, timeout=60)
        assert down.returncode == 0 and f"removed {name}" in down.stdout, down.stderr
    assert name not in cluster_hosts.runs()


@pytest.mark.parametrize("args", [["run", "--rate", "fast", "--", "true"], ["run", "--slots", "2,0", "--", "true"],
                                  ["run", "--hosts", "2"], ["down", "not-ours"], ["status", "rsc-000000"],
                                  ["run", "--name", "rsc-000000", "--", "true"]])
def test_bad_input_exits_2_with_one_line(args):
    done = subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr


def test_without_root_it_says_so_in_one_line():
    done = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                           *CLI, "run", "--", "true"], check=False, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done
    assert done.stderr.strip() == ("ringsync-cluster: error: emulated hosts need root (network "
                                   "namespaces): run it with sudo"), done.stderr


def test_the_cluster_benchmark_runs_and_counts_the_links(shared):
    out = shared / "bench"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cluster_bench.py"), "--shapes", "2x1",
                           "--rates", "none", "-b", "256K", "-e", "1M", "--launches", "1", "--calls", "2",
                           "--out", str(out)], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    rows = doc["configs"][0]["rows"]
    assert {r["impl"] for r in rows} == {"ringsync", "flat ring (p2p)", "mpi"}
    assert {r["size"] for r in rows} == {256 << 10, 1 << 20} and all(r["calls"] == 2 for r in rows)
    counted = doc["configs"][0]["link_bytes"]
    assert counted and all(min(b["sent"] + b["received"]) >= b["expected"] for b in counted)
    assert out.with_suffix(".png").stat().st_size > 0 and "of_link" in out.with_suffix(".txt").read_text()

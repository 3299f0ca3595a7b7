"""Each MPI's command line across the emulated hosts, pinned to TCP between hosts.

Both launchers start their per-host daemon through agent.py (an ssh stand-in) and place
ranks by the host list (host0:2,host1:2,...), so a rank's node is MPI's own idea of a node:
the host its daemon runs on. Between hosts every byte must cross the host's veth, where it
is shaped and counted. Left alone, MPI libraries find faster roads on one machine (they can
tell that all "hosts" share one kernel), so each transport layer is told to use TCP on eth0:

- MPICH's wheel (ch4 with UCX or libfabric): UCX_TLS=tcp,self and UCX_NET_DEVICES=eth0
  (without them UCX moves bytes between hosts through shared memory: 16 MB in 35 ms "over"
  a 1 Gbit/s link, 4x faster than the link); FI_PROVIDER=tcp for libfabric.
- Open MPI's wheel: pml ob1 with btl tcp,self,sm (sm only within a host: each host has its
  own /dev/shm), TCP on eth0 for MPI and for its runtime (oob), and an eager limit of 1 MiB
  (below: messages go without a rendezvous).

Within a host, ranks share memory as on any node (ringsync's segment, MPI's own sm).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .hosts import Cluster

# Every MPI transport knob that keeps traffic between hosts on TCP over eth0.
MPICH_PINS = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "eth0", "FI_PROVIDER": "tcp",
              "FI_TCP_IFACE": "eth0"}
OPENMPI_PINS = {"OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "tcp,self,sm",
                "OMPI_MCA_btl_tcp_if_include": "eth0", "OMPI_MCA_oob_tcp_if_include": "eth0",
                "PRTE_MCA_oob_tcp_if_include": "eth0",
                # The Makefile's setting for one host, and more needed here: without it Open
                # MPI's own Allreduce across namespaces took 2.15 s at 16 MB (148 ms with it).
                "OMPI_MCA_mpi_yield_when_idle": "1",
                # Above this, ob1 sends a TCP message by rendezvous: a round trip to the
                # receiver before the bytes. ringsync's hierarchical all-reduce moves a node's
                # slot (RINGSYNC_SHM_SLOT_BYTES, 1 MiB) per exchange; at the default 64 KiB each
                # waited for the peer to be scheduled on the shared cores: 0.67 of a 1 Gbit/s
                # link instead of 0.92 (MPI's own Allreduce the same either way). Measured in
                # benchmarks/results/cluster/2026-12-07_openmpi_eager_limit.txt; docs/cluster.md.
                "OMPI_MCA_btl_tcp_eager_limit": str(1 << 20)}
MPIS = ("mpich", "openmpi")


def launcher_of(mpi: str | None = None) -> tuple[str, Path]:
    """(which MPI, its launcher): the one beside this Python (a venv with an MPI wheel), else
    on PATH. mpi names the one expected; ValueError when the launcher found is the other."""
    if mpi is not None and mpi not in MPIS:
        raise ValueError(f"mpi must be one of {MPIS}, got {mpi!r}")
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        path = here / name if (here / name).exists() else shutil.which(name)
        if path:
            break
    else:
        raise ValueError("mpi: no mpiexec or mpirun beside this Python or on PATH")
    version = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    found = "mpich" if "HYDRA" in version else "openmpi" if "Open MPI" in version else None
    if found is None:
        raise ValueError(f"mpi: {path} is neither MPICH's Hydra nor Open MPI's mpirun")
    if mpi is not None and mpi != found:
        raise ValueError(f"mpi: {mpi} asked for, but {path} is {found}'s (install {mpi}'s "
                         f"wheel in this Python's environment)")
    return found, Path(path)


def command(cluster: Cluster, mpi: str, launcher: Path, argv: list[str],
            forward: list[str], ranks: int | None = None) -> list[str]:
    """The launcher's command line for argv on every slot of the cluster (or the first
    `ranks`). forward: environment variables to carry to the ranks (Open MPI's -x; Hydra
    carries the whole environment anyway, as it does on a real cluster)."""
    hosts = ",".join(f"{h.hostname}:{h.slots}" for h in cluster.hosts)
    n = sum(h.slots for h in cluster.hosts) if ranks is None else ranks
    if mpi == "mpich":
        return [str(launcher), "-launcher", "ssh", "-launcher-exec", str(cluster.agent),
                "-hosts", hosts, "-iface", "eth0", "-n", str(n), *argv]
    carry = [word for name in forward for word in ("-x", name)]
    # The launcher runs as root (its agent enters namespaces); the ranks as the user.
    return [str(launcher), "--allow-run-as-root", "--prtemca", "plm_ssh_agent", str(cluster.agent),
            "--host", hosts, "--map-by", "slot", "-n", str(n), *carry, *argv]


def environment(mpi: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment: ours, the TCP pins, and the caller's extra variables."""
    env = dict(os.environ)
    env.update(MPICH_PINS if mpi == "mpich" else OPENMPI_PINS)
    env.update(extra or {})
    return env


def run(cluster: Cluster, argv: list[str], mpi: str | None = None,
        env: dict[str, str] | None = None, forward: tuple[str, ...] = (),
        timeout: float | None = None, ranks: int | None = None,
        capture: bool = True) -> subprocess.CompletedProcess:
    """Launch argv across the cluster and wait. The launcher runs on the login node (its
    network, hostname and files), so every host's daemon and ranks start through the agent;
    every process the job left anywhere is killed when it ends, also on timeout (then
    returncode is 124, as timeout(1) gives), and the launcher dies with this process.

    (The launcher keeps the root PID namespace: the agent it starts must enter the hosts' PID
    namespaces, and a process can only enter a PID namespace below its own.)"""
    mpi, launcher = launcher_of(mpi)
    names = list(forward) + [k for k in (env or {}) if k not in forward]
    login = cluster.login or cluster.hosts[0]
    argv_full = ["setpriv", "--pdeathsig", "KILL", "nsenter", "-t", str(login.init), "--net",
                 "--uts", "--mount", f"--wd={os.getcwd()}",
                 *command(cluster, mpi, launcher, argv, names, ranks)]
    out = subprocess.PIPE if capture else None
    job = subprocess.Popen(argv_full, env=environment(mpi, env), stdout=out, stderr=out,
                           text=True, start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
        code = job.returncode
    except subprocess.TimeoutExpired:
        cluster.kill_jobs()              # first: daemons elsewhere may hold the output pipes
        os.killpg(job.pid, 9)
        stdout, stderr = job.communicate(timeout=30)
        code = 124
    finally:
        if job.poll() is None:
            cluster.kill_jobs()
            os.killpg(job.pid, 9)
            job.wait()
        cluster.kill_jobs()
    return subprocess.CompletedProcess(argv_full, code, stdout, stderr)

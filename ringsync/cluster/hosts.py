"""A virtual cluster: N emulated hosts on one machine, joined by one switch, with shaped links.

    with Cluster.up(ClusterSpec(slots=[2, 2], rate_bps=10**9)) as cluster:
        result = launch.run(cluster, ["python", "my_script.py"])

Picture (2 hosts, and the login node where the MPI launcher runs):

    host0 netns           switch netns (no address)          host1 netns
    eth0 198.18.0.1 ===== h0 --- br0 --- h1 ===== eth0 198.18.0.2
         tbf on eth0       tbf on h0  |  tbf on h1         tbf on eth0
                                    login (198.18.0.254, unshaped)

Each host has its own hostname, network stack, /dev/shm, /tmp, /proc and PID space
(netns.start_holder); the rest of the file system is shared. Addresses live only inside the
cluster's namespaces, the switch has no uplink, and the root namespace gets no address and no
route, so no packet can leave. Every name carries the run's prefix (`rsc-` + 6 hex digits)
and the run's state lives in /run/ringsync-cluster/<prefix>/, so `down` can remove what a
killed run left behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import netns
from .netns import ClusterError

STATE_ROOT = Path("/run/ringsync-cluster")
PREFIX = "rsc-"
# 198.18.0.0/15 is reserved for benchmarking network devices (RFC 2544): no real host has
# such an address, so the cluster can never shadow one. One /24 per cluster, in its own switch.
SUBNET, PREFIX_LEN = "198.18.0", 24
SHM_BYTES = 1 << 30                   # each host's private /dev/shm (tmpfs: memory as it is used)


@dataclass
class ClusterSpec:
    """What to build: ranks (slots) per host, and the link rate in bits/s (None: unshaped)."""
    slots: list[int]
    rate_bps: int | None = None
    burst_bytes: int | None = None     # None: rate x 1 ms, at least 64 KiB (see burst_for)
    latency_ms: int = 20               # the most a packet may queue behind the token bucket
    mtu: int = 1500                    # Ethernet's; clusters often use 9000 (jumbo frames)

    def __post_init__(self) -> None:
        if not self.slots or any(not isinstance(s, int) or s < 1 for s in self.slots):
            raise ValueError(f"slots must be a list of positive rank counts, got {self.slots!r}")
        if len(self.slots) > 250:
            raise ValueError(f"slots: at most 250 hosts, got {len(self.slots)}")
        if self.rate_bps is not None and self.rate_bps < 10**6:
            raise ValueError(f"rate_bps must be at least 1 Mbit/s, got {self.rate_bps}")
        if not 576 <= self.mtu <= 65535:
            raise ValueError(f"mtu must be in 576..65535, got {self.mtu}")
        if self.burst_bytes is None and self.rate_bps is not None:
            self.burst_bytes = burst_for(self.rate_bps)


def burst_for(rate_bps: int) -> int:
    """tbf's bucket: what the link sends in 1 ms at full rate, at least 64 KiB (one GSO
    packet of a veth must fit in the bucket, or tbf cuts it up or drops it)."""
    return max(rate_bps // 8 // 1000, 64 * 1024)


@dataclass
class Host:
    hostname: str
    ns: str                      # the host's network namespace name (under /run/netns)
    port: str                    # its veth's name on the switch side
    address: str
    slots: int
    holder: int = 0              # the unshare process
    init: int = 0                # PID 1 of the host, as the root namespace sees it
    net_ns: int = 0              # the inodes of its network and PID namespaces: who belongs
    pid_ns: int = 0              # to the host, even once a PID above has been reused


@dataclass
class Cluster:
    prefix: str
    spec: ClusterSpec
    hosts: list[Host] = field(default_factory=list)
    # Where the MPI launcher runs, as on a cluster's login node: not one of the hosts, so
    # every host's daemon and ranks start through the agent (namespaces, user, clean env).
    login: Host | None = None
    creator: int = 0             # the process that made it (0 once `up` hands it over)
    uid: int = 0                 # who runs the user's commands (SUDO_UID under sudo)
    gid: int = 0

    # --- where things are ------------------------------------------------------------------

    @property
    def switch(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.prefix

    @property
    def agent(self) -> Path:
        """The ssh stand-in that MPI launchers are pointed at (agent.py)."""
        return self.state_dir / "agent"

    @property
    def hostfile(self) -> Path:
        return self.state_dir / "hostfile"

    @property
    def machines(self) -> list[Host]:
        """The hosts and the login node: everything with namespaces to tear down."""
        return self.hosts + ([self.login] if self.login else [])

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if name in (h.hostname, h.address):
                return h
        raise KeyError(name)

    # --- up and down -----------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def up(cls, spec: ClusterSpec, persistent: bool = False) -> Iterator[Cluster]:
        """Build the cluster; tear it down when the block ends, however it ends."""
        cluster = cls.create(spec, persistent=persistent)
        try:
            yield cluster
        finally:
            cluster.down()

    @classmethod
    def create(cls, spec: ClusterSpec, persistent: bool = False) -> Cluster:
        """Build the cluster (and tear down what was built if any step fails). persistent:
        the hosts outlive this process (`ringsync-cluster up`); else they die with it."""
        check_can_emulate()
        prefix = PREFIX + secrets.token_hex(3)
        uid, gid = (int(os.environ.get("SUDO_UID", os.getuid())), int(os.environ.get("SUDO_GID", os.getgid())))
        cluster = cls(prefix, spec, creator=0 if persistent else os.getpid(), uid=uid, gid=gid)
        cluster.hosts = [Host(f"host{i}", f"{prefix}-h{i}", f"h{i}", f"{SUBNET}.{i + 1}", s)
                         for i, s in enumerate(spec.slots)]
        cluster.login = Host("login", f"{prefix}-login", "login", f"{SUBNET}.254", 0)
        try:
            cluster.build(persistent)
        except BaseException:
            cluster.down()
            raise
        return cluster

    def build(self, persistent: bool) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=False)
        self.write_state()                    # first, so that `down` finds a half-built run
        hosts_file = self.state_dir / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n" + "".join(
            f"{h.address} {h.hostname}\n" for h in self.machines))
        self.hostfile.write_text("".join(f"{h.hostname}:{h.slots}\n" for h in self.hosts))
        # The agent runs as a script, not as a module of the package: nothing of ringsync
        # (and so no MPI) is imported where the launcher starts it, once per host.
        self.agent.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).parent / 'agent.py'} "
                              f"{self.state_dir / 'state.json'} \"$@\"\n")
        self.agent.chmod(0o755)
        netns.add_netns(self.switch)
        netns.add_bridge(self.switch)
        for h in self.machines:
            holder = netns.start_holder(h.hostname, hosts_file, SHM_BYTES, not persistent,
                                        own_proc=h is not self.login)
            h.holder = holder.pid
            self.write_state()                # known before anything else can fail
            h.init = netns.init_pid(holder.pid)
            h.pid_ns = netns.namespace_inode(h.init, "pid")
            h.net_ns = netns.namespace_inode(h.init, "net")
            self.write_state()
            netns.attach_netns(h.ns, h.init)
            netns.add_host_link(self.switch, h.port, h.ns, h.address, PREFIX_LEN)
            if h is self.login:
                continue                      # the login node's link: unshaped, uncounted
            if self.spec.mtu != 1500:
                netns.set_mtu(h.ns, "eth0", self.spec.mtu)
                netns.set_mtu(self.switch, h.port, self.spec.mtu)
            if self.spec.rate_bps is not None:       # both directions: each end's egress
                for ns, dev in ((h.ns, "eth0"), (self.switch, h.port)):
                    netns.shape(ns, dev, self.spec.rate_bps, self.spec.burst_bytes or 0,
                                self.spec.latency_ms)
        self.write_state()

    def write_state(self) -> None:
        path = self.state_dir / "state.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, prefix: str) -> Cluster:
        doc = json.loads((STATE_ROOT / prefix / "state.json").read_text())
        spec = ClusterSpec(**doc.pop("spec"))
        hosts = [Host(**h) for h in doc.pop("hosts")]
        login = Host(**doc.pop("login")) if doc.get("login") else None
        doc.pop("login", None)
        return cls(spec=spec, hosts=hosts, login=login, **doc)

    @staticmethod
    def _kill_until_gone(inodes: set[int], spare: set[int], limit: float) -> None:
        """SIGKILL every process in these namespaces but `spare` until three looks in a row
        find none (a process being killed can hide for a moment: its main thread gone, its
        others still exiting), or `limit` seconds pass."""
        deadline, empty = time.monotonic() + limit, 0
        while inodes and empty < 3 and time.monotonic() < deadline:
            left = [p for p in netns.processes_in(inodes) if p not in spare]
            empty = 0 if left else empty + 1
            netns.kill_all(left)
            time.sleep(0.02)

    def namespaces(self) -> set[int]:
        """The inodes of the cluster's live network and PID namespaces, as recorded when they
        were made, each still checked against what holds it (the name under /run/netns, the
        host's PID 1), so that a stale record, whose numbers the kernel may have given to
        something else since, names nothing; and never the namespaces this process lives in."""
        live = set()
        for h in self.machines:
            if h.net_ns and netns.netns_inode(h.ns) == h.net_ns:
                live.add(h.net_ns)
            if h.pid_ns and netns.namespace_inode(h.init, "pid") == h.pid_ns:
                live.add(h.pid_ns)
        return live - {netns.namespace_inode(os.getpid(), k) for k in ("net", "pid")}

    def kill_jobs(self) -> list[int]:
        """Kill every process on the hosts and the login node but their holders (what a job
        left running)."""
        keep = {h.init for h in self.machines} | {h.holder for h in self.machines}
        killed = [p for p in netns.processes_in(self.namespaces()) if p not in keep]
        netns.kill_all(killed)
        return killed

    def down(self) -> None:
        """Kill every process of every host, then delete the namespaces and the state.

        Order matters: `ip netns del` while a process is still inside only removes the name;
        the namespace, its veth and its qdisc would live on with that process. Signals wait
        until it is done: a second Ctrl-C must not leave half a cluster."""
        stop = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        held = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        try:
            self._down()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _down(self) -> None:
        inodes = self.namespaces()
        holders = {h.holder for h in self.machines if h.holder}
        # Everything but the holders first: a host's PID 1 is among them, and once it dies
        # the kernel kills the rest of the host. Its holder (unshare) then collects it and
        # exits by itself, and we collect the holder: no zombie is left behind.
        self._kill_until_gone(inodes, spare=holders, limit=5)
        for pid in holders:
            reap(pid)
        self._kill_until_gone(inodes, spare=set(), limit=5)
        for pid in holders:
            reap(pid)
        for name in [h.ns for h in self.machines] + [self.switch]:
            netns.delete_netns(name)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def reap(pid: int, limit: float = 5.0) -> None:
    """Collect a child of ours that was killed (no zombie); ignore anything else."""
    deadline = time.monotonic() + limit
    while pid and time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except (ChildProcessError, OSError):
            return                            # not our child, or already collected
        time.sleep(0.01)


def check_can_emulate() -> None:
    """ClusterError naming what is missing: root, the tools, or namespaces."""
    if os.geteuid() != 0:
        raise ClusterError("emulated hosts need root (network namespaces): run it with sudo")
    for tool in ("ip", "tc", "unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            raise ClusterError(f"emulated hosts need `{tool}` (iproute2, util-linux), not found")
    if not os.path.exists("/proc/self/ns/net"):
        raise ClusterError("this kernel has no network namespaces")


def runs() -> list[str]:
    """The prefixes of every cluster on this machine: its state folders and namespace names."""
    found = {p.name for p in STATE_ROOT.iterdir()} if STATE_ROOT.is_dir() else set()
    found |= {n.rsplit("-", 1)[0] for n in netns.netns_names() if n.startswith(PREFIX)}
    return sorted(p for p in found if p.startswith(PREFIX))


def orphaned(prefix: str) -> bool:
    """A run whose `run` command is gone (an `up` cluster is not: it waits for its `down`)."""
    try:
        creator = Cluster.load(prefix).creator
    except (OSError, ValueError, TypeError, KeyError):
        return True                           # half-made or half-removed: nobody owns it
    if creator == 0:
        return False
    try:
        os.kill(creator, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove(prefix: str) -> None:
    """Tear down a run by prefix, from its state when there is one, else from its names."""
    if not prefix.startswith(PREFIX):
        raise ValueError(f"prefix: not a ringsync-cluster name: {prefix!r}")
    try:
        Cluster.load(prefix).down()
    except (OSError, ValueError, TypeError, KeyError):
        pass
    names = [n for n in netns.netns_names() if n.startswith(prefix + "-")]
    inodes = {i for i in (netns.netns_inode(n) for n in names) if i}
    inodes -= {netns.namespace_inode(os.getpid(), k) for k in ("net", "pid")}
    netns.kill_all(netns.processes_in(inodes))
    for name in names:
        netns.delete_netns(name)
    shutil.rmtree(STATE_ROOT / prefix, ignore_errors=True)


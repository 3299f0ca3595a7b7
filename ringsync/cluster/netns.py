"""Linux plumbing for emulated hosts: namespaces, veth links, a bridge, shaping, counters.

Every function here runs one `ip`/`tc`/`unshare` command, or reads /proc; hosts.py puts them
together into a cluster. Nothing here touches the root namespace's network: links are made
with `ip -n` directly inside the namespaces that own them, so no interface, address or route
appears outside, even for a moment.

A host is a process (its "holder") that `unshare` started in new network, UTS, mount and PID
namespaces: the holder is PID 1 of its host, so killing it kills every process of the host,
and its network namespace gets a name with `ip netns attach` so that `ip -n` can reach it.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path


class ClusterError(RuntimeError):
    """A command of the emulation failed (the message names the command and its output)."""


def sh(*argv: str, check: bool = True, timeout: float = 30) -> str:
    """Run one command; return its stdout. ClusterError with its stderr if it fails."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterError(f"{shlex.join(argv)}: {exc}") from exc
    if check and done.returncode != 0:
        raise ClusterError(f"{shlex.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


# --- hosts: a holder process per host -------------------------------------------------------

def start_holder(hostname: str, hosts_file: Path, shm_bytes: int,
                 die_with_parent: bool, own_proc: bool = True) -> subprocess.Popen:
    """Start a host: `unshare` in new net/UTS/mount/PID namespaces, whose child (PID 1 there)
    sets the hostname, mounts a private /dev/shm and /tmp and the cluster's /etc/hosts, then
    sleeps.

    The namespaces are private to the host; the file system is shared with everything else,
    as a cluster's home directories are, but for /tmp, which is each node's own, as on a
    cluster (and must be: MPI runtimes keep per-host rendezvous files there, named by host
    and PID, and the PIDs of a new host start again at 1). die_with_parent: the host dies with this process
    (unshare --kill-child passes it on). own_proc: /proc shows the host's own processes, as
    on a real host (a rank's getppid() is found there); the login node keeps the machine's,
    since the agent it starts finds every host's PID 1 there. Returns the unshare process
    (its child is the init)."""
    setup = (f"hostname {shlex.quote(hostname)} && "
             f"mount -t tmpfs -o mode=1777,size={shm_bytes} ringsync-shm /dev/shm && "
             f"mount -t tmpfs -o mode=1777 ringsync-tmp /tmp && "
             f"mount --bind {shlex.quote(str(hosts_file))} /etc/hosts && "
             "echo ready && exec sleep infinity")
    # setpriv --pdeathsig: the host's PID 1 gets SIGKILL if this process dies (and unshare's
    # --kill-child passes it on), so a run killed with SIGKILL leaves no process behind.
    mortal = ["setpriv", "--pdeathsig", "KILL"] if die_with_parent else []
    holder = subprocess.Popen(
        [*mortal, "unshare", "--net", "--uts", "--mount", "--pid", "--fork", "--kill-child",
         "--propagation", "private", *(["--mount-proc"] if own_proc else []), "sh", "-c", setup],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)          # a Ctrl-C meant for the tool reaches it through us
    line = holder.stdout.readline() if holder.stdout else ""
    if line.strip() != "ready":
        holder.kill()
        err = holder.stderr.read() if holder.stderr else ""
        raise ClusterError(f"host {hostname}: the namespaces could not be made: {err.strip()}")
    return holder


def init_pid(holder_pid: int, limit: float = 5.0) -> int:
    """The PID (as the root namespace sees it) of the holder's child: the host's PID 1."""
    deadline = time.monotonic() + limit
    path = Path(f"/proc/{holder_pid}/task/{holder_pid}/children")
    while time.monotonic() < deadline:
        children = path.read_text().split() if path.exists() else []
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise ClusterError(f"holder {holder_pid} has no child")


def attach_netns(name: str, pid: int) -> None:
    """Give the network namespace of process pid a name under /run/netns (for `ip -n`)."""
    sh("ip", "netns", "attach", name, str(pid))


def add_netns(name: str) -> None:
    """A network namespace with a name and no process: where the bridge (the switch) lives."""
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")


def delete_netns(name: str) -> None:
    sh("ip", "netns", "del", name, check=False)


def netns_names() -> list[str]:
    return sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def processes_in(inodes: set[int]) -> list[int]:
    """Every process whose network or PID namespace is one of these (by inode)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for kind in ("net", "pid"):
            try:
                if os.stat(f"/proc/{entry}/ns/{kind}").st_ino in inodes:
                    found.append(int(entry))
                    break
            except OSError:
                break                        # gone already, or not ours to look at
    return found


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def namespace_inode(pid: int, kind: str) -> int:
    """The inode of process pid's namespace of this kind ("net", "pid"), or 0 if it is gone."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return 0


# --- links: a bridge in its own namespace, a veth per host ----------------------------------

def add_bridge(switch: str, bridge: str = "br0") -> None:
    sh("ip", "-n", switch, "link", "add", bridge, "type", "bridge")
    sh("ip", "-n", switch, "link", "set", bridge, "up")


def add_host_link(switch: str, port: str, host_ns: str, address: str, prefix_len: int,
                  bridge: str = "br0") -> None:
    """A veth pair made inside the switch namespace with its peer born in the host's:
    `port` on the bridge, `eth0` in the host with its address. No address on the switch side."""
    sh("ip", "-n", switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
       "netns", host_ns)
    sh("ip", "-n", switch, "link", "set", port, "master", bridge, "up")
    sh("ip", "-n", host_ns, "link", "set", "lo", "up")
    sh("ip", "-n", host_ns, "addr", "add", f"{address}/{prefix_len}", "dev", "eth0")
    sh("ip", "-n", host_ns, "link", "set", "eth0", "up")


def shape(ns: str, dev: str, rate_bps: int, burst_bytes: int, latency_ms: int) -> None:
    """Token bucket on dev's egress: `rate` bits per second, a bucket of burst_bytes, and a
    queue that holds at most latency_ms of traffic at that rate (beyond it, packets drop)."""
    sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bps}bit",
       "burst", str(burst_bytes), "latency", f"{latency_ms}ms")


def qdisc_stats(ns: str, dev: str) -> dict:
    """The root qdisc of dev: its kind, and the bytes it sent (tbf counts every segment of a
    GSO packet with its own headers, as they go on the wire; `ip -s link` counts them once)."""
    out = sh("tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev, check=False)
    try:
        return json.loads(out)[0]
    except (ValueError, LookupError):
        return {"kind": "?", "bytes": 0}


def set_mtu(ns: str, dev: str, mtu: int) -> None:
    sh("ip", "-n", ns, "link", "set", "dev", dev, "mtu", str(mtu))


def link_bytes(ns: str, dev: str) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of an interface, as its namespace counts them."""
    out = sh("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev)
    stats = json.loads(out)[0]["stats64"]
    return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

"""What crossed the links, and how fast a link really is.

Counters are read on the switch side of each host's link (`ip -s link`): `rx` is what the
host sent (its uplink), `tx` what it received (its downlink). They count every byte of every
frame, headers included, so they are compared with what an algorithm must send as they are:
a ring all-reduce of n bytes across h hosts sends 2(h-1)/h * n per host and direction, plus
TCP/IP and Ethernet headers (about 4% at an MTU of 1500) and MPI's own messages.
"""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

from . import netns
from .hosts import Cluster

SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5201)); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20)
while c.recv_into(buf):
    pass
"""
SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5201)); block = bytes(1 << 20)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    c.sendall(block)
"""


@dataclass
class LinkBytes:
    """Bytes through one host's link: up = the host sent them, down = it received them."""
    up: int
    down: int


def counters(cluster: Cluster) -> dict[str, LinkBytes]:
    """Each host's link counters now, by hostname (switch side: rx is the host's uplink)."""
    out = {}
    for h in cluster.hosts:
        rx, tx = netns.link_bytes(cluster.switch, h.port)
        out[h.hostname] = LinkBytes(up=rx, down=tx)
    return out


def difference(after: dict[str, LinkBytes], before: dict[str, LinkBytes]) -> dict[str, LinkBytes]:
    return {k: LinkBytes(after[k].up - before[k].up, after[k].down - before[k].down) for k in after}


def ring_bytes_per_link(n_bytes: int, hosts: int) -> float:
    """What a ring (flat or across nodes) all-reduce of n bytes must send over each host's
    link, per direction: 2(h-1)/h * n."""
    return 2 * (hosts - 1) / hosts * n_bytes if hosts > 1 else 0.0


def in_host(cluster: Cluster, hostname: str, code: str, *args: str) -> subprocess.Popen:
    """A Python snippet running in a host's network namespace (root, for measurements)."""
    host = cluster.host(hostname)
    return subprocess.Popen(["nsenter", "-t", str(host.init), "--net", sys.executable, "-c",
                             code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@dataclass
class LinkRate:
    """One stream's rate in bits per second over src's uplink and dst's downlink, counted
    by the shaper (`tbf`, wire bytes) or, on an unshaped link, by `ip -s link`."""
    up_bps: float
    down_bps: float
    counted_by: str


def measure_rate(cluster: Cluster, src: str, dst: str, seconds: float = 2.0,
                 warmup: float = 0.3) -> LinkRate:
    """One TCP stream from src to dst, flat out; the rate that crossed src's uplink and dst's
    downlink after a warm-up. ip's counters see a GSO packet's headers once, the wire (and
    tbf) once per segment: at an MTU of 1500 they read 4-5% under the wire rate, so a shaped
    link is measured by its shaper. Each reading is timed at its middle."""
    shaped = cluster.spec.rate_bps is not None
    s, d = cluster.host(src), cluster.host(dst)

    def read() -> tuple[float, int, int]:
        t = time.monotonic()
        if shaped:
            up = int(netns.qdisc_stats(s.ns, "eth0").get("bytes", 0))
            down = int(netns.qdisc_stats(cluster.switch, d.port).get("bytes", 0))
        else:
            up, down = netns.link_bytes(cluster.switch, s.port)[0], netns.link_bytes(cluster.switch, d.port)[1]
        return (t + time.monotonic()) / 2, up, down

    sink = in_host(cluster, dst, SINK)
    try:
        if not sink.stdout or sink.stdout.readline().strip() != "listening":
            raise netns.ClusterError(f"rate: the sink on {dst} did not start: "
                                     f"{sink.stderr.read() if sink.stderr else ''}")
        source = in_host(cluster, src, SOURCE, d.address, str(warmup + seconds + 0.5))
        time.sleep(warmup)
        t0, up0, down0 = read()
        time.sleep(seconds)
        t1, up1, down1 = read()
        source.wait(timeout=30)
    finally:
        sink.kill()
        sink.wait()
    return LinkRate(8 * (up1 - up0) / (t1 - t0), 8 * (down1 - down0) / (t1 - t0),
                    "tbf" if shaped else "ip")

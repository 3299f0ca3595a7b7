"""ringsync-cluster: emulated hosts on one machine, for trying multi-host MPI (needs root).

    sudo ringsync-cluster run --hosts 2 --ranks-per-host 2 --rate 1gbit -- python my_script.py
    sudo ringsync-cluster up --slots 2,2,1 --rate 1gbit --hosts-file hosts.txt   # prints NAME
    sudo ringsync-cluster status [NAME] [--measure]
    sudo ringsync-cluster run --name NAME -- python my_script.py
    sudo ringsync-cluster down [NAME]          # no NAME: every run whose maker is gone

`run` without --name builds the hosts, launches the command on every slot with the MPI of
this Python's environment (--mpi checks which), and tears everything down when the command
ends, fails, times out or is interrupted. Bad input exits 2 with one line.
"""
from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from .. import cli
from . import hosts, launch, links, netns
from .hosts import Cluster, ClusterSpec
from .netns import ClusterError

PROG = "ringsync-cluster"
def parse_slots(text: str) -> list[int]:
    try:
        slots = [int(s) for s in text.split(",")]
    except ValueError:
        slots = []
    if not slots or min(slots) < 1:
        raise argparse.ArgumentTypeError(f"not a list of ranks per host: {text!r} (e.g. 2,2,1)")
    return slots


def shape_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts", type=int, default=2, help="how many hosts (default 2)")
    p.add_argument("--ranks-per-host", type=int, default=1, help="MPI slots per host (default 1)")
    p.add_argument("--slots", type=parse_slots, help="ranks per host, uneven: 2,2,1 (instead "
                   "of --hosts and --ranks-per-host)")
    p.add_argument("--rate", type=cli.parse_rate, default=None, help="each host link's rate, both "
                   "directions: 100mbit, 1gbit, 10gbit, or none (default: unshaped)")
    p.add_argument("--mtu", type=int, default=1500, help="the links' MTU (default 1500)")
    p.add_argument("--hosts-file", help="also write a hostfile (host:slots per line) here")


def parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run", help="build hosts, launch a command on them, tear them down")
    shape_args(run)
    run.add_argument("--name", help="launch on this running cluster (from `up`) instead")
    run.add_argument("--mpi", choices=launch.MPIS, help="check that this Python's MPI is this one")
    run.add_argument("--timeout", type=float, help="seconds before the job is killed (exit 124)")
    run.add_argument("--forward", action="append", default=[], metavar="VAR",
                     help="an environment variable to carry to the ranks (Open MPI's -x)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    up = sub.add_parser("up", help="build hosts that stay until `down`; print their name")
    shape_args(up)
    status = sub.add_parser("status", help="the hosts, links and counters of running clusters")
    status.add_argument("name", nargs="?")
    status.add_argument("--measure", action="store_true",
                        help="also measure each link's single-stream rate (1 s per link)")
    down = sub.add_parser("down", help="remove a cluster (default: those of `run`s that are gone)")
    down.add_argument("name", nargs="?")
    down.add_argument("--all", action="store_true", help="every cluster, `up` ones included")
    return p


def spec_of(args: argparse.Namespace) -> ClusterSpec:
    if args.hosts < 1 or args.ranks_per_host < 1:
        raise ValueError("--hosts and --ranks-per-host must be at least 1")
    slots = args.slots or [args.ranks_per_host] * args.hosts
    return ClusterSpec(slots=slots, rate_bps=args.rate, mtu=args.mtu)


def describe(cluster: Cluster, measure: bool = False) -> str:
    spec = cluster.spec
    rate = f"{spec.rate_bps / 1e9:g} Gbit/s" if spec.rate_bps else "unshaped"
    shaping = f", tbf burst {spec.burst_bytes} B, queue {spec.latency_ms} ms" if spec.rate_bps else ""
    lines = [(f"{cluster.prefix}: {len(cluster.hosts)} host(s), {sum(spec.slots)} slot(s), "
              f"links {rate}{shaping}, mtu {spec.mtu}")]
    count = links.counters(cluster)
    for h in cluster.hosts:
        kinds = "/".join(netns.qdisc_stats(ns, dev).get("kind", "?")
                         for ns, dev in ((h.ns, "eth0"), (cluster.switch, h.port)))
        lines.append(f"  {h.hostname:8} {h.address:12} slots {h.slots}  qdisc {kinds:>17}  "
                     f"bytes up {count[h.hostname].up:>12} down {count[h.hostname].down:>12}")
    if measure and len(cluster.hosts) > 1:
        for i, h in enumerate(cluster.hosts):
            dst = cluster.hosts[(i + 1) % len(cluster.hosts)].hostname
            r = links.measure_rate(cluster, h.hostname, dst)
            agree = ""
            if spec.rate_bps:
                worst = max(abs(x / spec.rate_bps - 1) for x in (r.up_bps, r.down_bps))
                agree = f"  {'agrees' if worst <= 0.05 else 'DISAGREES'} with {rate} ({100 * worst:.1f}%)"
            lines.append(f"  {h.hostname} -> {dst}: one stream {r.up_bps / 1e9:.3f} Gbit/s up, "
                         f"{r.down_bps / 1e9:.3f} down (counted by {r.counted_by}){agree}")
    return "\n".join(lines)


def on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)            # unwinds through the teardown in `finally`


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    # Ctrl-C raises KeyboardInterrupt even where the shell started us with SIGINT ignored
    # (a background job): the teardown must run either way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return verb(args, p)
    except (ClusterError, ValueError, OSError) as exc:
        cli.fail(PROG, str(exc))
    except KeyboardInterrupt:                  # the hosts are down already (`finally`)
        return 130


def verb(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    hosts.check_can_emulate()
    if args.verb == "down":
        names = [args.name] if args.name else [r for r in hosts.runs() if args.all or hosts.orphaned(r)]
        for name in names:
            hosts.remove(name)
            print(f"removed {name}")
        return 0
    if args.verb == "status":
        names = [args.name] if args.name else hosts.runs()
        for name in names:
            print(describe(load(name), measure=args.measure))
        if not names:
            print("no emulated hosts")
        return 0
    if args.verb == "up":
        cluster = Cluster.create(spec_of(args), persistent=True)
        print(cluster.prefix, flush=True)     # first: whatever fails next, `down NAME` works
        if args.hosts_file:
            write_hostfile(cluster, args.hosts_file)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("run: no command given (put it after --)")
    if args.name:
        return launch.run(load(args.name), command, args.mpi, timeout=args.timeout,
                          forward=tuple(args.forward), capture=False).returncode
    with Cluster.up(spec_of(args)) as cluster:
        if args.hosts_file:
            write_hostfile(cluster, args.hosts_file)
        sys.stderr.write(f"{PROG}: {cluster.prefix} up: {describe(cluster).splitlines()[0].split(': ', 1)[1]}\n")
        sys.stderr.flush()
        return launch.run(cluster, command, args.mpi, timeout=args.timeout,
                          forward=tuple(args.forward), capture=False).returncode


def load(name: str) -> Cluster:
    try:
        return Cluster.load(name)
    except OSError:
        raise ClusterError(f"no cluster named {name!r} (see ringsync-cluster status)") from None


def write_hostfile(cluster: Cluster, path: str) -> None:
    with open(path, "w") as f:
        f.write(cluster.hostfile.read_text())


if __name__ == "__main__":
    sys.exit(main())
